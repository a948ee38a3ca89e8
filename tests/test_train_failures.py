"""What a training run does when things go wrong: non-finite steps, torn metrics, a full disk, signals,
changed settings on resume, an earlier run in the directory, TensorBoard after a resume, and the
one-line errors and exit codes of `python -m jsdr.train`."""

import errno
import json
import os
import signal
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsdr import config as C
from jsdr import methods
from jsdr import train as TR
from jsdr.config import ConfigError
from jsdr.errors import RunError
from tests.test_train import _cfg


@pytest.fixture(scope="module")
def assets(toy_tiny_assets):
    return toy_tiny_assets


def quiet(logs=None):
    return (lambda *a: logs.append(" ".join(map(str, a)))) if logs is not None else (lambda *a: None)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# -- non-finite steps -------------------------------------------------------------------------------


def test_nonfinite_step_is_skipped_and_state_unchanged():
    """A NaN anywhere in the loss or gradient leaves weights and AdamW state exactly as they were."""
    def loss_fn(lora, params, batch, key, teacher_lora):
        loss = jnp.sum((lora["w"] * batch["x"]) ** 2)
        return loss, {"m": loss}

    opt, _ = TR.make_optimizer(TR.OptimConfig(learning_rate=0.1), 10)
    step = jax.jit(TR.make_train_step(loss_fn, opt))
    lora = {"w": jnp.ones((3,))}
    state = TR.TrainState(jnp.zeros((), jnp.int32), lora, opt.init(lora))
    good = {"x": jnp.ones((1, 1, 3))}
    state, m = step(state, None, good, jax.random.PRNGKey(0))
    assert float(m["skipped"]) == 0.0
    before = leaves({"lora": state.lora, "opt_state": state.opt_state})
    bad = {"x": jnp.array([[[1.0, np.nan, 1.0]]])}
    new, m = step(state, None, bad, jax.random.PRNGKey(1))
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    after = leaves({"lora": new.lora, "opt_state": new.opt_state})
    assert int(new.step) == int(state.step) + 1  # only the step counter moves
    assert len(before) == len(after) > 3
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    inf_grad = {"x": jnp.array([[[1e30, 1.0, 1.0]]])}  # finite input, overflowing loss and gradient
    _, m = step(state, None, inf_grad, jax.random.PRNGKey(2))
    assert float(m["skipped"]) == 1.0


def test_optimizer_tree_does_not_depend_on_clipping():
    lora = {"w": jnp.ones((3,))}
    a = TR.make_optimizer(TR.OptimConfig(max_grad_norm=1.0), 10)[0].init(lora)
    b = TR.make_optimizer(TR.OptimConfig(max_grad_norm=0.0), 10)[0].init(lora)
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
def test_nonfinite_options_are_rejected(value):
    with pytest.raises(ConfigError, match="optim.learning_rate.*not a finite number"):
        TR.build_config([f"--optim.learning_rate={value}"])


def _nan_loss(tr):
    """Make the trainer's loss non-finite (NaN times the real loss, so gradients are NaN too)."""
    real = tr.method.loss

    def wrapped(*a, **k):
        loss, m = real(*a, **k)
        return loss * jnp.nan, m
    tr.method.loss = wrapped


def test_consecutive_nonfinite_steps_stop_the_run(assets, tmp_path, capsys, monkeypatch):
    logs = []
    cfg = _cfg(assets, "opsd", tmp_path / "run", train={"max_nonfinite_steps": 2, "save_every": 1})
    tr = TR.Trainer(cfg, progress=False, log=quiet(logs))
    init = leaves(tr.state.lora)
    _nan_loss(tr)
    with pytest.raises(RunError, match=r"2 consecutive steps with a non-finite loss or gradient \(last at step 2\)"):
        tr.run()
    assert sum("step skipped, weights unchanged" in m for m in logs) == 2
    for a, b in zip(init, leaves(tr.state.lora)):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "run" / "adapter").exists()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in recs if r["step"] > 0][:1] == [1.0]
    # through main: one line on stderr and exit code 1
    monkeypatch.setattr(methods.get("opsd"), "loss", lambda self, *a, **k: (jnp.float32(np.nan), {}))
    code = TR.main(_argv(assets, tmp_path / "main", "--train.max_nonfinite_steps=1"))
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "non-finite" in err[0], err


