"""jsdr.hostmem: glibc malloc settings for XLA:CPU (no page faults for a step's temporaries in steady state)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jsdr import hostmem

ROOT = Path(__file__).resolve().parent.parent

# A jitted program with about 55 MiB of temporaries (above glibc's largest mmap threshold, 32 MiB),
# called 5 times; prints the minor page faults of each call.
PROBE = """
import resource
import jsdr, jax, jax.numpy as jnp
from jsdr import hostmem
print(hostmem.status())
c = jax.jit(lambda x: jnp.sort(x * 2.0)[::7].sum()).lower(jnp.ones((12 * 2**20,), jnp.float32)).compile()
x = jnp.ones((12 * 2**20,), jnp.float32)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(c(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("FAULTS", *faults)
"""


def _probe(setting: str) -> tuple[str, list[int]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JSDR_CPU_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    return lines[0], [int(v) for v in lines[-1].split()[1:]]


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="the settings are glibc's")
def test_cpu_calls_reuse_their_temporaries_instead_of_faulting_them_in():
    status_on, on = _probe("auto")
    status_off, off = _probe("0")
    assert "on (JAX_PLATFORMS starts with cpu)" in status_on and "off (JSDR_CPU_MALLOC=0)" in status_off
    # glibc's default: every call maps its temporaries afresh (>= 55 MiB / 4 KiB pages each call)
    assert min(off[1:]) > 10_000, off
    # tuned: after the first call, the freed buffers are reused from the heap (a call may still grow the
    # heap now and then: 14k faults seen once in 4 runs)
    assert sorted(on[1:])[1] < min(off[1:]) / 20 and sum(on[1:]) < min(off[1:]), (on, off)


@pytest.mark.parametrize("setting, platforms, plugins, apply, says", [
    (None, "cpu", ["xla_cuda12"], True, "JAX_PLATFORMS starts with cpu"),
    ("auto", "cpu,cuda", [], True, "JAX_PLATFORMS starts with cpu"),
    (None, "cuda", [], False, "not the CPU backend"),
    (None, None, [], True, "no accelerator plugin"),
    (None, "", ["xla_cuda12"], False, "xla_cuda12"),
    ("0", "cpu", [], False, "JSDR_CPU_MALLOC=0"),
    ("off", "cpu", [], False, "JSDR_CPU_MALLOC=off"),
    ("1", "cuda", ["libtpu"], True, "JSDR_CPU_MALLOC=1"),
])
def test_decide(setting, platforms, plugins, apply, says):
    got, why = hostmem.decide(setting, platforms, plugins)
    assert got is apply and says in why


def test_bad_setting_names_the_variable():
    with pytest.raises(ValueError, match=r"JSDR_CPU_MALLOC='maybe'.*auto.*1.*0"):
        hostmem.decide("maybe", "cpu", [])
