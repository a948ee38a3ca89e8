"""Several processes (hosts) as one run, through JAX's multi-controller runtime.

jsdr runs the same program on every process (SPMD): one global mesh over all processes' devices,
the same jitted programs, and the same host-side logic (data order, rollout scheduling, batch
building), which therefore makes the same decisions everywhere. This module holds what differs:

    initialize(DistConfig(...))   jax.distributed from --dist.* flags, or detected (SLURM, Open MPI)
    is_main()                     process 0: the one that writes metrics, adapters, samples, summaries
    fetch(tree)                   host numpy of any array, also one whose shards live on other hosts
    on_main(fn)                   fn runs on process 0 only; its result (or its error) reaches all
    shared_map(fn, items)         each item computed once, on one process; every process gets all results
    OwnedRecords(records, fn)     a data set prepared (tokenized) and held in shares; take() gathers a step's
    agree(value, min)             one value for all processes (e.g. a memory budget read per device)
    barrier(name)                 wait for every process (with a timeout, never forever)

With one process every function is the plain local operation, so single-host code pays nothing.

Faults: the coordination service watches every process's heartbeat; when one dies, the others are
stopped with a message naming the task within `heartbeat_timeout` seconds; every host exchange here
waits at most `timeout` seconds and then raises a `RunError` that says which exchange timed out.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Sequence
from typing import Any, Callable

import jax
import numpy as np

from jsdr.config import check, field
from jsdr.errors import JsdrError, RunError

# launchers whose process layout jax.distributed.initialize() detects itself: (name, the variable with
# the process count, the variables jax's detection needs)
_DETECTED = (("SLURM", "SLURM_NTASKS", ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")),
             ("Open MPI", "OMPI_COMM_WORLD_SIZE", ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_RANK")))


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Multi-process (multi-host) runs. Without flags a run is single-process, unless a SLURM or
    Open MPI job of several tasks is detected (then jax.distributed detects the rest)."""

    coordinator: str | None = field(None, "HOST:PORT of process 0's coordination service (every process passes "
                                          "the same); None = detect from SLURM / Open MPI, or run alone")
    num_processes: int | None = field(None, "processes in the run (with coordinator)")
    process_id: int | None = field(None, "this process's index, 0 .. num_processes-1 (with coordinator)")
    auto: bool = field(True, "detect a SLURM / Open MPI job of several tasks when no coordinator is given")
    init_timeout: int = field(300, "seconds to wait for every process to join at start")
    heartbeat_timeout: int = field(100, "seconds without a heartbeat after which a process counts as dead and "
                                        "the others stop")
    timeout: int = field(1800, "seconds any host-side exchange (barrier, shared results) waits before failing")

    def __post_init__(self):
        given = [k for k in ("coordinator", "num_processes", "process_id") if getattr(self, k) is not None]
        check(len(given) in (0, 3), given[0] if given else "coordinator",
              "give --dist.coordinator, --dist.num_processes and --dist.process_id together (or none of them)")
        if self.num_processes is not None:
            check(self.num_processes >= 1, "num_processes", "must be >= 1")
            check(0 <= self.process_id < self.num_processes, "process_id",
                  f"must be in 0 .. {self.num_processes - 1} (got {self.process_id})")
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            check(bool(host) and port.isdigit(), "coordinator", f"expected HOST:PORT, got {self.coordinator!r}")
        for k in ("init_timeout", "heartbeat_timeout", "timeout"):
            check(getattr(self, k) > 0, k, "must be > 0 seconds")


_STATE: dict = {"timeout": 1800, "calls": 0, "mine": []}


def detected_launcher() -> str | None:
    """The name of a launcher that started this process as one of several tasks, if any."""
    for name, count, needed in _DETECTED:
        try:
            if int(os.environ.get(count, "1")) > 1 and all(v in os.environ for v in needed):
                return name
        except ValueError:
            continue
    return None