def _argv(assets, out, *extra, method="opsd"):
    cfg = _cfg(assets, method, out)
    path = Path(out).parent / f"{Path(out).name}.yaml"
    import yaml
    path.write_text(yaml.safe_dump(C.to_dict(cfg)))
    return ["--config", str(path), *extra]


def error_lines(err: str) -> list[str]:
    """What main printed to stderr, without the progress bars."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("jsdr.")]


# -- torn metrics, full disk, signals ------------------------------------------------------------


def test_torn_metrics_line_is_dropped_on_resume(assets, tmp_path):
    run = tmp_path / "run"
    TR.Trainer(_cfg(assets, "opsd", run), progress=False, log=quiet()).run(stop_after=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # killed in the middle of the write
    logs = []
    tr = TR.Trainer(_cfg(assets, "opsd", run, train={"resume": True}), progress=False, log=quiet(logs))
    assert tr.run()["step"] == 4
    assert any("dropped a torn last line" in m for m in logs), logs
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # step 0: the data counts
    # a bad line in the middle is an error naming the line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage"] + lines[1:]) + "\n")
    with pytest.raises(RunError, match=r"metrics.jsonl line 2: not a JSON metrics record"):
        TR.read_metrics(run / "metrics.jsonl")


def test_full_disk_at_the_final_checkpoint_keeps_the_adapter(assets, tmp_path, monkeypatch, capsys):
    real = TR.Checkpointer.save

    def save(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **k)
    monkeypatch.setattr(TR.Checkpointer, "save", save)
    code = TR.main(_argv(assets, tmp_path / "run", f"--train.output_dir={tmp_path / 'run'}"))
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1, err
    assert "checkpoint of step 4 could not be written" in err[0] and "No space left" in err[0], err
    assert "adapter" in err[0] and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def _signal_at(monkeypatch, signum, where):
    """Send `signum` to this process when the trainer reaches `where` (evaluate, or take: a step's records)."""
    real = getattr(TR.Trainer, where)
    sent = []

    def patched(self, *a, **k):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signum)
        return real(self, *a, **k)
    monkeypatch.setattr(TR.Trainer, where, patched)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stop_writes_checkpoint_and_exits_128_plus_signal(assets, tmp_path, monkeypatch, capsys, signum,
                                                                 code):
    _signal_at(monkeypatch, signum, "take")
    run = tmp_path / "run"
    assert TR.main(_argv(assets, run, f"--train.output_dir={run}")) == code
    out = capsys.readouterr().out
    assert "stopped at step 1; checkpoint of step 1 written" in out
    assert (run / "checkpoints" / "1").exists() and not (run / "adapter").exists()


def test_signal_before_the_first_step_says_no_checkpoint(assets, tmp_path, monkeypatch, capsys):
    _signal_at(monkeypatch, signal.SIGINT, "evaluate")
    run = tmp_path / "run"
    argv = _argv(assets, run, f"--train.output_dir={run}", f"--data.eval={assets / 'train.jsonl'}",
                 "--data.eval_limit=2", "--data.eval_max_new_tokens=4")
    assert TR.main(argv) == 130
    out = capsys.readouterr().out
    assert "no checkpoint yet" in out and "checkpoint written" not in out
    assert not list((run / "checkpoints").glob("*"))
    # the same command starts again from step 0 (same settings, nothing checkpointed)
    monkeypatch.undo()
    assert TR.main(argv) == 0


# -- resume and the run directory -----------------------------------------------------------------


