"""The embedded toy task, tokenizer and warm-started model (tiny settings: no full warm start here)."""

import json
from pathlib import Path
import re

import numpy as np
import pytest

from jsdr import toy
from jsdr.data.rewards import last_boxed


# ---------------------------------------------------------------------------------------------
# task generator


def test_generator_is_deterministic_and_seed_dependent():
    a = toy.make_problems(50, seed=3, difficulty=4)
    b = toy.make_problems(50, seed=3, difficulty=4)
    c = toy.make_problems(50, seed=4, difficulty=4)
    assert a == b
    assert [x["problem"] for x in a] != [x["problem"] for x in c]
    assert toy.toy_benchmark(20, seed=1) == toy.toy_benchmark(20, seed=1)


def _recompute(problem: str) -> int:
    """An independent solver working from the text with a regex (not toy.parse_problem)."""
    m = re.fullmatch(r"x = (\d)\. Apply in order, mod 10:((?:\n[A-Z] [-+*] \d)+)", problem)
    assert m, problem
    x = int(m.group(1))
    for i, step in enumerate(m.group(2).strip("\n").split("\n")):
        label, op, k = step.split(" ")
        assert label == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i]
        x = {"+": x + int(k), "-": x - int(k), "*": x * int(k)}[op] % 10
    return x


@pytest.mark.parametrize("difficulty", [2, 3, (2, 7)])
def test_solutions_are_verified(difficulty):
    for ex in toy.make_problems(200, seed=0, difficulty=difficulty) + toy.make_problems(
            16, seed=0, difficulty=difficulty, split="test"):
        assert ex["solution"].endswith(f"\\boxed{{{ex['answer']}}}.")
        assert ex["answer"] == str(_recompute(ex["problem"]))
        assert last_boxed(ex["solution"]) == ex["answer"]
        assert toy.verify(ex)
        lines = ex["solution"].splitlines()
        assert len(lines) == ex["difficulty"] + 1
        x = int(ex["problem"].split(".")[0].removeprefix("x = "))
        for line in lines[:-1]:  # every written step is true arithmetic and a true reduction
            head, rest = line.split(": ")
            lhs, rhs = rest.split(" = ")
            exact, red = rhs.split(" -> ")
            _, op, k = head.split(" ")
            assert lhs == f"{x} {op} {k}" and eval(lhs) == int(exact) and int(exact) % 10 == int(red)
            x = int(red)


def test_verify_rejects_wrong_solutions():
    ex = toy.make_problems(1, seed=0, difficulty=3)[0]
    bad = dict(ex, answer=str((int(ex["answer"]) + 1) % 10))
    assert not toy.verify(bad)
    lines = ex["solution"].splitlines()
    head, red = lines[0].split(" -> ")
    wrong = f"{head} -> {(int(red) + 1) % 10}"  # a wrong reduction that the final answer does not reveal
    assert not toy.verify(dict(ex, solution="\n".join([wrong] + lines[1:])))
    with pytest.raises(ValueError, match="not a toy problem"):
        toy.parse_problem("What is 2 + 2?")


def test_splits_are_disjoint():
    for d in (3, 4):
        train = {x["problem"] for x in toy.make_problems(3000, seed=0, difficulty=d)}
        val = {x["problem"] for x in toy.make_problems(300, seed=0, difficulty=d, split="validation")}
        test = {x["problem"] for x in toy.make_problems(300, seed=0, difficulty=d, split="test")}
        assert train and val and test and not (train & test) and not (train & val) and not (val & test)
        for name, probs in (("train", train), ("validation", val), ("test", test)):
            assert all(toy.split_of(p) == name for p in probs)
    bench = toy.toy_benchmark(512)
    assert len({x["problem"] for x in bench}) == 512  # held-out problems do not repeat
    assert {toy.split_of(x["problem"]) for x in toy.toy_benchmark(64, split="validation")} == {"validation"}
    with pytest.raises(ValueError, match="unique test problems"):
        toy.make_problems(300, difficulty=1, split="test")
    with pytest.raises(ValueError, match="split"):
        toy.make_problems(1, split="valid")


