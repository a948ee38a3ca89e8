"""`python -m jsdr.eval`: table-5 defaults, scores from real samples, JSONL audit trail, resume."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jsdr import config as C
from jsdr import eval as EV
from jsdr import toy
from jsdr.data.rewards import grade
from jsdr.errors import RunError
from jsdr.model import hf
from jsdr.model.lora import LoraConfig, init_lora, save_peft
from jsdr.sampling import SampleOutput


def test_table5_defaults():
    cfg = EV.EvalConfig()
    s = cfg.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.presence_penalty, s.n) == \
        (38912, 1.0, 0.95, -1, 0.0, 0.0, 16)
    assert cfg.thinking is True
    assert cfg.benchmarks == ("aime24", "aime25", "hmmt25", "amo")
    cfg = C.load(EV.EvalConfig, None, ["--benchmarks", "aime24,toy", "--n=4", "--temperature=0.6"])
    assert cfg.benchmarks == ("aime24", "toy") and cfg.sampling.n == 4 and cfg.sampling.temperature == 0.6


@pytest.fixture(scope="module")
def bench(toy_tiny_assets, tmp_path_factory):
    """A local benchmark file and a random non-zero PEFT adapter for the tiny model."""
    d = tmp_path_factory.mktemp("eval")
    with open(d / "bench.jsonl", "w") as f:
        for p in toy.toy_benchmark(5):
            f.write(json.dumps({"question": p["problem"], "final": p["answer"]}) + "\n")
    params, mcfg, _ = hf.load_params(str(toy_tiny_assets / "model"))
    lcfg = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    lora = init_lora(mcfg, lcfg, jax.random.PRNGKey(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), lora)
    save_peft(d / "adapter", lora, lcfg, mcfg)
    return d


def _cfg(assets, bench, out, *extra):
    return C.load(EV.EvalConfig, None, [
        f"--model={assets / 'model'}", f"--adapter={bench / 'adapter'}", f"--benchmarks=mine:{bench / 'bench.jsonl'}",
        "--problem_field=question", "--answer_field=final", "--n=3", "--max_new_tokens=10", "--dtype=float32",
        f"--output_dir={out}", "--batch_prompts=2", "--mesh.num_devices=1", *extra])


def test_end_to_end_with_adapter_and_resume(toy_tiny_assets, bench, tmp_path):
    logs = []
    res = EV.evaluate(_cfg(toy_tiny_assets, bench, tmp_path), progress=False, log=logs.append)
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3
    assert {(r["problem_index"], r["sample_index"]) for r in rows} == {(i, j) for i in range(5) for j in range(3)}
    for r in rows:  # the JSONL is auditable: re-grading gives the stored verdict
        g = grade(r["response"], r["answer"])
        assert (g.correct, g.extracted) == (r["correct"], r["extracted"])
        assert 1 <= r["length"] <= 10 and r["finish_reason"] in ("stop", "length")
    m = res["benchmarks"]["mine"]
    assert m["n_problems"] == 5 and m["avg@3"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert m["mean_length"] == pytest.approx(np.mean([r["length"] for r in rows]))
    assert "pass@3" in m and "maj@3" in m
    assert any("benchmark" in line and "avg@3" in line for line in logs)
    assert json.loads((tmp_path / "results.json").read_text())["benchmarks"]["mine"]["n_problems"] == 5

    # stop mid-run: keep problems 0-2 complete and a third of problem 3; the resumed run redoes only 3-4
    keep = [r for r in rows if r["problem_index"] < 3 or (r["problem_index"] == 3 and r["sample_index"] == 0)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    logs = []
    EV.evaluate(_cfg(toy_tiny_assets, bench, tmp_path), progress=False, log=logs.append)
    assert any("3 already done" in line for line in logs)
    assert any("dropped 1 samples of 1 problem" in line for line in logs)
    rows2 = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows2) == 15 and rows2[:9] == [r for r in rows if r["problem_index"] < 3]
    # batches are fixed slices of the problem list ([0, 1], [2, 3], [4]; not [3, 4] after the resume), so the
    # resumed run draws the same samples as the unbroken one
    assert sorted(rows2, key=lambda r: (r["problem_index"], r["sample_index"])) == \
        sorted(rows, key=lambda r: (r["problem_index"], r["sample_index"]))


def test_scores_from_known_samples(toy_tiny_assets, bench, tmp_path, monkeypatch):
    """With the sampler replaced by fixed responses, every score is what the hand count says."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(toy_tiny_assets / "model")
    probs = toy.toy_benchmark(5)
    # problem i: sample j answers correctly iff j < i (so c_i = min(i, 3) of n = 3)
    def fake_generate(self, params, lora, prompts, sc, rng=None, **kw):
        texts = []
        start = fake_generate.offset
        for p in range(len(prompts)):
            i = start + p
            for j in range(sc.n):
                ans = probs[i]["answer"] if j < i else str((int(probs[i]["answer"]) + 1) % 10)
                texts.append(f"so \\boxed{{{ans}}}")
        fake_generate.offset += len(prompts)
        return _deliver(_sample_output(tok, texts, sc.n), sc.n, kw)
    fake_generate.offset = 0
    monkeypatch.setattr("jsdr.sampling.Sampler.generate", fake_generate)
    res = EV.evaluate(_cfg(toy_tiny_assets, bench, tmp_path), progress=False, log=lambda *a: None)
    m = res["benchmarks"]["mine"]
    c = [0, 1, 2, 3, 3]
    assert m["avg@3"] == pytest.approx(sum(c) / 15)
    # pass@1 = mean c/n; pass@2 = mean 1 - C(3-c, 2)/C(3, 2)
    assert m["pass@1"] == pytest.approx(np.mean([x / 3 for x in c]))
    assert m["pass@2"] == pytest.approx(np.mean([0, 2 / 3, 1, 1, 1]))
    assert m["pass@3"] == pytest.approx(4 / 5)
    # majority: problem 2 has 2 of 3 correct -> correct; problem 1 has 1 of 3 -> wrong
    assert m["maj@3"] == pytest.approx(3 / 5)


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(C.ConfigError, match="unknown benchmark 'aime2099'"):
        EV.load_benchmark("aime2099", EV.EvalConfig())