def test_resume_refuses_changed_settings_unless_overridden(assets, tmp_path):
    run = tmp_path / "run"
    TR.Trainer(_cfg(assets, "opsd", run), progress=False, log=quiet()).run(stop_after=2)
    resume = {"train": {"resume": True}}
    with pytest.raises(RunError, match=r"optim.learning_rate: 0.003 -> 0.001.*--train.resume_override=true"):
        TR.Trainer(_cfg(assets, "opsd", run, optim={"learning_rate": 1e-3}, **resume), progress=False,
                   log=quiet()).run()
    with pytest.raises(RunError, match=r"train.steps: 4 -> 6"):
        TR.Trainer(_cfg(assets, "opsd", run, train={"resume": True, "steps": 6}), progress=False,
                   log=quiet()).run()
    with pytest.raises(RunError, match=r"lora.rank cannot change within a run"):
        TR.Trainer(_cfg(assets, "opsd", run, lora={"rank": 8, "alpha": 8},
                        train={"resume": True, "resume_override": True}), progress=False, log=quiet()).run()
    # a changed clip (on -> off) and lr are accepted with the override; the optimizer tree is the same
    logs = []
    over = _cfg(assets, "opsd", run, optim={"learning_rate": 1e-3, "max_grad_norm": 0.0},
                train={"resume": True, "resume_override": True})
    assert TR.Trainer(over, progress=False, log=quiet(logs)).run()["step"] == 4
    assert any("continuing with changed settings" in m and "max_grad_norm" in m for m in logs), logs
    assert json.loads((run / "config.json").read_text())["optim"]["learning_rate"] == 3e-3  # the original
    hist = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in hist] == [0, 2]
    assert hist[1]["changes"]["optim.learning_rate"] == [3e-3, 1e-3]
    # changing what is only logged or scored is fine without the override
    TR.Trainer(_cfg(assets, "opsd", run, optim={"learning_rate": 1e-3, "max_grad_norm": 0.0},
                    train={"resume": True, "log_every": 2}), progress=False, log=quiet()).run()


def test_non_empty_run_dir_is_never_overwritten_silently(assets, tmp_path):
    run = tmp_path / "run"
    TR.Trainer(_cfg(assets, "sft", run, train={"steps": 1}), progress=False, log=quiet()).run()
    with pytest.raises(RunError, match="already holds checkpoints.*--train.overwrite=true"):
        TR.Trainer(_cfg(assets, "sft", run, train={"steps": 1}), progress=False, log=quiet()).run()
    # a directory with another run's files but no checkpoint
    import shutil
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(RunError, match=r"already holds .*metrics.jsonl.* of another run"):
        TR.Trainer(_cfg(assets, "opsd", run, train={"steps": 1}), progress=False, log=quiet()).run()
    (run / "notes.txt").write_text("mine")
    logs = []
    TR.Trainer(_cfg(assets, "opsd", run, train={"steps": 1, "overwrite": True}), progress=False,
               log=quiet(logs)).run()
    assert any("--train.overwrite: removed" in m for m in logs)
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are removed
    assert json.loads((run / "config.json").read_text())["method"] == "opsd"
    with pytest.raises(ConfigError, match="exclude each other"):
        TR.Trainer(_cfg(assets, "opsd", run, train={"resume": True, "overwrite": True}), progress=False,
                   log=quiet()).run()


# -- TensorBoard after a resume ----------------------------------------------------------------------


def read_events(path: Path):
    """(wall_time, step, tag or 'session_start') of a TFRecord event file."""
    from tensorboardX.proto import event_pb2
    out, data = [], path.read_bytes()
    i = 0
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
            out.append((ev.wall_time, ev.step, "session_start"))
        for v in ev.summary.value:
            out.append((ev.wall_time, ev.step, v.tag))
    return out


def visible_steps(tb_dir: Path, tag: str) -> list[int]:
    """The steps of `tag` TensorBoard shows: files in order, a session start at step s purges the
    earlier events at steps >= s."""
    seen: list[int] = []
    for f in sorted(tb_dir.glob("events.*"), key=lambda p: read_events(p)[0][0] if read_events(p) else 0):
        for _, step, t in read_events(f):
            if t == "session_start":
                seen = [s for s in seen if s < step]
            elif t == tag:
                seen.append(step)
    return seen


def test_tensorboard_after_resume_has_every_step_once(assets, tmp_path):
    run = tmp_path / "run"
    TR.Trainer(_cfg(assets, "opsd", run, train={"save_every": 2}), progress=False, log=quiet()).run(stop_after=3)
    # the stop at step 3 saved a checkpoint there; drop it to act as a kill after the step-2 checkpoint
    import shutil
    shutil.rmtree(run / "checkpoints" / "3")
    assert visible_steps(run / "tb", "loss") == [1, 2, 3]  # flushed at every record, nothing lost
    TR.Trainer(_cfg(assets, "opsd", run, train={"resume": True, "save_every": 2}), progress=False,
               log=quiet()).run()
    assert visible_steps(run / "tb", "loss") == [1, 2, 3, 4]


# -- help and errors of main ------------------------------------------------------------------------


