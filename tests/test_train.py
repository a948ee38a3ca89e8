"""`python -m jsdr.train`: the three methods end to end on a tiny model, overfitting, exact resume,
the paper configs, and the errors a user sees."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jsdr import config as C
from jsdr import methods, run, sharding, toy
from jsdr import train as TR
from jsdr.config import ConfigError
from jsdr.errors import RunError
from jsdr.losses.grpo import policy_logprobs
from jsdr.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(toy_tiny_assets):
    return toy_tiny_assets


def _cfg(assets, method, out, **over):
    data = {
        "method": method, "seed": 1,
        "model": {"path": str(assets / "model"), "dtype": "float32", "remat": "full"},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(assets / "train.jsonl"), "max_prompt_tokens": 400},
        "prompts": {"teacher": toy.TEACHER_PROMPT},
        "optim": {"learning_rate": 3e-3},
        "train": {"steps": 4, "per_device_batch": 1, "grad_accum": 2, "output_dir": str(out), "save_every": 2,
                  "seq_bucket": 32},
        "rollout": {"max_new_tokens": 12, "n": 4 if method == "grpo" else 1, "temperature": 1.0},
        "mesh": {"num_devices": 1},
    }
    data = C.merge_dicts(C.merge_dicts(methods.get(method).defaults, data), over)
    return C.from_dict(TrainConfig, data)


@pytest.mark.parametrize("method", ["sft", "grpo", "opsd", "opsd-ema"])
def test_overfit_fixed_batch_one_device(assets, tmp_path, method):
    """The loss of each method goes down when the same batch is stepped on repeatedly."""
    method, _, teacher = method.partition("-")
    over = {"opsd": {"teacher": teacher}} if teacher else {}
    tr = TR.Trainer(_cfg(assets, method, tmp_path, train={"grad_accum": 1, "per_device_batch": 4},
                         optim={"learning_rate": 1e-2}, lora={"rank": 16, "alpha": 32}, **over),
                    progress=False, log=lambda *a: None)
    assert tr.mesh.devices.size == 1
    step_batch = tr.method.make_batch(tr.take(0), tr.state.lora, jax.random.PRNGKey(0))
    batch = run.place_batch(step_batch.batch, tr.mesh, leading=1)
    adv = np.array([[1.0, -1.0, 0.5, -0.5]], np.float32)
    if method == "grpo":  # rewards of a random model are all 0: give the completions distinct advantages
        batch = batch._replace(advantages=batch.advantages + adv)

    def completion_logp(lora):  # mean log-prob of each completion's tokens under `lora`
        mb = jax.tree.map(lambda x: x[0], batch)
        lp = policy_logprobs(lora, tr.params, mb, model=tr.model, temperature=tr.cfg.rollout.temperature)
        return np.asarray((lp * mb.mask).sum(-1) / np.maximum(mb.mask.sum(-1), 1))
    before = completion_logp(tr.state.lora) if method == "grpo" else None
    losses = []
    with sharding.use_mesh(tr.mesh):
        for i in range(25):
            tr.state, m = tr.step_fn()(tr.state, tr.params, batch, jax.random.PRNGKey(i))
            losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    if teacher == "ema":  # the EMA tree follows the student: decay * ema + (1 - decay) * lora, step by step
        d = tr.cfg.opsd.ema_decay
        assert 0 < float(jax.numpy.abs(jax.tree.leaves(tr.state.ema)[1]).max()) \
            < float(jax.numpy.abs(jax.tree.leaves(tr.state.lora)[1]).max()) * (1 - d ** 25) * 1.01 + 1e-9
    if method == "grpo":
        # on-policy (old = current log-probs): the surrogate is -mean(advantage) at every step, and the
        # completions with a positive advantage become more likely, those with a negative one less
        np.testing.assert_allclose(losses, losses[0], rtol=1e-5)
        change = completion_logp(tr.state.lora) - before
        assert change[0] > 0 and change[2] > 0 and change[1] < 0 and change[3] < 0, change
    else:
        assert losses[-1] < 0.9 * losses[0], losses


def test_opsd_runs_on_8_devices_and_resumes_exactly(assets, tmp_path):
    """An uninterrupted 4-step run == a run stopped after 2 steps and resumed, at every later step."""
    over = {"mesh": {"num_devices": None}, "train": {"per_device_batch": 1, "grad_accum": 2}}
    full = TR.Trainer(_cfg(assets, "opsd", tmp_path / "full", **over), progress=False, log=lambda *a: None)
    assert full.mesh.devices.size == 8 and full.batch == 16
    summary = full.run()
    assert summary["step"] == 4 and summary["rollout_tokens"] > 0
    assert (tmp_path / "full" / "adapter" / "adapter_config.json").exists()

    part = tmp_path / "part"
    first = TR.Trainer(_cfg(assets, "opsd", part, **over), progress=False, log=lambda *a: None)
    first.run(stop_after=2)
    with pytest.raises(RunError, match="already holds checkpoints"):
        TR.Trainer(_cfg(assets, "opsd", part, **over), progress=False, log=lambda *a: None).run()
    resumed = TR.Trainer(_cfg(assets, "opsd", part, **C.merge_dicts(over, {"train": {"resume": True}})),
                         progress=False, log=lambda *a: None)
    resumed.run()

    def read(p):
        return {r["step"]: r for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}
    a, b = read(tmp_path / "full"), read(part)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]  # step 0: the data counts
    for step in (3, 4):
        for k in ("loss", "divergence", "grad_norm", "rollout_tokens", "rollout/length"):
            if k in a[step]:
                np.testing.assert_allclose(b[step][k], a[step][k], rtol=1e-5, atol=1e-6, err_msg=f"{k}@{step}")
    for x, y in zip(jax.tree.leaves(full.state.lora), jax.tree.leaves(resumed.state.lora)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_grpo_and_sft_run_end_to_end_on_8_devices(assets, tmp_path):
    for method in ("sft", "grpo"):
        over = {"mesh": {"num_devices": None}, "train": {"steps": 2, "grad_accum": 1}}
        s = TR.Trainer(_cfg(assets, method, tmp_path / method, **over), progress=False, log=lambda *a: None).run()
        assert s["step"] == 2 and np.isfinite(s["loss"])
        if method == "grpo":
            assert "reward/mean" in s and s["rollout_tokens"] > 0


# -- the paper's tables (paper-notes: seed tables 4 and 6), held here as numbers -------------------

PAPER = {  # method: (lr, per-device batch, grad accumulation, effective batch, max new tokens, n, temperature)
    "sft": (2e-5, 2, 4, 64, None, None, None),
    "grpo": (2e-5, 1, 4, 32, 16000, 8, 1.2),
    "opsd-v1": (2e-5, 1, 4, 32, 2048, 1, 1.2),
    "opsd-v3": (5e-6, 1, 4, 32, 1024, 1, 1.2),
}
MODELS = {"1.7b": "Qwen/Qwen3-1.7B", "4b": "Qwen/Qwen3-4B", "8b": "Qwen/Qwen3-8B"}


@pytest.mark.parametrize("name", sorted(f"{m}-qwen3-{s}" for m in PAPER for s in MODELS))
def test_paper_configs_match_the_tables(name):
    path = REPO / "configs" / "paper" / f"{name}.yaml"
    cfg, _ = TR.build_config(["--config", str(path)])
    method_key, size = name.rsplit("-qwen3-", 1)
    lr, pdb, accum, eff, max_new, n, temp = PAPER[method_key]
    assert cfg.model.path == MODELS[size]
    assert cfg.optim.learning_rate == lr
    assert (cfg.train.per_device_batch, cfg.train.grad_accum, cfg.train.effective_batch) == (pdb, accum, eff)
    assert pdb * 8 * accum == eff  # 8 GPUs
    assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == 8
    assert (cfg.lora.rank, cfg.lora.alpha) == (64, 128)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}
    assert cfg.model.dtype == "bfloat16"
    assert cfg.data.train == "siyanzhao/Openthoughts_math_30k_opsd"
    if method_key == "sft":
        assert cfg.method == "sft" and cfg.data.max_length == 16000
    else:
        assert (cfg.rollout.max_new_tokens, cfg.rollout.n, cfg.rollout.temperature) == (max_new, n, temp)
    if method_key == "grpo":
        assert cfg.grpo.beta == 0.0
    if method_key.startswith("opsd"):
        assert cfg.opsd.teacher == "fixed" and cfg.opsd.variant == "full"
        assert cfg.opsd.beta == (0.5 if method_key == "opsd-v1" else 0.0)
        assert cfg.prompts.student_thinking is False and cfg.prompts.teacher_thinking is True
        assert cfg.rollout.top_p == 0.95


# -- errors ---------------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"opsd.*beta"):
        TR.build_config(["--model.path=x", "--opsd.beta=2"])
    with pytest.raises(ConfigError, match=r"method: 'ppo' is not allowed; choose one of \['sft', 'grpo', 'opsd'\]"):
        TR.build_config(["--method=ppo", "--model.path=x"])
    with pytest.raises(ConfigError, match=r"unknown option --lora.rnk"):
        TR.build_config(["--lora.rnk=3"])
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  schedule: exponential\n")
    with pytest.raises(ConfigError, match=r"c.yaml: optim.schedule: 'exponential' is not allowed"):
        TR.build_config(["--config", str(p)])


def test_batch_must_divide_and_match_effective_batch(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"effective_batch=10 but per_device_batch \(1\) x data-parallel devices "
                                          r"\(1\) x grad_accum \(2\) = 2"):
        TR.Trainer(_cfg(assets, "sft", tmp_path, train={"effective_batch": 10}), progress=False)
    with pytest.raises(ConfigError, match="not a multiple of rollout.n=4"):
        TR.Trainer(_cfg(assets, "grpo", tmp_path, train={"per_device_batch": 1, "grad_accum": 2}), progress=False)
    with pytest.raises(ConfigError, match=r"mesh: \(data=3, fsdp=1, tensor=1\) uses 3 devices but 8 are available"):
        TR.Trainer(_cfg(assets, "sft", tmp_path, mesh={"num_devices": None, "data": 3, "fsdp": 1}), progress=False)


def test_malformed_data_file_names_file_and_row(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"problem": "p", "solution": "s", "answer": "1"})
    bad.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(Exception, match=r"bad.jsonl line 3"):
        TR.Trainer(_cfg(assets, "sft", tmp_path, data={"train": str(bad)}), progress=False)


def test_overlong_examples_are_counted_per_reason(assets, tmp_path):
    """Every drop and cut is counted per reason, said in the log with the option that decides it, and
    kept for metrics.jsonl's step-0 record (trainer.data_counts)."""
    full = TR.Trainer(_cfg(assets, "opsd", tmp_path), progress=False, log=lambda *a: None)
    n = len(full.records)
    assert full.data_counts == {"data/records": n, "data/kept": n}
    teachers = sorted(len(r["teacher_ids"]) for r in full.records)
    t_limit = teachers[len(teachers) // 2]
    logs = []
    tr = TR.Trainer(_cfg(assets, "opsd", tmp_path, data={"max_teacher_prompt_tokens": t_limit}),
                    progress=False, log=logs.append)
    over = sum(t > t_limit for t in teachers)
    assert 0 < over < n and len(tr.records) == n - over
    assert tr.data_counts == {"data/records": n, "data/kept": n - over, "data/dropped/teacher_prompt_too_long": over}
    line = next(m for m in logs if m.startswith("data:"))
    assert f"{over} dropped teacher_prompt_too_long (data.max_teacher_prompt_tokens={t_limit})" in line, line
    with pytest.raises(ConfigError, match="no example of"):  # the student prompts of the toy are all one length
        TR.Trainer(_cfg(assets, "opsd", tmp_path, data={"max_prompt_tokens": 10}), progress=False,
                   log=lambda *a: None)
    cut = TR.Trainer(_cfg(assets, "opsd", tmp_path, data={"max_teacher_prompt_tokens": t_limit,
                                                          "overlong": "truncate"}), progress=False,
                     log=lambda *a: None)
    assert cut.data_counts["data/truncated/teacher_prompt_too_long"] == over and len(cut.records) == n
    assert max(len(r["teacher_ids"]) for r in cut.records) <= t_limit


def test_epochs_set_the_run_length_and_stop_at_ends_it_early(assets, tmp_path):
    """train.epochs: ceil(epochs x records / records per step) steps, over which the schedule decays;
    train.stop_at ends the run there (adapter and summary written) without changing the schedule."""
    with pytest.raises(ConfigError, match="exclude each other"):
        _cfg(assets, "sft", tmp_path, train={"epochs": 2})  # _cfg sets train.steps=4
    cfg = _cfg(assets, "sft", tmp_path, train={"steps": None, "epochs": 0.5, "stop_at": 2},
               optim={"schedule": "linear"})
    tr = TR.Trainer(cfg, progress=False, log=lambda *a: None)
    per_step = tr.records_per_step
    assert tr.steps == -(-len(tr.records) // (2 * per_step)) and tr.steps > 2 and tr.end == 2
    assert float(tr.schedule(tr.steps)) == 0.0 and float(tr.schedule(1)) > 0.0
    summary = tr.run()
    assert summary["step"] == 2 and (tmp_path / "adapter" / "adapter_config.json").exists()
    m = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["step"] == 0 and m[0]["data/kept"] == len(tr.records)  # the length policy's counts at step 0
    np.testing.assert_allclose(m[-1]["lr"], float(tr.schedule(1)), rtol=1e-6)  # the whole run's schedule
    assert TR.LoopConfig(epochs=3).total_steps(10, 4) == 8 and TR.LoopConfig().total_steps(10, 4) == 100
    assert TR.LoopConfig(epochs=1).total_steps(10, 4, updates_per_batch=2) == 6


def test_help_lists_options(capsys):
    assert TR.main(["--model.path=Qwen/Qwen3-4B", "--help"]) == 0  # not the toy: the paper's method defaults
    out = capsys.readouterr().out
    for opt in ("--method=opsd", "--optim.learning_rate=2e-05", "--opsd.beta=0.5", "--rollout.top_p",
                "--lora.rank=64", "--train.resume=False"):
        assert opt in out, opt


# -- the pure step against hand computation ------------------------------------------------------------


def test_step_averages_micro_batches_and_moves_the_ema_to_the_updated_lora():
    """One step with 2 micro-batches of a quadratic loss: the gradient (and its norm), the loss metric, the
    AdamW update and the EMA teacher, each against numpy."""
    import jax.numpy as jnp

    def loss_fn(lora, params, batch, key, teacher_lora):
        loss = jnp.mean((batch["x"] @ lora["w"] - batch["y"]) ** 2)
        return loss, {"teacher_w0": teacher_lora["w"][0]}

    rs = np.random.RandomState(0)
    x, y = rs.randn(2, 3, 4).astype(np.float32), rs.randn(2, 3).astype(np.float32)  # [accum, micro, ...]
    w0 = rs.randn(4).astype(np.float32)
    ema0 = rs.randn(4).astype(np.float32)
    lr, decay = 0.01, 0.9
    opt, _ = TR.make_optimizer(TR.OptimConfig(learning_rate=lr, max_grad_norm=0.0), 10)
    state = TR.TrainState(jnp.zeros((), jnp.int32), {"w": jnp.asarray(w0)}, opt.init({"w": jnp.asarray(w0)}),
                          {"w": jnp.asarray(ema0)})
    step = jax.jit(TR.make_train_step(loss_fn, opt, ema_decay=decay))
    new, m = step(state, None, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, jax.random.PRNGKey(0))

    grads = [2 * x[i].T @ (x[i] @ w0 - y[i]) / 3 for i in range(2)]
    g = (grads[0] + grads[1]) / 2  # the mean over micro-batches, not the sum
    losses = [np.mean((x[i] @ w0 - y[i]) ** 2) for i in range(2)]
    np.testing.assert_allclose(float(m["loss"]), np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(float(m["teacher_w0"]), ema0[0], rtol=1e-6)  # the loss saw the pre-step EMA
    # AdamW step 1 (bias-corrected): w - lr * g / (|g| + eps)
    want_w = w0 - lr * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(np.asarray(new.lora["w"]), want_w, rtol=1e-5, atol=1e-7)
    # the EMA moves towards the updated LoRA (not the pre-step one)
    np.testing.assert_allclose(np.asarray(new.ema["w"]), decay * ema0 + (1 - decay) * want_w, rtol=1e-5, atol=1e-7)
    assert int(new.step) == 1 and float(m["skipped"]) == 0.0


def test_mesh_rule_overrides_from_the_command_line_reach_the_weights(assets, tmp_path):
    """--mesh.rules changes how the trainer lays out the base weights (here: the embedding replicated
    instead of split over fsdp), with nothing else changed."""
    over = {"mesh": {"num_devices": None}}
    default = TR.Trainer(_cfg(assets, "sft", tmp_path / "a", **over), progress=False, log=lambda *a: None)
    emb = lambda tr: tr.params["embed_tokens"]["embedding"].sharding.spec  # noqa: E731
    assert "fsdp" in str(emb(default))
    cfg, _ = TR.build_config(["--config", str(_yaml(assets, tmp_path, "sft", **over)),
                              "--mesh.rules={embed: null}"])
    assert cfg.mesh.rules == {"embed": None}
    tr = TR.Trainer(cfg, progress=False, log=lambda *a: None)
    assert "fsdp" not in str(emb(tr))
    with pytest.raises(ConfigError, match=r"mesh.rules: unknown logical axis name \['embd'\]"):
        TR.build_config(["--model.path=x", "--mesh.rules={embd: null}"])


def _yaml(assets, tmp_path, method, **over):
    import yaml
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(C.to_dict(_cfg(assets, method, tmp_path / "run", **over))))
    return path


def test_optimizer_state_and_ema_live_in_the_lora_sharding(assets, tmp_path):
    """AdamW moments and the EMA tree are created in the sharding of the LoRA leaf they mirror (never
    replicated on every device); the per-device bytes of the moments equal the LoRA's."""
    over = {"mesh": {"num_devices": None}, "opsd": {"teacher": "ema"}, "lora": {"rank": 8, "alpha": 16}}
    tr = TR.Trainer(_cfg(assets, "opsd", tmp_path, **over), progress=False, log=lambda *a: None)
    per_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    lora_bytes = per_device(tr.state.lora)
    total = sum(x.nbytes for x in jax.tree.leaves(tr.state.lora))
    assert lora_bytes < total  # split over the 8 devices somewhere
    adam = tr.state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu, tr.state.ema):
        for m, lo in zip(jax.tree.leaves(moments), jax.tree.leaves(tr.state.lora)):
            assert m.sharding == lo.sharding
        assert per_device(moments) == lora_bytes


def test_grpo_dynamic_sampling_and_num_iterations_through_the_trainer(assets, tmp_path, monkeypatch):
    """A GRPO run with dynamic sampling and num_iterations=2: the sampler runs on every other step, the
    first update of a batch has ratio exactly 1 (old log-probs = the sampling adapter's, by the training
    forward) and the second does not, and the refills of equal-reward groups are in metrics.jsonl."""
    import zlib

    from jsdr.data.rewards import GradeResult

    cfg = _cfg(assets, "grpo", tmp_path, train={"per_device_batch": 4, "grad_accum": 2, "save_every": 100},
               optim={"learning_rate": 3e-2},
               grpo={"dynamic_sampling": True, "max_refills": 2, "num_iterations": 2})
    tr = TR.Trainer(cfg, progress=False, log=lambda *a: None)
    informative = {r["problem"] for r in tr.records if zlib.crc32(r["problem"].encode()) % 3 == 0}
    assert 0 < len(informative) < len(tr.records)

    def grades(out, records, n):  # a grader with a known answer: mixed rewards only for `informative` prompts
        return [GradeResult(records[i // n]["problem"] in informative and i % 2 == 0, None)
                for i in range(len(records) * n)]
    monkeypatch.setattr(tr.method, "grades", grades)
    built = []
    make_batch = tr.method.make_batch
    monkeypatch.setattr(tr.method, "make_batch", lambda *a: built.append(1) or make_batch(*a))
    tr.run()
    m = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert sorted(m) == [0, 1, 2, 3, 4] and len(built) == 2  # 4 steps, 2 rollout batches
    for first, second in ((1, 2), (3, 4)):
        np.testing.assert_allclose(m[first]["ratio_mean"], 1.0, atol=1e-6)  # exact old log-probs
        assert abs(m[second]["ratio_mean"] - 1.0) > 1e-4  # trained once on the batch: the ratio moved
        assert m[second]["rollout_tokens"] == m[first]["rollout_tokens"]  # no new rollouts on the 2nd update
        assert m[second]["rollout/refills"] == m[first]["rollout/refills"]
    assert m[3]["rollout_tokens"] > m[2]["rollout_tokens"]
    groups = tr.records_per_step  # 2 prompts per step
    for s in (1, 3):
        dropped, refills, padded = (m[s][f"rollout/{k}"] for k in ("groups_dropped", "refills", "groups_padded"))
        assert 0 <= refills <= 2 and 0 <= padded <= groups
        if refills:  # a refill happened because a group had equal rewards
            assert dropped >= 1
        # the batch trained on: every informative group kept has reward mean 0.5; padded groups reward 0
        np.testing.assert_allclose(m[s]["reward/mean"], 0.5 * (groups - padded) / groups, atol=1e-6)
    assert sum(m[s]["rollout/refills"] for s in (1, 3)) >= 1, m  # the toy data made at least one refill