def initialize(cfg: DistConfig = DistConfig(), log=print) -> bool:
    """Start jax.distributed when the configuration or the environment asks for several processes
    (idempotent; call before anything touches a device). Returns whether the run is multi-process."""
    _STATE["timeout"] = cfg.timeout
    if _client() is not None:
        return jax.process_count() > 1
    launcher = None
    if cfg.coordinator is None:
        launcher = detected_launcher() if cfg.auto else None
        if launcher is None:
            return False
    elif cfg.num_processes == 1:
        return False
    # cross-process collectives of CPU devices go through gloo (GPUs use NCCL whatever this says)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=cfg.init_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    try:
        if cfg.coordinator is None:
            jax.distributed.initialize(**kwargs)
        else:
            jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id, **kwargs)
    except Exception as e:  # noqa: BLE001 - the runtime raises several types for an unreachable coordinator
        where = cfg.coordinator or f"the {launcher} environment"
        raise RunError(f"jax.distributed could not start ({where}; process {cfg.process_id}): "
                       f"{type(e).__name__}: {_first_line(e)}") from None
    if is_main():
        log(f"jsdr: {jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} on this process), coordinator {cfg.coordinator or launcher}")
    return jax.process_count() > 1


def _client():
    from jax._src import distributed as _dist
    return _dist.global_state.client


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    return jax.process_index() == 0


def who() -> str:
    """' [process I/N]' in a multi-process run ('' alone): for error lines that every process prints."""
    return f" [process {jax.process_index()}/{jax.process_count()}]" if _client() is not None else ""