def test_help_shows_the_defaults_that_apply(capsys):
    assert TR.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "toy/configs/opsd.yaml" in out and "--optim.learning_rate=0.003" in out and "--train.steps=30" in out
    assert TR.main(["--method=grpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "toy/configs/grpo.yaml" in out and "--rollout.n=8" in out and "--optim.learning_rate=0.001" in out
    assert TR.main(["--model.path=Qwen/Qwen3-1.7B", "--method=grpo", "--help"]) == 0
    out = capsys.readouterr().out  # no toy YAML: the paper's method defaults
    assert "--rollout.temperature=1.2" in out and "--rollout.max_new_tokens=16000" in out


def test_main_turns_expected_errors_into_one_line(assets, tmp_path, capsys):
    cases = [
        (["--model.path=/no/such/model", "--method=sft", f"--train.output_dir={tmp_path / 'a'}"], 1, "/no/such/model"),
        (_argv(assets, tmp_path / "b", f"--data.train={tmp_path / 'missing.jsonl'}",
               f"--train.output_dir={tmp_path / 'b'}"), 1, "missing.jsonl"),
        (["--optim.learning_rate=nan"], 2, "optim.learning_rate"),
        (["--config", str(tmp_path / "nope.yaml")], 2, "nope.yaml"),
    ]
    for argv, want, needle in cases:
        code = TR.main(argv)
        err = error_lines(capsys.readouterr().err)
        assert code == want and len(err) == 1 and needle in err[0], (argv, code, err)


def test_sigkill_mid_run_resumes_to_the_uninterrupted_result(assets, tmp_path):
    """A real `python -m jsdr.train` killed with SIGKILL (no handler runs; possibly in the middle of a
    checkpoint write) resumes from its last complete checkpoint to the metrics and adapter of an
    uninterrupted run."""
    import subprocess
    import sys
    import time

    from jsdr.model.lora import load_peft
    over = {"train": {"steps": 4, "save_every": 1}}
    full = TR.Trainer(_cfg(assets, "opsd", tmp_path / "full", **over), progress=False, log=quiet())
    full.run()
    run = tmp_path / "killed"
    argv = _argv(assets, run, f"--train.output_dir={run}", "--train.steps=4", "--train.save_every=1")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "jsdr.train", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (run / "checkpoints" / "2").exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (run / "checkpoints" / "2").exists(), "the run ended before its second checkpoint"
    resumed = TR.Trainer(_cfg(assets, "opsd", run, train={"steps": 4, "save_every": 1, "resume": True}),
                         progress=False, log=quiet())
    resumed.run()

    def read(p):
        return {r["step"]: r for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}
    a, b = read(tmp_path / "full"), read(run)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]  # step 0: the data counts
    assert a[0] == b[0]
    for step in (1, 2, 3, 4):
        for k in ("loss", "grad_norm", "rollout_tokens"):
            np.testing.assert_allclose(b[step][k], a[step][k], rtol=1e-5, atol=1e-7, err_msg=f"{k}@{step}")
    la, _ = load_peft(tmp_path / "full" / "adapter", full.mcfg)
    lb, _ = load_peft(run / "adapter", full.mcfg)
    for x, y in zip(jax.tree.leaves(la), jax.tree.leaves(lb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)


def test_collapse_and_huge_learning_rate_warn(assets, tmp_path):
    """lr 1e3 used to kill the model silently (grad norm 0, accuracy 0): a learning rate >= 0.1 warns
    at start-up, and a zero gradient with a non-zero loss for 3 steps in a row warns once."""
    logs = []
    tr = TR.Trainer(_cfg(assets, "sft", tmp_path, optim={"learning_rate": 1e3}), progress=False, log=quiet(logs))
    assert any("optim.learning_rate=1000 is unusually large" in m for m in logs), logs
    tr.nonfinite_run = tr.nonfinite_total = tr.zero_grad_run = 0
    for step in range(1, 6):
        tr._check_finite(step, {"skipped": 0.0, "loss": 2.3, "grad_norm": 0.0}, ckpt=None)
    assert sum("gradient norm has been 0 for 3 steps" in m for m in logs) == 1
    tr._check_finite(6, {"skipped": 0.0, "loss": 2.3, "grad_norm": 0.5}, ckpt=None)
    assert tr.zero_grad_run == 0