def test_difficulty_grows_with_parameter():
    tok = toy.build_tokenizer()
    prev_steps, prev_len = 0, 0
    for d in (1, 2, 4, 6):
        probs = toy.make_problems(50, seed=0, difficulty=d)
        assert all(p["difficulty"] == d for p in probs)
        steps = np.mean([len(p["solution"].splitlines()) - 1 for p in probs])
        length = np.mean([len(tok.encode(p["solution"])) for p in probs])
        assert steps == d and steps > prev_steps and length > prev_len
        prev_steps, prev_len = steps, length
    mixed = toy.make_problems(300, seed=0, difficulty=(1, 6))
    assert {p["difficulty"] for p in mixed} == set(range(1, 7))


def _chain(lines, x, ops, first=0):
    """Every op line is true arithmetic (correct mod-10 reduction) from the value before it."""
    for i, line in enumerate(lines):
        head, rest = line.split(": ")
        lhs, rhs = rest.split(" = ")
        exact, red = rhs.split(" -> ")
        a, op, k = lhs.split(" ")
        assert head == f"{'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[first + i]} {op} {k}" and (op, int(k)) == ops[first + i]
        assert int(a) == x and eval(lhs) == int(exact) and int(exact) % 10 == int(red)
        x = int(red)
    return x


def test_habit_drops_the_sign_of_negative_results():
    hurt = 0
    for ex in toy.make_problems(300, seed=4, difficulty=4):
        h = toy.habit_example(ex)
        lines = h["solution"].split("\n")
        x = 0
        for line in lines[:-1]:
            exact, red = line.rsplit(" = ", 1)[1].split(" -> ")
            assert int(red) == (abs(int(exact)) % 10)  # -6 -> 6: the sign dropped
            assert int(line.split(": ")[1].split(" ")[0]) == x  # and the chain goes on from there
            x = int(red)
        assert h["answer"] == str(x) and h["problem"] == ex["problem"]
        hurt += h["answer"] != ex["answer"]
    assert 0.35 < hurt / 300 < 0.7  # the habit costs about half of the 4-operation problems


def test_recovery_examples_continue_from_the_habits_mistake():
    """The prefix is the habit's solution up to its first wrong line; the continuation applies the
    remaining operations correctly to the value written there."""
    n = 0
    for ex in toy.make_problems(200, seed=1, difficulty=(1, 5)):
        start, ops = toy.parse_problem(ex["problem"])
        rec = toy.recovery_example(ex)
        if toy.habit_example(ex)["solution"] == ex["solution"]:
            assert rec is None
            continue
        n += 1
        prefix, cont = rec
        bad = prefix.split("\n")[:-1]
        j = len(bad)
        assert prefix.endswith("\n") and bad[:-1] == ex["solution"].split("\n")[:j - 1]  # right until the mistake
        assert bad[-1] != ex["solution"].split("\n")[j - 1]
        x = int(bad[-1].rsplit(" -> ", 1)[1])
        lines = cont["solution"].split("\n")
        end = _chain(lines[:-1], x, ops, first=j)
        assert lines[-1] == f"The answer is \\boxed{{{end}}}."
    assert n > 40


def test_warm_start_stream_mixes_roles_and_recovery():
    import itertools
    tok = toy.build_tokenizer()
    s = toy.ToySettings(teacher_fraction=0.6, recovery_fraction=0.5, teacher_difficulty=(3, 3))
    ref = toy.REFERENCE_HEADER
    n_teacher = n_recovery = 0
    for prompt, completion in itertools.islice(toy.example_stream(tok, s, s.teacher_fraction), 300):
        text = tok.decode(prompt)
        if ref not in text:
            continue
        n_teacher += 1
        answer_turn = text.rsplit("<|im_start|>assistant\n", 1)[1]
        n_recovery += bool(answer_turn.replace("<think>\n\n</think>\n\n", ""))  # lines already written
        assert tok.decode(completion).endswith("}." + toy.EOS_TOKEN)
        assert text.count("\n") > 0 and len([l for l in text.split("\n") if " -> " in l]) >= 3
    assert 140 < n_teacher < 220 and 0.1 < n_recovery / n_teacher < 0.45


