"""jsdr.distributed: the configuration, launcher detection, the single-process pass-through, and the
host exchanges between 2 real processes (gloo on 127.0.0.1): fetch of non-addressable arrays,
on_main's result and error on every process, shared_map's order, agree, and timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from jsdr import distributed as dist
from jsdr import sharding
from jsdr.config import ConfigError
from jsdr.errors import RunError

ROOT = Path(__file__).resolve().parents[1]


def test_config_checks():
    assert dist.DistConfig().coordinator is None
    dist.DistConfig(coordinator="host0:1234", num_processes=2, process_id=1)
    with pytest.raises(ConfigError, match="together"):
        dist.DistConfig(coordinator="host0:1234")
    with pytest.raises(ConfigError, match="process_id"):
        dist.DistConfig(coordinator="host0:1234", num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        dist.DistConfig(coordinator="host0", num_processes=2, process_id=0)
    with pytest.raises(ConfigError, match="timeout"):
        dist.DistConfig(timeout=0)


def test_launcher_detection(monkeypatch):
    for v in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
              "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert dist.detected_launcher() is None
    monkeypatch.setenv("SLURM_NTASKS", "2")  # an sbatch script outside srun: not a step of 2 tasks
    assert dist.detected_launcher() is None
    for v, x in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_PROCID", "0"),
                 ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(v, x)
    assert dist.detected_launcher() == "SLURM"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a single-process run
    assert dist.detected_launcher() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "x")
    assert dist.detected_launcher() == "Open MPI"


def test_single_process_is_the_plain_operation():
    assert not dist.initialize(dist.DistConfig())
    assert dist.is_main() and dist.who() == ""
    x = jax.device_put(np.arange(8.0), sharding.batch_sharding(1, sharding.make_mesh((1, 8, 1)), shape=(8,)))
    out = dist.fetch({"x": x, "y": 3})
    assert isinstance(out["x"], np.ndarray) and out["y"] == 3
    np.testing.assert_array_equal(out["x"], np.arange(8.0))
    assert dist.on_main(lambda: 5) == 5
    with pytest.raises(RunError, match="boom"):
        dist.on_main(lambda: (_ for _ in ()).throw(RunError("boom")))
    assert dist.shared_map(lambda v: v * v, [1, 2, 3]) == [1, 4, 9]
    assert dist.agree(4, min) == 4
    owned = dist.OwnedRecords([{"i": i} for i in range(5)], lambda r: r if r["i"] != 2 else None)
    assert len(owned) == 4 and [r["i"] for r in owned.take([3, 0])] == [4, 0] and owned[1]["i"] == 1
    dist.barrier("x")
    log = []
    dist.quiet_unless_main(log.append)("hi")
    assert log == ["hi"]


def test_num_devices_takes_an_equal_share_of_every_process():
    devs = [types.SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
    assert [d.id for d in sharding._first_devices(devs, 4)] == [0, 1, 4, 5]
    assert [d.id for d in sharding._first_devices(devs[:4], 2)] == [0, 1]
    with pytest.raises(ConfigError, match="do not split over the 2 processes"):
        sharding._first_devices(devs, 1)


SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from jsdr import distributed as dist, sharding
    from jsdr.errors import RunError
    from jsdr.data.datasets import DataError
    pid, port = int(sys.argv[1]), sys.argv[2]
    dist.initialize(dist.DistConfig(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid, timeout=3))
    assert dist.process_count() == 2 and dist.is_main() == (pid == 0) and dist.who() == f" [process {pid}/2]"
    mesh = sharding.make_mesh((1, 8, 1))
    x = jax.make_array_from_callback((16, 3), sharding.batch_sharding(2, mesh, shape=(16, 3)),
                                     lambda i: np.arange(48.0).reshape(16, 3)[i])
    assert not x.is_fully_addressable
    np.testing.assert_array_equal(dist.fetch(x * 2), np.arange(48.0).reshape(16, 3) * 2)
    assert dist.on_main(lambda: ("made on", dist.process_index())) == ("made on", 0)
    try:
        dist.on_main(lambda: (_ for _ in ()).throw(DataError("rows.jsonl line 3: no 'answer' field")))
        raise SystemExit("on_main did not raise")
    except DataError as e:
        assert "rows.jsonl line 3" in str(e), e
    assert dist.shared_map(lambda v: (v, dist.process_index()), list(range(5))) == \\
        [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]
    assert dist.agree(10 + pid, min) == 10 and dist.agree(10 + pid, max) == 11
    recs = [{"i": i, "keep": i % 3 != 0} for i in range(10)]  # kept: 1, 2, 4, 5, 7, 8
    owned = dist.OwnedRecords(recs, lambda r: dict(r, by=dist.process_index()) if r["keep"] else None)
    assert len(owned) == 6 and sorted(owned._own) == ([2, 4, 8] if pid == 0 else [1, 5, 7])
    got = owned.take([5, 0, 3, 5])
    assert [g["i"] for g in got] == [8, 1, 5, 8] and [g["by"] for g in got] == [0, 1, 1, 0], got
    dist.barrier("before the timeout")
    if pid == 1:  # process 0 never answers this exchange: a RunError after dist.timeout, not a hang
        t = time.time()
        try:
            dist.on_main(lambda: 1, "an exchange process 0 skips")
            raise SystemExit("no timeout")
        except RunError as e:
            assert "an exchange process 0 skips" in str(e) and "3 s" in str(e), e
            assert time.time() - t < 30
    print("ok", pid, flush=True)
""")


def test_two_process_exchanges(tmp_path):
    script = tmp_path / "exchanges.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]
