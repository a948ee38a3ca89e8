"""Flash attention in Pallas: forward and backward kernels behind a custom VJP.

    flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_offset=0, *,
                    causal=True, scale=None, block_sizes=None, interpret=None) -> [B, T, H, D]

Semantics are those of `reference_attention` below, the readable specification (and of
`jsdr.model.attention.attention`, which serves this kernel as `impl="pallas"`): q [B, T, H, D];
k, v [B, S, K, D] with H a multiple of K (grouped-query attention: query head h reads kv head
h // (H // K); K/V are never repeated in memory, the kernels index the kv head in their BlockSpec
index maps). Segment ids are int [B, T] / [B, S]; 0 is padding,
equal non-zero ids attend to each other (packing). With `causal`, query i sits at slot
`q_offset + i` of the key array and sees key slots <= its own (`q_offset` may be a traced scalar).
A query that sees no key returns zeros (and gets zero gradient), never NaN.

Algorithm (FlashAttention-2): the forward streams K/V blocks past a resident Q block with an online
softmax (float32 running max, sum and accumulator) and saves only the output and the log-sum-exp
(base 2, [B, H, T]). The backward recomputes the probabilities blockwise: one kernel per K/V block
accumulates dK and dV over all query blocks *and all query heads of its group* (so GQA gradients are
summed in registers, never materialised per query head), a second kernel per Q block accumulates
dQ. Matmuls take the input dtype (bf16 or f32) and accumulate in float32; float32 inputs use IEEE
precision on GPU (no TF32).

Shapes the hardware dislikes are handled outside the kernels: sequence lengths are padded up to a
multiple of the block sizes (padded rows/keys get segment id 0, so the mask removes them) and head
dims that are not a power of two are zero-padded (zeros change neither q.k nor the output columns
that are kept). Training shapes (T a multiple of 128, head_dim 64/128) need no padding copies.

Backends: on GPU the kernels lower through Pallas' Triton backend (`pl.pallas_call` with Triton
compiler params); elsewhere (CPU tests) they run in Pallas interpret mode, chosen automatically.

This module is a leaf: it imports nothing from `jsdr` and registers nothing on import. A GPU custom
call cannot be partitioned by XLA, so on a sharded mesh the caller runs `flash_attention` per shard
inside `shard_map`: `jsdr.model.attention` does that (batch over data/fsdp, heads over tensor).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jsdr_kernels.common import LOG2E as _LOG2E, MASKED as _MASKED, compiler_params, dot as _dot, target_kind, \
    is_pow2 as _is_pow2, masked_softmax, next_pow2 as _next_pow2, pad_axis as _pad_axis

__all__ = ["BlockSizes", "default_block_sizes", "gpu_generation", "flash_attention",
           "reference_attention"]



# ---------------------------------------------------------------------------------------------
# Block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (powers of two, >= 16) and Triton launch parameters.

    block_q / block_k: forward (a Q block stays resident while K/V blocks stream past).
    block_q_dkv / block_k_dkv: the dK/dV kernel (a K/V block stays resident, Q blocks stream).
    block_q_dq / block_k_dq: the dQ kernel (a Q block stays resident, K/V blocks stream).
    num_warps / num_stages: Triton launch parameters (None: Triton's defaults); ignored in
    interpret mode. Blocks larger than a (padded) sequence are shrunk to fit it.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
            b = getattr(self, f)
            if not (isinstance(b, int) and _is_pow2(b) and b >= 16):
                raise ValueError(f"BlockSizes.{f}={b!r}: block sizes must be powers of two >= 16 "
                                 "(Triton tiles are powers of two; tl.dot needs >= 16)")


# Starting points per GPU generation and (padded) head dim. UNTUNED: no GPU was available when
# these were chosen; they follow the usual FlashAttention-2/Triton shapes (large forward tiles,
# smaller backward tiles because dK/dV or dQ accumulators and two recomputed [bq, bk] tiles live
# in registers; fewer pipeline stages on A100's smaller shared memory). Run
# scripts/bench_attention.py with --block-* flags on the target GPU to tune them.
_GPU_TABLES: dict[str, dict[int, BlockSizes]] = {
    "hopper": {
        64: BlockSizes(128, 128, 64, 128, 128, 64, num_warps=4, num_stages=3),
        128: BlockSizes(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=3),
        256: BlockSizes(64, 64, 32, 32, 32, 32, num_warps=8, num_stages=2),
    },
    "ampere": {
        64: BlockSizes(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3),
        128: BlockSizes(128, 64, 64, 64, 64, 64, num_warps=8, num_stages=2),
        256: BlockSizes(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2),
    },
}
# interpret mode (CPU): tiles only trade loop trips for vector width; 64 is a fair middle
_INTERPRET_DEFAULT = BlockSizes(64, 64, 64, 64, 64, 64)


def gpu_generation(device_kind: str) -> str:
    """"hopper" (H100/H200/H800/GH200 and newer Blackwell parts) or "ampere" (A100 and anything else)."""
    kind = device_kind.upper()
    if any(t in kind for t in ("H100", "H200", "H800", "H20", "GH200", "B200", "B100", "GB200")):
        return "hopper"
    return "ampere"


def default_block_sizes(head_dim: int, device_kind: str | None = None, dtype=None) -> BlockSizes:
    """Default tiles for `head_dim` on `device_kind` (default: the GPU being compiled for, see
    `common.compile_for_gpu`, else the first device; CPU -> interpret) for inputs of `dtype` (default
    16-bit). 4-byte inputs get forward tiles of at most 64 x 64 in 2 stages: the tables' 128 x 128
    float32 forward asks an H100 for more shared memory than it has."""
    if device_kind is None:
        device_kind = target_kind()
        if device_kind is None:
            return _INTERPRET_DEFAULT
    table = _GPU_TABLES[gpu_generation(device_kind)]
    d = _next_pow2(max(head_dim, 16))
    bs = table[64 if d <= 64 else 128 if d <= 128 else 256]
    if dtype is not None and jnp.dtype(dtype).itemsize >= 4:
        bs = dataclasses.replace(bs, block_q=min(bs.block_q, 64), block_k=min(bs.block_k, 64),
                                 num_stages=min(bs.num_stages or 2, 2))
    return bs


# ---------------------------------------------------------------------------------------------
# The specification


def reference_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_offset=0, *,
                        causal: bool = True, scale: float | None = None) -> jax.Array:
    """Plain softmax attention in float32, written to be read: the kernel must equal this.

    logits[b, h, t, s] = scale * <q[b, t, h], k[b, s, h // (H // K)]>
    visible[b, t, s]   = seg_q[b, t] == seg_k[b, s] != 0  and  (not causal or s <= q_offset + t)
    out[b, t, h]       = sum_s softmax_s(logits over visible s) * v[b, s, h // (H // K)]
                         (zeros when no s is visible)
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qs = jnp.ones((B, T), jnp.int32) if q_segment_ids is None else jnp.asarray(q_segment_ids)
    ks = jnp.ones((B, S), jnp.int32) if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
    kf = jnp.repeat(k.astype(jnp.float32), H // K, axis=2)  # the spec may repeat; the kernel never does
    vf = jnp.repeat(v.astype(jnp.float32), H // K, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf,
                        precision=lax.Precision.HIGHEST) * scale
    visible = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
    if causal:
        visible &= jnp.arange(S)[None, None, :] <= (jnp.arange(T) + q_offset)[None, :, None]
    probs = masked_softmax(logits, visible[:, None])  # [B, 1, T, S] against [B, H, T, S]
    out = jnp.einsum("bhts,bshd->bthd", probs, vf, precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels. Refs carry one (batch, head) slice; all logits are in base-2 units (scale * log2 e).


def _visible(q_seg, q_slot, k_seg, k_start, block_k: int, causal: bool):
    """[bq, bk] boolean mask of one tile (the kernel-side copy of the specification's rule)."""
    mask = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
    if causal:
        k_slot = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask &= k_slot <= q_slot[:, None]
    return mask


def _kv_block_end(q_slot, n_k: int, block_k: int, causal: bool):
    """One past the last K/V block a Q block (slots q_slot) can see."""
    if not causal:
        return n_k
    return jnp.minimum(n_k, lax.div(jnp.max(q_slot), block_k) + 1)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, qslot_ref, kseg_ref, o_ref, lse_ref, *,
                scale2: float, causal: bool, block_k: int, n_k: int):
    q = q_ref[...]
    q_seg, q_slot = qseg_ref[...], qslot_ref[...]
    bq, dp = q.shape

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        mask = _visible(q_seg, q_slot, kseg_ref[pl.ds(start, block_k)], start, block_k, causal)
        s = jnp.where(mask, _dot(q, k, 1, 1) * scale2, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0)
        return acc, m_new, l

    init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), _MASKED, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, _kv_block_end(q_slot, n_k, block_k, causal), body, init)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qslot_ref, kseg_ref,
                dk_ref, dv_ref, *, scale2: float, scale: float, causal: bool, block_q: int,
                n_q: int, groups: int):
    k, v = k_ref[...], v_ref[...]
    bk, dp = k.shape
    k_start = pl.program_id(2) * bk
    k_seg = kseg_ref[...]
    if causal:  # first Q block holding a query at slot >= k_start (slots are q_offset + row)
        q_offset = jnp.min(qslot_ref[pl.ds(0, block_q)])
        lo = jnp.minimum(n_q, lax.div(jnp.maximum(k_start - q_offset, 0), block_q))
    else:
        lo = 0

    def q_block(g, i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), g, :]
        do = do_ref[pl.ds(start, block_q), g, :]
        lse = lse_ref[g, pl.ds(start, block_q)]
        delta = delta_ref[g, pl.ds(start, block_q)]
        mask = _visible(qseg_ref[pl.ds(start, block_q)], qslot_ref[pl.ds(start, block_q)], k_seg,
                        k_start, bk, causal)
        s = _dot(q, k, 1, 1) * scale2
        p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)       # [bq, bk]
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0)                 # p^T do
        dp_ = _dot(do, v, 1, 1)                                      # do v^T
        ds = p * (dp_ - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)                  # ds^T q
        return dk, dv

    def head(g, carry):
        return lax.fori_loop(lo, n_q, functools.partial(q_block, g), carry)

    init = (jnp.zeros((bk, dp), jnp.float32), jnp.zeros((bk, dp), jnp.float32))
    dk, dv = lax.fori_loop(0, groups, head, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qslot_ref, kseg_ref,
               dq_ref, *, scale2: float, scale: float, causal: bool, block_k: int, n_k: int):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg, q_slot = qseg_ref[...], qslot_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        mask = _visible(q_seg, q_slot, kseg_ref[pl.ds(start, block_k)], start, block_k, causal)
        p = jnp.where(mask, jnp.exp2(_dot(q, k, 1, 1) * scale2 - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    dq = lax.fori_loop(0, _kv_block_end(q_slot, n_k, block_k, causal), body,
                       jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers on padded arrays: q [B, Tp, H, Dp], k/v [B, Sp, K, Dp], segment ids
# [B, Tp] / [B, Sp], q slots [Tp] (= q_offset + row).


class _Cfg(NamedTuple):
    scale: float
    causal: bool
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    num_warps: int | None
    num_stages: int | None
    interpret: bool


def _call(cfg: _Cfg, kernel, **kw):
    params = compiler_params(cfg.interpret, cfg.num_warps, cfg.num_stages)
    return pl.pallas_call(kernel, interpret=cfg.interpret, compiler_params=params, **kw)


def _forward(cfg: _Cfg, q, k, v, qseg, kseg, qslot):
    B, Tp, H, Dp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G, bq, bk = H // K, cfg.bq, cfg.bk
    kernel = functools.partial(_fwd_kernel, scale2=cfg.scale * _LOG2E, causal=cfg.causal,
                               block_k=bk, n_k=Sp // bk)
    kv_spec = pl.BlockSpec((None, Sp, None, Dp), lambda b, h, i: (b, 0, lax.div(h, G), 0))
    q_spec = pl.BlockSpec((None, bq, None, Dp), lambda b, h, i: (b, i, h, 0))
    return _call(
        cfg, kernel, name="flash_attention_fwd", grid=(B, H, Tp // bq),
        in_specs=[q_spec, kv_spec, kv_spec,
                  pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                  pl.BlockSpec((bq,), lambda b, h, i: (i,)),
                  pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
    )(q, k, v, qseg, qslot, kseg)


def _backward(cfg: _Cfg, q, k, v, qseg, kseg, qslot, out, lse, do):
    B, Tp, H, Dp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = H // K
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    common = dict(scale2=cfg.scale * _LOG2E, scale=cfg.scale, causal=cfg.causal)

    # dK, dV: one program per (batch, kv head, K/V block); loops over the G query heads of the group
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    group_q = pl.BlockSpec((None, Tp, G, Dp), lambda b, kh, j: (b, 0, kh, 0))
    group_row = pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0))
    kv_blk = pl.BlockSpec((None, bk, None, Dp), lambda b, kh, j: (b, j, kh, 0))
    dk, dv = _call(
        cfg, functools.partial(_dkv_kernel, block_q=bq, n_q=Tp // bq, groups=G, **common),
        name="flash_attention_dkv", grid=(B, K, Sp // bk),
        in_specs=[group_q, kv_blk, kv_blk, group_q, group_row, group_row,
                  pl.BlockSpec((None, Tp), lambda b, kh, j: (b, 0)),
                  pl.BlockSpec((Tp,), lambda b, kh, j: (0,)),
                  pl.BlockSpec((None, bk), lambda b, kh, j: (b, j))],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q, k, v, do, lse, delta, qseg, qslot, kseg)

    # dQ: one program per (batch, query head, Q block)
    bq, bk = cfg.bq_dq, cfg.bk_dq
    q_blk = pl.BlockSpec((None, bq, None, Dp), lambda b, h, i: (b, i, h, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    kv_all = pl.BlockSpec((None, Sp, None, Dp), lambda b, h, i: (b, 0, lax.div(h, G), 0))
    dq = _call(
        cfg, functools.partial(_dq_kernel, block_k=bk, n_k=Sp // bk, **common),
        name="flash_attention_dq", grid=(B, H, Tp // bq),
        in_specs=[q_blk, kv_all, kv_all, q_blk, row_blk, row_blk,
                  pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                  pl.BlockSpec((bq,), lambda b, h, i: (i,)),
                  pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(q, k, v, do, lse, delta, qseg, qslot, kseg)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Cfg, q, k, v, qseg, kseg, qslot):
    return _forward(cfg, q, k, v, qseg, kseg, qslot)[0]


def _flash_fwd(cfg: _Cfg, q, k, v, qseg, kseg, qslot):
    out, lse = _forward(cfg, q, k, v, qseg, kseg, qslot)
    return out, (q, k, v, qseg, kseg, qslot, out, lse)  # residuals: inputs, output, log-sum-exp


def _flash_bwd(cfg: _Cfg, res, do):
    dq, dk, dv = _backward(cfg, *res, do)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Public entry points


def _fit(block: int, n: int) -> int:
    return min(block, max(16, _next_pow2(n)))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_offset=0, *,
                    causal: bool = True, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """Flash attention; same contract as `reference_attention` (see the module docstring).

    block_sizes: tiles (default `default_block_sizes(head_dim)` for the first device).
    interpret: run the kernels in Pallas interpret mode (default: everywhere but GPU).
    Differentiable in q, k, v (custom VJP; residuals are the inputs, the output and the
    log-sum-exp). k and v are cast to q's dtype; the output has q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: q, k, v must be [B, T, H, D] / [B, S, K, D]; got "
                         f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: k{tuple(k.shape)} and v{tuple(v.shape)} must both be "
                         f"[B={B}, S, K, D={D}] to match q{tuple(q.shape)}")
    if H % K:
        raise ValueError(f"flash_attention: num_heads={H} must be a multiple of num_kv_heads={K}")
    if q_segment_ids is not None and tuple(q_segment_ids.shape) != (B, T):
        raise ValueError(f"flash_attention: q_segment_ids shape {tuple(q_segment_ids.shape)} != (B, T)={(B, T)}")
    if kv_segment_ids is not None and tuple(kv_segment_ids.shape) != (B, S):
        raise ValueError(f"flash_attention: kv_segment_ids shape {tuple(kv_segment_ids.shape)} != (B, S)={(B, S)}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"flash_attention: q dtype {q.dtype} is not floating point")

    scale = float(D ** -0.5 if scale is None else scale)
    if interpret is None:
        interpret = target_kind() is None
    bs = block_sizes or default_block_sizes(D, dtype=q.dtype)
    bq, bq_dkv, bq_dq = (_fit(b, T) for b in (bs.block_q, bs.block_q_dkv, bs.block_q_dq))
    bk, bk_dkv, bk_dq = (_fit(b, S) for b in (bs.block_k, bs.block_k_dkv, bs.block_k_dq))
    Tp = _round_up(T, max(bq, bq_dkv, bq_dq))
    Sp = _round_up(S, max(bk, bk_dkv, bk_dq))
    Dp = D if (_is_pow2(D) and D >= 16) else _next_pow2(max(D, 16))
    cfg = _Cfg(scale, bool(causal), bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq, bs.num_warps, bs.num_stages,
               bool(interpret))

    k = k.astype(q.dtype)
    v = v.astype(q.dtype)
    qseg = jnp.ones((B, T), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kseg = jnp.ones((B, S), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    qp = _pad_axis(_pad_axis(q, 3, Dp), 1, Tp)
    kp = _pad_axis(_pad_axis(k, 3, Dp), 1, Sp)
    vp = _pad_axis(_pad_axis(v, 3, Dp), 1, Sp)
    qseg, kseg = _pad_axis(qseg, 1, Tp), _pad_axis(kseg, 1, Sp)  # padding rows/keys: segment 0
    qslot = jnp.arange(Tp, dtype=jnp.int32) + jnp.asarray(q_offset, jnp.int32)

    out = _flash(cfg, qp, kp, vp, qseg, kseg, qslot)
    return out[:, :T, :, :D]

