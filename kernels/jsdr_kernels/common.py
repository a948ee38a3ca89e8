"""Pieces the Pallas kernels of jsdr_kernels share: constants, sizes, the in-kernel matmul, the
masked softmax of the pure-JAX references, and the Triton compiler parameters. A leaf like them."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax import lax

try:  # the Triton flavour of Pallas (GPU compiler params); absent on some builds
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
_TARGET_KIND: list[str] = []  # stack of compile_for_gpu() device kinds
MASKED = -1e30  # logit (base-2 units) of a masked entry; finite so that max/exp never see inf - inf


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pad_axis(x, axis: int, size: int):
    """x zero-padded at the end of `axis` to `size`."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def dot(a, b, contract_a: int, contract_b: int):
    """a . b contracting one dim each, float32 accumulation, IEEE precision for float32 inputs."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


def masked_softmax(logits, visible):
    """softmax over the last axis of the visible entries (float32); rows that see nothing give zeros,
    never NaN. `visible` broadcasts against `logits`."""
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # softmax is shift-invariant
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows that see nothing
    weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(denom > 0, denom, 1.0)


def compiler_params(interpret: bool, num_warps: int, num_stages: int):
    """Triton launch parameters on GPU, None in interpret mode."""
    if interpret or plgpu is None:
        return None
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def compile_for_gpu(device_kind: str):
    """While active, the kernels build for a GPU of `device_kind` (Triton, the tiles of that GPU)
    whatever `jax.default_backend()` says: for programs compiled for compile-only GPU devices on a
    machine without one (jsdr.plan), which would otherwise get the interpret-mode loops."""
    _TARGET_KIND.append(device_kind)
    try:
        yield
    finally:
        _TARGET_KIND.pop()


def target_kind() -> str | None:
    """The device kind of the active `compile_for_gpu`, else that of the first device when it is a
    GPU, else None (interpret mode)."""
    if _TARGET_KIND:
        return _TARGET_KIND[-1]
    if jax.default_backend() == "gpu":
        return jax.devices()[0].device_kind
    return None