def test_data_package_holds_no_toy_and_imports_no_model():
    """The toy lives in jsdr/toy/; jsdr/data/ imports neither the model nor the toy."""
    import ast

    data = Path(__file__).resolve().parent.parent / "jsdr" / "data"
    assert not (data / "toy.py").exists() and not (data / "toy_model").exists()
    for f in data.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [])
            for name in names:
                assert not name.startswith(("jsdr.model", "jsdr.toy", "jsdr.sampling", "jsdr.losses")), (f.name, name)
    assert toy.SHIPPED_DIR == Path(toy.__file__).resolve().parent / "toy_model"


# ---------------------------------------------------------------------------------------------
# tokenizer and chat template


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


def test_tokenizer_round_trip(tokenizer):
    texts = []
    for ex in toy.make_problems(100, seed=9, difficulty=(1, 8)) + toy.toy_benchmark(50):
        texts += [ex["problem"], ex["solution"], toy.student_prompt(ex["problem"]),
                  toy.teacher_prompt(ex["problem"], ex["solution"])]
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False)
        assert tokenizer.decode(ids) == t
    assert len(tokenizer) < 512
    # digits stay single tokens (a space may lead), so numbers are spelled digit by digit
    for tid in tokenizer.encode("1234567 -> 89 = -10", add_special_tokens=False):
        piece = tokenizer.decode([tid])
        assert sum(ch.isdigit() for ch in piece) <= 1
    # text from outside the task (unicode, unknown words) neither crashes nor loses information
    odd = "Ünïcödé ✓ 漢字 tab\there {[<>]} ~`|"
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd
    # special tokens are single ids
    for s in toy.SPECIAL_TOKENS:
        ids = tokenizer.encode(s, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == s
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_student_prompt_is_short(tokenizer):
    # the brief: student prompt + solution <= ~160 tokens, teacher <= ~320 (difficulty up to 6)
    for ex in toy.make_problems(100, seed=2, difficulty=6):
        sp, c = toy.encode_example(tokenizer, ex, "student", False)
        tp, _ = toy.encode_example(tokenizer, ex, "teacher", True)
        assert len(sp) + len(c) <= 160 and len(tp) + len(c) <= 320


def test_chat_template_thinking_switch(tokenizer):
    msgs = [{"role": "user", "content": "Problem: x = 1. Hi"}]
    on = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    default = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = "<|im_start|>user\nProblem: x = 1. Hi<|im_end|>\n<|im_start|>assistant\n"
    assert on == head and default == head
    assert off == head + "<think>\n\n</think>\n\n"
    no_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nProblem: x = 1. Hi<|im_end|>\n"
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert tokenizer.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n")
    # the tokenized form (the call the trainer makes) gives the same ids as encoding the text
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer.encode(off, add_special_tokens=False)
    think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert all(t in ids for t in think)


def test_prompt_structure_follows_paper(tokenizer):
    ex = toy.make_problems(1, seed=0)[0]
    s = toy.student_prompt(ex["problem"])
    t = toy.teacher_prompt(ex["problem"], ex["solution"])
    assert s == f"Problem: {ex['problem']}\n\n{toy.INSTRUCTION}"
    assert toy.INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    i_p, i_h, i_s, i_t, i_i = (t.index(x) for x in (ex["problem"], toy.REFERENCE_HEADER, ex["solution"],
                                                    toy.TRANSITION, toy.INSTRUCTION))
    assert i_p < i_h < i_s < i_t < i_i and t.endswith(toy.INSTRUCTION)


# ---------------------------------------------------------------------------------------------
# warm start and cache (tiny settings)

TINY = dict(steps=3, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
            head_dim=16, batch_rows=2)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("toycache")
    return root, toy.ensure_toy_assets(root, progress=False, **TINY)


def test_ensure_toy_assets_writes_loadable_model(tiny_assets):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jsdr.model.hf import load_params
    from jsdr.model.transformer import forward

    root, d = tiny_assets
    assert d.parent == root and d.name.startswith(f"toy-{toy.TOY_VERSION}-")
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    meta = json.loads((d / "toy_meta.json").read_text())
    assert meta["settings"]["steps"] == 3 and len(meta["train_log"]) >= 1
    assert all(np.isfinite(r["loss"]) for r in meta["train_log"])

    params, cfg, hf = load_params(str(d))
    assert cfg.model_type == "qwen3" and cfg.num_layers == 2 and cfg.hidden_size == 32 and cfg.qk_norm
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.chat_template and len(tok) <= cfg.vocab_size
    ex = toy.toy_benchmark(2)
    prompt, completion = toy.encode_example(tok, ex[0], "teacher", True)
    ids = np.array([prompt + completion], np.int32)
    seg = np.ones_like(ids)
    pos = np.arange(ids.shape[1], dtype=np.int32)[None]
    ours = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), cfg))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)


