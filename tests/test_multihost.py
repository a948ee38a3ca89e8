"""Multi-host runs on this machine: 2 processes x 4 CPU devices (gloo collectives over 127.0.0.1)
against 1 process x 8 devices, the same (data=1, fsdp=8, tensor=1) mesh.

Every run is a real `python -m jsdr.train` / `jsdr.eval` command. Any code path that reads a
non-addressable array on the host (np.asarray, device_get) fails a 2-process run, so these runs are
also the check that the sampler, grading, held-out eval, checkpoints and adapter export are
multi-host safe. JAX checks that host arrays placed on global shardings are equal on every process,
so a host scheduler that drifts between processes fails them too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600
# a few toy steps, 16 sequences per step in 2 micro-batches (per device: 1), short rollouts
TRAIN = ["--train.per_device_batch=1", "--train.grad_accum=2", "--train.save_every=2", "--train.eval_every=0",
         "--data.eval_limit=8", "--data.eval_max_new_tokens=48", "--rollout.max_new_tokens=48",
         "--mesh.num_devices=8", "--optim.warmup_steps=0"]
PER_METHOD = {"sft": [], "grpo": ["--rollout.n=4"], "opsd": []}
STEPS = 4
NOISY = ("Gloo", "cuda_drivers", "cudart_stub", "absl::InitializeLog", "All log messages before")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JSDR_CACHE=str(cache),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _start(module: str, args: list[str], processes: int, cache: Path, extra: list[str] = ()) -> list[subprocess.Popen]:
    """`python -m module args` as `processes` processes (each with 8 / processes CPU devices)."""
    base = [sys.executable, "-m", module, *args, *extra]
    if processes == 1:
        return [subprocess.Popen(base, env=_env(8, cache), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)]
    port = _free_port()
    return [subprocess.Popen(base + [f"--dist.coordinator=127.0.0.1:{port}", f"--dist.num_processes={processes}",
                                     f"--dist.process_id={i}"],
                             env=_env(8 // processes, cache), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(processes)]


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            text, _ = p.communicate()
            text += "\n<killed: timeout>"
        text = "\n".join(ln for ln in text.splitlines() if not any(s in ln for s in NOISY))
        out.append((p.returncode, text))
    return out


def _run(module: str, args: list[str], processes: int, cache: Path) -> None:
    results = _finish(_start(module, args, processes, cache))
    for i, (rc, text) in enumerate(results):
        assert rc == 0, f"process {i}/{processes} of {module} exited {rc}:\n{text[-4000:]}"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _adapter(run_dir: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _same_metrics(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        keys = set(x) - {"time", "tokens_per_s"}
        assert keys == set(y) - {"time", "tokens_per_s"}, (keys, set(y))
        for k in keys:
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])


def _same_adapter(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each method's toy run as 1 process x 8 devices and as 2 processes x 4 devices."""
    root = tmp_path_factory.mktemp("multihost")
    out = {}
    for method, extra in PER_METHOD.items():
        for procs in (1, 2):
            d = root / f"{method}-{procs}"
            _run("jsdr.train", [f"--method={method}", f"--train.steps={STEPS}", f"--train.output_dir={d}",
                                *TRAIN, *extra], procs, root / "cache")
            out[method, procs] = d
    return root, out


@pytest.mark.parametrize("method", list(PER_METHOD))
def test_two_processes_train_like_one(runs, method):
    _, dirs = runs
    one, two = dirs[method, 1], dirs[method, 2]
    _same_metrics(_metrics(one), _metrics(two))
    _same_adapter(_adapter(one), _adapter(two))
    m = _metrics(two)
    assert m[-1]["step"] == STEPS and "eval/accuracy" in m[-1]
    # process 0 alone writes the run's files: one metrics line per step and evaluation
    assert len(m) == STEPS + 2
    assert json.loads((two / "summary.json").read_text())["step"] == STEPS
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_killed_process_stops_the_run_and_resume_on_one_process(runs, tmp_path):
    """A 2-process OPSD run whose process 1 is killed after the step-2 checkpoint: process 0 stops by
    itself (heartbeat timeout) with a message naming the dead task; the run then resumes from that
    checkpoint on ONE process (another process count) and ends with the adapter of the unbroken run."""
    root, dirs = runs
    d = tmp_path / "opsd-killed"
    args = ["--method=opsd", f"--train.steps={STEPS}", f"--train.output_dir={d}", *TRAIN]
    procs = _start("jsdr.train", args, 2, root / "cache", ["--dist.heartbeat_timeout=10"])
    t_end = time.time() + TIMEOUT
    ckpt = d / "checkpoints" / "2"
    while not (ckpt.is_dir() and (ckpt / "meta").exists()) and time.time() < t_end and procs[1].poll() is None:
        time.sleep(0.1)
    assert procs[1].poll() is None, _finish(procs)[1][1][-3000:]
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    (rc0, text0), _ = _finish(procs, timeout=120)
    waited = time.time() - killed_at
    assert rc0 != 0, text0[-3000:]
    assert waited < 90, waited
    assert "heartbeat" in text0 or "unhealthy" in text0 or "Task 1" in text0, text0[-3000:]
    assert not (d / "adapter").exists()

    _run("jsdr.train", args + ["--train.resume=true"], 1, root / "cache")
    _same_adapter(_adapter(dirs["opsd", 1]), _adapter(d))
    _same_metrics(_metrics(dirs["opsd", 1]), _metrics(d))


def test_two_process_eval_matches_one_through_the_launch_script(runs, tmp_path):
    """jsdr.eval started by scripts/launch_local.sh (2 processes) writes the samples and scores of a
    1-process run, byte for byte."""
    root, _ = runs
    args = ["--model=toy", "--benchmarks=toy", "--limit=8", "--sampling.n=2", "--sampling.max_new_tokens=48",
            "--dtype=float32"]
    _run("jsdr.eval", args + [f"--output_dir={tmp_path / 'one'}"], 1, root / "cache")
    env = dict(os.environ, JSDR_CACHE=str(root / "cache"), LOCAL_DEVICES="4")
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    p = subprocess.run(["bash", str(ROOT / "scripts" / "launch_local.sh"), "2", sys.executable, "-m", "jsdr.eval",
                        *args, f"--output_dir={tmp_path / 'two'}"], env=dict(env, JAX_PLATFORMS="cpu"), cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "[0] jsdr: 2 processes, 8 devices" in p.stdout + p.stderr
    assert (tmp_path / "one" / "samples.jsonl").read_text() == (tmp_path / "two" / "samples.jsonl").read_text()
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("one", "two"))
    for r in (a, b):
        r.pop("config"), r.pop("output_dir")
    assert a == b


def test_launch_script_usage():
    p = subprocess.run(["bash", str(ROOT / "scripts" / "launch_local.sh")], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr
