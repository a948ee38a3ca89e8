"""glibc malloc settings for JAX's CPU backend, applied when jsdr is imported.

XLA:CPU allocates each execution's temporary buffer and outputs with `posix_memalign`, from its worker
threads. Those threads use their own malloc arenas, which serve a request above 32 MiB (glibc's largest
mmap threshold) with a fresh `mmap` and give it back with `munmap` when it is freed. So every call of a jitted program whose
temporaries are that large maps its whole temporary buffer again, and the kernel zero-fills it page by
page. On the LoRA step of `scripts/bench_forward.py` (180 MiB of temporaries) that is 46,179 page faults
per step and 15-20% of the step's time on the 2-core development machine (docs/performance.md).

`configure` sets three `mallopt` parameters: one arena for all threads, no `mmap` for large requests
(they come from the heap), and a trim threshold of 2 GiB (a freed buffer stays in the heap for the next
call). A steady-state step then faults no pages. The cost: the process keeps up to 2 GiB of freed heap
instead of returning it to the system, and its threads share one arena lock.

It applies only where the CPU runs JAX, so GPU and TPU runs keep glibc's defaults. That means the first
entry of `JAX_PLATFORMS` is "cpu", or, when `JAX_PLATFORMS` is unset, no accelerator plugin is installed
(no `jax_plugins` module, no `libtpu`). It applies only on Linux with glibc. The environment variable
`JSDR_CPU_MALLOC` chooses: `auto` (the default), `1` (always), `0` (never). The settings act on threads
that allocate for the first time after them, so import jsdr before the first JAX computation to get all
of them. This module imports nothing (not even jax), so benchmarks can apply the same settings to a
peer framework's process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import platform
import sys

ENV = "JSDR_CPU_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))

_status: str | None = None


def accelerator_plugins() -> list[str]:
    """Installed JAX plugins that add a non-CPU backend (jax_plugins.* modules, libtpu)."""
    names = []
    spec = importlib.util.find_spec("jax_plugins")  # namespace package of the PJRT plugins (xla_cuda12, ...)
    if spec is not None and spec.submodule_search_locations:
        names = sorted(m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations)))
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return names


def decide(setting: str | None, jax_platforms: str | None, plugins: list[str]) -> tuple[bool, str]:
    """Whether to apply the settings and why, from the value of JSDR_CPU_MALLOC, the value of
    JAX_PLATFORMS and the installed accelerator plugins."""
    value = (setting or "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False, f"off ({ENV}={setting})"
    if value in ("1", "on", "true", "yes"):
        return True, f"on ({ENV}={setting})"
    if value != "auto":
        raise ValueError(f"environment variable {ENV}={setting!r}: use auto (the default), 1 (always) or 0 (never)")
    first = (jax_platforms or "").split(",")[0].strip().lower()
    if first:
        if first == "cpu":
            return True, "on (JAX_PLATFORMS starts with cpu)"
        return False, f"off (JAX_PLATFORMS={jax_platforms}: not the CPU backend)"
    if plugins:
        return False, f"off (accelerator plugins installed: {', '.join(plugins)}; JAX may not run on the CPU)"
    return True, "on (no accelerator plugin installed: JAX runs on the CPU)"


def configure() -> str:
    """Apply the settings if `decide` says so; return what was done, as one line. The first call
    decides; later calls return its line."""
    global _status
    if _status is not None:
        return _status
    apply, why = decide(os.environ.get(ENV), os.environ.get("JAX_PLATFORMS"), accelerator_plugins())
    if apply:
        mallopt = None
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is None:
            why = "off (not Linux with glibc)"
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            failed = [param for param, value in SETTINGS if mallopt(param, value) != 1]
            why = f"off (mallopt refused parameters {failed})" if failed else why
    _status = "glibc malloc for XLA:CPU: " + why
    return _status


def status() -> str:
    """What `configure` did (it runs now if it has not yet)."""
    return configure()