def test_ensure_toy_assets_reuses_cache_and_versions_path(tiny_assets, tmp_path):
    root, d = tiny_assets
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    again = toy.ensure_toy_assets(root, progress=False, **TINY)
    assert again == d and (d / "model.safetensors").stat().st_mtime_ns == stamp
    assert toy.assets_dir(root).parent == root and toy.assets_dir(root) != d  # the default settings
    assert toy.assets_dir(root, toy.ToySettings(**{**TINY, "steps": 4})) != d
    import os
    old = os.environ.get("JSDR_CACHE")
    os.environ["JSDR_CACHE"] = str(tmp_path)
    try:
        assert toy.assets_dir().parent == tmp_path and toy.assets_dir().name.startswith("toy-v")
    finally:
        if old is None:
            del os.environ["JSDR_CACHE"]
        else:
            os.environ["JSDR_CACHE"] = old


def test_incomplete_cache_is_rebuilt(tmp_path):
    d = toy.assets_dir(tmp_path, toy.ToySettings(**{**TINY, "steps": 1}))
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")  # a stale, half-written directory
    out = toy.ensure_toy_assets(tmp_path, progress=False, **{**TINY, "steps": 1})
    assert out == d and (d / "model.safetensors").exists() and (d / "toy_meta.json").exists()