def test_help(capsys):
    assert EV.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--sampling.max_new_tokens=38912" in out and "--sampling.top_p=0.95" in out


# ---------------------------------------------------------------------------------------------
# results keyed by what produced them; resume, overwrite, errors of the command line


def _sample_output(tok, texts, n):
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    L = max(map(len, ids))
    toks = np.zeros((len(ids), L), np.int32)
    for r, x in enumerate(ids):
        toks[r, :len(x)] = x
    R = len(ids)
    return SampleOutput(toks, np.zeros((R, L), np.float32), np.zeros((R, L), np.float32),
                        np.array([len(x) for x in ids], np.int32), np.zeros(R, np.int8), np.arange(R) // n)


def _deliver(out, n, kw):
    """Hand each prompt's rows to on_prompt_done, as Sampler.generate does."""
    if kw.get("on_prompt_done") is not None:
        for i in range(len(out.lengths) // n):
            sl = slice(i * n, (i + 1) * n)
            kw["on_prompt_done"](i, SampleOutput(out.tokens[sl], out.logprobs[sl], out.logprobs_raw[sl],
                                                 out.lengths[sl], out.finish_reason[sl], out.prompt_index[sl]))
    return out


@pytest.fixture
def fake_sampler(toy_tiny_assets, monkeypatch):
    """Sampler.generate replaced by a deterministic stand-in (the answer depends on the prompt, the sample
    and the batch key) that records its calls; `fail` = {call number: exception to raise}."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(toy_tiny_assets / "model")
    calls, fail = [], {}

    def generate(self, params, lora, prompts, sc, rng=None, **kw):
        calls.append(len(prompts))
        if len(calls) in fail:
            raise fail[len(calls)]
        salts = [int(np.asarray(k).sum()) for k in kw["prompt_keys"]]  # each problem's own key
        texts = [f"so \\boxed{{{(sum(p) + j + salt) % 10}}}" for p, salt in zip(prompts, salts) for j in range(sc.n)]
        return _deliver(_sample_output(tok, texts, sc.n), sc.n, kw)
    monkeypatch.setattr("jsdr.sampling.Sampler.generate", generate)
    generate.calls, generate.fail = calls, fail
    return generate


def _args(assets, bench, *extra, adapter=True, out=None):
    """A 3-problem, n=2 eval of the tiny model (output_dir: the default unless `out`)."""
    a = [f"--model={assets / 'model'}", f"--benchmarks=mine:{bench / 'bench.jsonl'}", "--problem_field=question",
         "--answer_field=final", "--limit=3", "--n=2", "--max_new_tokens=4", "--dtype=float32",
         "--batch_prompts=2", "--mesh.num_devices=1"]
    if adapter:
        a.append(f"--adapter={bench / 'adapter'}")
    if out is not None:
        a.append(f"--output_dir={out}")
    return a + list(extra)


def _run(args, logs=None):
    return EV.evaluate(EV.parse_args(args), progress=False, log=(logs.append if logs is not None else lambda *a: None))


def test_base_and_adapter_results_never_mix(toy_tiny_assets, bench, tmp_path, monkeypatch, fake_sampler):
    monkeypatch.chdir(tmp_path)
    base = Path(_run(_args(toy_tiny_assets, bench, adapter=False))["output_dir"])
    tuned = Path(_run(_args(toy_tiny_assets, bench))["output_dir"])
    # default eval/{name}-{key}: model name, +adapter name (its run dir for a dir called `adapter`), key hash
    assert base.parent == tuned.parent == Path("eval") and base != tuned
    assert base.name.startswith("model-") and tuned.name.startswith(f"model+{bench.name}-")
    kb, kt = (json.loads((d / EV.KEY_FILE).read_text()) for d in (base, tuned))
    assert kb["adapter"] is None and kt["adapter"]["sha256"] == EV.adapter_sha256(bench / "adapter")
    assert base.name.endswith(EV.key_hash(kb)) and tuned.name.endswith(EV.key_hash(kt))
    assert len((base / EV.SAMPLES_FILE).read_text().splitlines()) == 3 * 2

    # one explicit output_dir for both: the second is refused, naming the differing key, and nothing changes
    same = tmp_path / "same"
    _run(_args(toy_tiny_assets, bench, adapter=False, out=same))
    before = {f: (same / f).read_bytes() for f in (EV.SAMPLES_FILE, EV.RESULTS_FILE, EV.KEY_FILE)}
    n_calls = len(fake_sampler.calls)
    with pytest.raises(RunError, match=r"holds samples of other settings \(adapter: none -> .*adapter.*"
                                       r"--output_dir, or --overwrite=true"):
        _run(_args(toy_tiny_assets, bench, out=same))
    assert {f: (same / f).read_bytes() for f in before} == before and len(fake_sampler.calls) == n_calls


def test_adapter_hash_covers_config_and_weights(bench, tmp_path):
    import shutil
    from jsdr.model.lora import AdapterError
    d = tmp_path / "a"
    shutil.copytree(bench / "adapter", d)
    h = EV.adapter_sha256(d)
    assert h == EV.adapter_sha256(bench / "adapter")
    w = d / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert EV.adapter_sha256(d) != h
    c = d / "adapter_config.json"
    shutil.copy(bench / "adapter" / "adapter_model.safetensors", w)
    c.write_text(c.read_text().replace('"lora_alpha": 8', '"lora_alpha": 16'))
    assert EV.adapter_sha256(d) != h
    with pytest.raises(AdapterError, match="no such adapter directory"):
        EV.adapter_sha256(tmp_path / "missing")


def test_other_n_into_the_same_dir_is_refused(toy_tiny_assets, bench, tmp_path, fake_sampler):
    _run(_args(toy_tiny_assets, bench, out=tmp_path))
    before = (tmp_path / EV.SAMPLES_FILE).read_bytes()
    with pytest.raises(RunError, match=r"sampling\.n: 2 -> 3"):
        _run(_args(toy_tiny_assets, bench, "--n=3", out=tmp_path))
    assert (tmp_path / EV.SAMPLES_FILE).read_bytes() == before
    # neither does --resume=false, unless --overwrite=true
    with pytest.raises(RunError, match=r"--resume=false; use another --output_dir, or --overwrite=true"):
        _run(_args(toy_tiny_assets, bench, "--resume=false", out=tmp_path))
    assert (tmp_path / EV.SAMPLES_FILE).read_bytes() == before
    logs = []
    _run(_args(toy_tiny_assets, bench, "--n=3", "--overwrite=true", out=tmp_path), logs)
    assert any("--overwrite=true: removing samples.jsonl, results.json, eval_key.json (6 sample lines)" in x
               and "sampling.n: 2 -> 3" in x for x in logs)
    rows = [json.loads(x) for x in (tmp_path / EV.SAMPLES_FILE).read_text().splitlines()]
    assert len(rows) == 3 * 3 and json.loads((tmp_path / EV.KEY_FILE).read_text())["sampling"]["n"] == 3


def test_samples_without_a_key_are_refused(toy_tiny_assets, bench, tmp_path, fake_sampler):
    (tmp_path / EV.SAMPLES_FILE).write_text('{"benchmark": "mine", "problem_index": 0}\n')
    with pytest.raises(RunError, match=f"holds samples.jsonl but no {EV.KEY_FILE}"):
        _run(_args(toy_tiny_assets, bench, out=tmp_path))
    assert (tmp_path / EV.SAMPLES_FILE).read_text() == '{"benchmark": "mine", "problem_index": 0}\n'
    assert not fake_sampler.calls


def test_changed_temperature_gets_a_new_default_dir(toy_tiny_assets, bench, tmp_path, monkeypatch, fake_sampler):
    monkeypatch.chdir(tmp_path)
    a = Path(_run(_args(toy_tiny_assets, bench))["output_dir"])
    before = (a / EV.SAMPLES_FILE).read_bytes()
    b = Path(_run(_args(toy_tiny_assets, bench, "--sampling.temperature=0.6"))["output_dir"])
    assert a != b and (a / EV.SAMPLES_FILE).read_bytes() == before
    ka, kb = (json.loads((d / EV.KEY_FILE).read_text()) for d in (a, b))
    assert EV.key_diff(ka, kb) == ["sampling.temperature: 1.0 -> 0.6"]


def test_same_settings_resume_without_sampling(toy_tiny_assets, bench, tmp_path, fake_sampler):
    res = _run(_args(toy_tiny_assets, bench, out=tmp_path))
    assert fake_sampler.calls == [2, 1]
    before = (tmp_path / EV.SAMPLES_FILE).read_bytes()
    for extra in ((), ("--overwrite=true",)):  # --overwrite only replaces what would be refused
        logs = []
        again = _run(_args(toy_tiny_assets, bench, *extra, out=tmp_path), logs)
        assert fake_sampler.calls == [2, 1] and any("3 already done" in x for x in logs)
        assert (tmp_path / EV.SAMPLES_FILE).read_bytes() == before and again["benchmarks"] == res["benchmarks"]


def test_torn_last_line_is_cut_and_resumed(toy_tiny_assets, bench, tmp_path, fake_sampler):
    _run(_args(toy_tiny_assets, bench, out=tmp_path))
    path = tmp_path / EV.SAMPLES_FILE
    full = path.read_bytes()
    # killed while writing a line of a complete problem: the torn part goes, nothing is sampled
    path.write_bytes(full + b'{"benchmark": "mine", "probl')
    logs = []
    _run(_args(toy_tiny_assets, bench, out=tmp_path), logs)
    assert path.read_bytes() == full and fake_sampler.calls == [2, 1]
    assert any("cut off a torn last line (28 bytes" in x for x in logs)
    # killed in the middle of problem 2's last sample: problem 2 (its batch: [2]) is sampled again, identically
    path.write_bytes(full[:-40])
    logs = []
    _run(_args(toy_tiny_assets, bench, out=tmp_path), logs)
    assert path.read_bytes() == full and fake_sampler.calls == [2, 1, 1]
    assert any("torn last line" in x for x in logs) and any("dropped 1 samples of 1 problem" in x for x in logs)
    # any other broken line is an error, and the file is left alone
    lines = full.splitlines(keepends=True)
    path.write_bytes(lines[0] + b"not json\n" + b"".join(lines[1:]))
    with pytest.raises(RunError, match="line 2: not a jsdr sample record"):
        _run(_args(toy_tiny_assets, bench, out=tmp_path))
    assert path.read_bytes() == lines[0] + b"not json\n" + b"".join(lines[1:])


def test_config_file_with_equals_sign(toy_tiny_assets, bench, tmp_path, fake_sampler, capsys):
    import yaml
    out = tmp_path / "out"
    opts = dict(a[2:].split("=", 1) for a in _args(toy_tiny_assets, bench, out=out) if not a.startswith("--mesh"))
    for k in ("n", "max_new_tokens"):
        opts.pop(k)
    f = tmp_path / "eval.yaml"
    f.write_text(yaml.safe_dump({**opts, "sampling": {"n": 2, "max_new_tokens": 4, "temperature": 0.6},
                                 "mesh": {"num_devices": 1}}))
    cfg = EV.parse_args([f"--config={f}"])
    assert cfg == EV.parse_args(["--config", str(f)])
    assert (cfg.sampling.n, cfg.sampling.temperature, cfg.sampling.top_p, cfg.limit) == (2, 0.6, 0.95, 3)
    assert EV.parse_args([f"--config={f}", "--n=5"]).sampling.n == 5  # the command line wins
    assert EV.main([f"--config={f}"]) == 0
    assert len((out / EV.SAMPLES_FILE).read_text().splitlines()) == 3 * 2
    for bad in (["--config"], ["--config="], ["--config", "--n=2"]):
        with pytest.raises(C.ConfigError, match="--config needs a file"):
            EV.parse_args(bad)
    capsys.readouterr()
    assert EV.main(["--config="]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "jsdr.eval: configuration error: --config needs a file: --config FILE or --config=FILE"]


def _one_error_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_main_turns_expected_errors_into_one_line(toy_tiny_assets, bench, tmp_path, fake_sampler, capsys):
    import errno
    args = _args(toy_tiny_assets, bench, out=tmp_path / "x")
    capsys.readouterr()
    missing = [a.replace("bench.jsonl", "nope.jsonl") if a.startswith("--benchmarks") else a for a in args]
    assert EV.main(missing) == 1
    line = _one_error_line(capsys)
    assert line.startswith("jsdr.eval: data error: ") and "nope.jsonl" in line
    no_adapter = [a + "-gone" if a.startswith("--adapter") else a for a in args]
    assert EV.main(no_adapter) == 1
    line = _one_error_line(capsys)
    assert line.startswith("jsdr.eval: adapter error: ") and "adapter-gone: no such adapter directory" in line
    assert EV.main(args + ["--n=0"]) == 2
    assert _one_error_line(capsys).startswith("jsdr.eval: configuration error: ")
    assert not fake_sampler.calls

    assert EV.main(args) == 0
    samples = (tmp_path / "x" / EV.SAMPLES_FILE).read_bytes()
    capsys.readouterr()
    assert EV.main(args + ["--resume=false"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("jsdr.eval: run error: ") and "--overwrite=true" in line
    assert (tmp_path / "x" / EV.SAMPLES_FILE).read_bytes() == samples

    # disk full and Ctrl-C while sampling: the first batch is kept, and the same command resumes
    for i, (exc, code, words) in enumerate([
            (OSError(errno.ENOSPC, "No space left on device"), 1, "I/O error: [Errno 28] No space left on device"),
            (KeyboardInterrupt(), 130, "interrupted; the 4 samples written so far are kept in")]):
        d = tmp_path / f"stop{i}"
        fake_sampler.calls.clear()
        fake_sampler.fail.clear()
        fake_sampler.fail[2] = exc
        try:
            assert EV.main(_args(toy_tiny_assets, bench, out=d)) == code
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped main")
        assert words in capsys.readouterr().err
        assert len((d / EV.SAMPLES_FILE).read_text().splitlines()) == 4
        fake_sampler.fail.clear()
        assert EV.main(_args(toy_tiny_assets, bench, out=d)) == 0 and fake_sampler.calls == [2, 1, 1]
    # a bug keeps its traceback
    fake_sampler.fail[len(fake_sampler.calls) + 1] = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        EV.main(_args(toy_tiny_assets, bench, out=tmp_path / "bug"))


def test_partial_sampling_section_keeps_table5(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sampling:\n  temperature: 0.6\n")
    for cfg in (EV.parse_args(["--sampling.temperature=0.6"]), EV.parse_args([f"--config={f}"])):
        s = cfg.sampling
        assert (s.temperature, s.n, s.top_p, s.max_new_tokens, s.top_k) == (0.6, 16, 0.95, 38912, -1)


def test_output_dir_placeholders():
    key = {"format": 1, "x": 1}
    cfg = EV.parse_args(["--model=/m/Qwen3-4B", "--adapter=/runs/opsd/adapter"])
    assert EV.output_dir_of(cfg, key) == Path(f"eval/Qwen3-4B+opsd-{EV.key_hash(key)}")
    cfg = EV.parse_args(["--model=/m/Qwen3-4B/", "--output_dir=out/{model}/{adapter}_{key}"])
    assert EV.output_dir_of(cfg, key) == Path(f"out/Qwen3-4B/_{EV.key_hash(key)}")
    with pytest.raises(C.ConfigError, match=r"output_dir: 'x/\{foo\}' is not a valid pattern"):
        EV.parse_args(["--output_dir=x/{foo}"])


def test_eval_prompt_text_is_the_public_eval_prompt_with_thinking_on():
    """Table 5 evaluates in thinking mode with the public evaluation code's prompt (no "Problem: "
    label): the exact text of an eval prompt (the toy chat template inserts an empty think block only
    when thinking is off); --prompt replaces it."""
    from jsdr.data.prompts import INSTRUCTION, STUDENT_TEMPLATE
    tok = toy.build_tokenizer()
    cfg = EV.EvalConfig()
    assert cfg.thinking is True and cfg.prompt == "{problem}\n\n" + INSTRUCTION
    items = [("b", 0, {"problem": "Start at 0. Add 3.", "answer": "3"})]
    text = tok.decode(EV._render_prompts(tok, items, cfg.thinking, cfg.prompt)[0])
    assert text == ("<|im_start|>user\nStart at 0. Add 3.\n\n" + INSTRUCTION
                    + "<|im_end|>\n<|im_start|>assistant\n")
    off = tok.decode(EV._render_prompts(tok, items, False, cfg.prompt)[0])
    assert off == text + "<think>\n\n</think>\n\n"
    labelled = tok.decode(EV._render_prompts(tok, items, True, STUDENT_TEMPLATE)[0])
    assert labelled == text.replace("user\nStart", "user\nProblem: Start")
    with pytest.raises(C.ConfigError, match="prompt"):
        EV.EvalConfig(prompt="no placeholder")


def test_bad_sampling_input_fails_before_any_sample_is_written(toy_tiny_assets, bench, tmp_path, fake_sampler,
                                                               capsys):
    """A KV budget too small for one sequence is one line (exit 2) before samples.jsonl exists."""
    args = _args(toy_tiny_assets, bench, out=tmp_path / "b")
    capsys.readouterr()
    assert EV.main(args + ["--sampling.kv_cache_gb=0.000000001"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert line.startswith("jsdr.eval: sampling error: KV cache budget too small for one sequence"), line
    assert "kv_cache_gb" in line
    assert not (tmp_path / "b" / EV.SAMPLES_FILE).exists() and not fake_sampler.calls