def quiet_unless_main(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` on process 0, a no-op elsewhere (one copy of every message, not one per process)."""
    return log if is_main() else (lambda *_a, **_k: None)


def local_device(mesh=None):
    """This process's first device of `mesh` (default: of all devices): the one to read memory
    statistics from (another process's device is not addressable here)."""
    devices = list(np.asarray(mesh.devices).flat) if mesh is not None else jax.devices()
    me = jax.process_index()
    return next((d for d in devices if d.process_index == me), devices[0])


# ---------------------------------------------------------------------------------------------
# device arrays -> host


def fetch(tree: Any) -> Any:
    """Host numpy copies of every array leaf of `tree`, the whole (global) value on every process.
    An array whose shards all live here (or that is replicated) is read directly; one with shards on
    other processes is all-gathered first. Everything else passes through."""
    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------
# host-side exchanges through the coordination service's key-value store


def _key(tag: str) -> str:
    _STATE["calls"] += 1  # every process makes the same calls in the same order (SPMD host logic)
    return f"jsdr/{_STATE['calls']}/{tag}"


def _timeout_ms() -> int:
    return int(_STATE["timeout"] * 1000)


def _get(key: str, what: str) -> bytes:
    try:
        return _client().blocking_key_value_get_bytes(key, _timeout_ms())
    except Exception as e:  # noqa: BLE001 - a timeout, or the service stopping because a process died
        raise RunError(f"{what}: no answer from another process within {_STATE['timeout']} s (key {key}): "
                       f"{type(e).__name__}: {_first_line(e)}") from None


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (at most dist.timeout seconds)."""
    if process_count() == 1:
        return
    key = _key(name)
    try:
        _client().wait_at_barrier(key, _timeout_ms())
    except Exception as e:  # noqa: BLE001
        raise RunError(f"barrier {name!r}: not every process arrived within {_STATE['timeout']} s: "
                       f"{type(e).__name__}: {_first_line(e)}") from None


class _Failed:
    def __init__(self, e: BaseException):
        self.type, self.message = type(e), str(e)
        self.key = getattr(e, "key", None)


def _raise(f: _Failed):
    # the same error class where it can be rebuilt from its message (jsdr's errors and OSError), else RunError
    if issubclass(f.type, (JsdrError, OSError)):
        try:
            err = f.type(f.message)
        except Exception:  # noqa: BLE001 - a constructor with other arguments
            err = RunError(f.message)
    else:
        err = RunError(f"process 0: {f.type.__name__}: {f.message}")
    if f.key is not None and isinstance(err, JsdrError):
        err.key = f.key
    raise err


def on_main(fn: Callable[[], Any], name: str = "on_main") -> Any:
    """fn() on process 0 only; every process returns its result, or raises its error (file system
    work: removing, creating and reading run files exactly once). The result must pickle."""
    if process_count() == 1:
        return fn()
    key = _key(name)
    if is_main():
        try:
            result = fn()
            payload = ("ok", result)
        except Exception as e:  # noqa: BLE001 - shipped to every process, then raised everywhere
            payload, result = ("err", _Failed(e)), e
        _client().key_value_set_bytes(key, pickle.dumps(payload))
        if payload[0] == "err":
            raise result
        return result
    kind, value = pickle.loads(_get(key, name))
    if kind == "err":
        _raise(value)
    return value


def shared_map(fn: Callable[[Any], Any], items: Sequence[Any], name: str = "shared_map") -> list:
    """[fn(x) for x in items], each computed on one process (item i on process i mod count) and the
    results exchanged: every process returns the whole list (e.g. grading each sample once)."""
    P = process_count()
    if P == 1:
        return [fn(x) for x in items]
    me = process_index()
    try:
        mine = ("ok", [fn(x) for x in items[me::P]])
    except Exception as e:  # noqa: BLE001
        mine = ("err", _Failed(e))
    parts = _all_gather(mine, name)
    for kind, value in parts:
        if kind == "err":
            _raise(value)
    out: list = [None] * len(items)
    for p, (_, values) in enumerate(parts):
        out[p::P] = values
    return out


def _all_gather(value: Any, name: str) -> list:
    """[value of process 0, value of process 1, ...] on every process (values must pickle)."""
    key, me = _key(name), process_index()
    _client().key_value_set_bytes(f"{key}/{me}", pickle.dumps(value))
    parts = [value if p == me else pickle.loads(_get(f"{key}/{p}", name)) for p in range(process_count())]
    # every other process has now set its part of this exchange, so it has read all parts of the
    # previous ones: this process's earlier values can go (the service keeps values until deleted)
    for old in _STATE["mine"]:
        try:
            _client().key_value_delete(old)
        except Exception:  # noqa: BLE001 - already gone: nothing to free
            pass
    _STATE["mine"] = [f"{key}/{me}"]
    return parts


class OwnedRecords(Sequence):
    """The records that `prepare` keeps (in their order), prepared by one process each and held there.

    Record i of `records` is prepared (tokenized) by process i mod count, which keeps the result;
    the others keep nothing of it. Which records are kept (prepare returned a dict, not None) is
    exchanged once, so every process knows the whole order: `len()` and positions are the same as a
    single process's list of kept records. `take(positions)` brings the records at those positions
    to every process (the owners send theirs): one exchange per optimizer step. With one process it
    is a plain list.
    """

    def __init__(self, records: Sequence[dict], prepare: Callable[[dict], dict | None], progress=None):
        P, me = process_count(), process_index()
        mine = range(me, len(records), P)
        it = progress(mine) if progress is not None else mine
        self._own = {i: out for i in it if (out := prepare(records[i])) is not None}
        kept = _all_gather(sorted(self._own), "kept records") if P > 1 else [sorted(self._own)]
        self._index = sorted(i for part in kept for i in part)  # original indices, in order

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return self.take(range(*position.indices(len(self))))
        return self.take([position])[0]

    def take(self, positions: Sequence[int]) -> list[dict]:
        wanted = [self._index[p] for p in positions]
        if process_count() == 1:
            return [self._own[i] for i in wanted]
        held = {i: self._own[i] for i in dict.fromkeys(wanted) if i in self._own}
        merged: dict = {}
        for part in _all_gather(held, "step records"):
            merged.update(part)
        return [merged[i] for i in wanted]


def agree(value: Any, reduce: Callable[[list], Any] = min, name: str = "agree") -> Any:
    """reduce([value of every process]): one value that every process then uses (e.g. the smallest
    free device memory, so that every process sizes its buffers and programs alike)."""
    if process_count() == 1:
        return reduce([value])
    return reduce(shared_map(lambda _: value, list(range(process_count())), name))