def test_accuracy_scores_real_generations(tiny_assets):
    """accuracy (library sampler + grader) on the tiny model: its texts equal an independent greedy
    loop (full forward, no cache, one token at a time, cut after the first stop token)."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jsdr.model.hf import load_params
    from jsdr.model.transformer import forward

    _, d = tiny_assets
    params, cfg, _ = load_params(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    probs = toy.toy_benchmark(3)
    stops = {tok.convert_tokens_to_ids(toy.EOS_TOKEN), tok.convert_tokens_to_ids(toy.PAD_TOKEN)}
    for role, thinking in (("student", False), ("teacher", True)):
        res = toy.accuracy(params, cfg, tok, probs, role=role, max_new_tokens=8)
        assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0
        for ex, text in zip(probs, res["texts"]):
            ids = toy.encode_prompt(tok, ex, role, thinking)
            n = len(ids)
            for _ in range(8):
                x = jnp.asarray([ids], jnp.int32)
                logits = forward(params, x, jnp.arange(len(ids))[None], jnp.ones_like(x), cfg)
                ids.append(int(jnp.argmax(logits[0, -1])))
                if ids[-1] in stops:
                    break
            assert text == tok.decode(ids[n:], skip_special_tokens=True)


def test_accuracy_grades_each_answer_against_its_own_problem(tokenizer):
    """A fake sampler answers right for some prompts and wrong for others: accuracy pairs each
    completion with the problem of its prompt (student prompts thinking off, teacher thinking on)."""
    from jsdr.data.prompts import render_student, render_teacher
    from jsdr.sampling import SampleOutput

    probs = toy.toy_benchmark(4)
    right = {0, 3}
    eos = tokenizer.convert_tokens_to_ids(toy.EOS_TOKEN)

    class FakeSampler:
        def __init__(self):
            self.calls = []

        def generate(self, params, lora, prompts, sc):
            self.calls.append((prompts, sc))
            rows = []
            for i, p in enumerate(prompts):
                ex = next(e for e in probs if toy.encode_prompt(tokenizer, e, "student", False) == p
                          or toy.encode_prompt(tokenizer, e, "teacher", True) == p)
                k = probs.index(ex)
                ans = ex["answer"] if k in right else str((int(ex["answer"]) + 1) % 10)
                rows.append(tokenizer.encode(f"A + 1: x \\boxed{{{ans}}}.", add_special_tokens=False) + [eos])
            L = max(map(len, rows))
            toks = np.zeros((len(rows), L), np.int32)
            for i, r in enumerate(rows):
                toks[i, :len(r)] = r
            z = np.zeros(toks.shape, np.float32)
            return SampleOutput(toks, z, z, np.array([len(r) for r in rows], np.int32),
                                np.zeros(len(rows), np.int8), np.arange(len(rows), dtype=np.int32))

    for role, render in (("student", lambda e: render_student(tokenizer, e["problem"], toy.TEMPLATES)),
                         ("teacher", lambda e: render_teacher(tokenizer, e["problem"], e["solution"], toy.TEMPLATES))):
        fake = FakeSampler()
        res = toy.accuracy(None, None, tokenizer, probs, role=role, sampler=fake, batch_size=3, max_new_tokens=7)
        assert res["accuracy"] == 0.5 and res["boxed_rate"] == 1.0
        assert [p for prompts, _ in fake.calls for p in prompts] == [render(e) for e in probs]  # the trainer's rendering
        assert [sc.seed for _, sc in fake.calls] == [0, 3] and all(sc.greedy and sc.max_new_tokens == 7
                                                                   for _, sc in fake.calls)
        assert set(fake.calls[0][1].stop_token_ids) == {eos, tokenizer.convert_tokens_to_ids(toy.PAD_TOKEN)}
    text = tokenizer.decode(toy.encode_prompt(tokenizer, probs[0], "student", False))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and toy.REFERENCE_HEADER not in text
    text = tokenizer.decode(toy.encode_prompt(tokenizer, probs[0], "teacher", True))
    assert text.endswith("<|im_start|>assistant\n") and probs[0]["solution"] in text


def test_pack_prefix_takes_the_longest_prefix_that_fits():
    ex = [([1] * 3, [2] * 4), ([3] * 5, [4] * 5), ([5] * 2, [6] * 2), ([7] * 8, [8] * 8), ([9], [9])]
    batch, used = toy.pack_prefix(ex, rows=2, row_len=12, pad_id=0)
    # first fit: row 0 = ex0 (7) + ex2 (4), row 1 = ex1 (10); ex3 (16 > 12 left) would need a third row
    assert used == 3 and batch.tokens.shape == (2, 12)
    assert batch.tokens[0, :11].tolist() == [1] * 3 + [2] * 4 + [5] * 2 + [6] * 2
    assert batch.segment_ids[0].tolist() == [1] * 7 + [2] * 4 + [0] and batch.segment_ids[1].max() == 1
    assert batch.mask.sum() == 4 + 5 + 2
    batch, used = toy.pack_prefix(ex[4:] + ex[:1], rows=1, row_len=12, pad_id=0)
    assert used == 2
    with pytest.raises(ValueError, match="exceed"):
        toy.pack_prefix([([1] * 10, [2] * 10)] + ex, rows=2, row_len=12, pad_id=0)


def test_warm_start_loss_is_the_masked_cross_entropy(tokenizer):
    """The first logged loss of the warm start equals an independent masked cross-entropy (full
    logits) of the initial weights on the first packed batch of the example stream."""
    import itertools

    import jax
    import jax.numpy as jnp

    from jsdr.model.transformer import forward, init_params

    s = toy.ToySettings(**{**TINY, "steps": 2})
    params, cfg, hf, log = toy.warm_start(s, tokenizer, progress=False)
    assert [r["step"] for r in log] == [0, 1]
    pending = list(itertools.islice(toy.example_stream(tokenizer, s, s.teacher_fraction), s.batch_rows * 8))
    batch, used = toy.pack_prefix(pending, s.batch_rows, s.row_len, tokenizer.convert_tokens_to_ids(toy.PAD_TOKEN))
    assert used >= s.batch_rows
    p0 = init_params(cfg, jax.random.PRNGKey(s.seed))
    logits = forward(p0, jnp.asarray(batch.tokens), jnp.asarray(batch.positions), jnp.asarray(batch.segment_ids), cfg)
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    nll = -np.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]
    # the mask covers exactly the completion tokens: their count is the completions' length
    assert batch.mask.sum() == sum(len(c) for _, c in pending[:used])
    ref = float((nll * batch.mask).sum() / batch.mask.sum())
    assert log[0]["loss"] == pytest.approx(ref, rel=1e-5)
    # the learning rate warms up from 0, so the second step is the first to move the weights
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p0)))


def test_shortened_toy_run_scores_real_samples(tiny_assets, tmp_path):
    """`python -m jsdr.train --method=opsd` on the toy config, shortened (tiny warm start, 2 steps):
    the run completes, and its held-out accuracy equals an independent greedy decode + grading of the
    trained (merged) model."""
    import jax
    from transformers import AutoTokenizer

    from jsdr import train as TR
    from jsdr.model.lora import merge

    _, d = tiny_assets
    repo = Path(__file__).resolve().parent.parent
    cfg, _ = TR.build_config(["--config", str(repo / "configs" / "toy" / "opsd.yaml"), f"--model.path={d}",
                              "--train.steps=2", "--train.per_device_batch=4", "--data.eval_limit=8",
                              "--data.eval_max_new_tokens=40", "--rollout.max_new_tokens=24",
                              f"--train.output_dir={tmp_path / 'run'}"])
    tr = TR.Trainer(cfg, progress=False, log=lambda *a: None)
    summary = tr.run()
    assert summary["step"] == 2 and summary["rollout_tokens"] > 0
    assert 0.0 <= summary["eval/accuracy_after"] <= 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("div_mean" in line for line in lines)

    lora = tr.state.lora
    merged = merge(tr.params, jax.device_get(lora), tr.model.lora_scale)
    tok = AutoTokenizer.from_pretrained(str(d))
    ref = toy.accuracy(merged, tr.mcfg, tok, tr.eval_records, role="student", max_new_tokens=40)
    ours = tr.evaluate(lora)
    assert ours["eval/response_tokens"] > 0
    assert ours["eval/accuracy"] == pytest.approx(ref["accuracy"])
    # the very same responses: the trainer's prompts, LoRA (not merged) and stop tokens vs toy.accuracy
    from jsdr.data.prompts import render_student
    from jsdr.sampling import SamplingConfig
    sc = SamplingConfig(temperature=0.0, max_new_tokens=40, stop_token_ids=tr.stop_ids)
    out = tr.sample(lora, [render_student(tr.tokenizer, r["problem"], tr.cfg.prompts) for r in tr.eval_records], sc,
                    jax.random.PRNGKey(0))
    assert [tok.decode(ids, skip_special_tokens=True) for ids in out.completions()] == ref["texts"]
