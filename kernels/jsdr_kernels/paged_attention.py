"""Paged attention for the decode step in Pallas: one query token per sequence, K/V in a page pool.

    paged_attention(q, k_pages, v_pages, page_table, lengths, *,
                    scale=None, pages_per_block=None, interpret=None) -> [B, H, D] in q.dtype

Semantics are those of `reference_paged_attention` below, the readable specification:

- q [B, H, D]: the one new query token of each of B sequences.
- k_pages, v_pages [K, P, S, D]: kv heads, pages in the pool, page size (tokens per page), head dim.
  H is a multiple of K (grouped-query attention: query head h reads kv head h // (H // K); K/V are
  never repeated in memory).
- page_table int32 [B, M]: key position p of sequence b lives in pool page page_table[b, p // S],
  slot p % S. Entries past a sequence's length may hold any page in [0, P); they never reach the
  result (even when those pages hold NaN or inf).
- lengths int32 [B]: sequence b attends to key positions 0 .. lengths[b] - 1 (lengths <= M * S;
  larger values are clipped to M * S). A sequence of length 0 returns zeros, never NaN.
- scale defaults to D ** -0.5.

Algorithm: one program per (sequence, kv head) holds the G = H // K query heads of its group as a
[G, D] block and walks only the pages the sequence uses, `pages_per_block` pages per step: the page
indices of the step are read from the page table, the pages are gathered from the pool (passed whole,
never copied), the [G, pages_per_block * S] logits go through an online softmax (float32 running max,
sum and accumulator, base-2 logits) and slots at or past the length are masked (their V rows are
zeroed, so garbage there cannot turn into NaN). The trip count is ceil(lengths[b] / (pages_per_block
* S)), so a short sequence in a batch of long ones costs only its own pages. Matmuls take the input
dtype and accumulate in float32 (float32 inputs use IEEE precision, no TF32); the output is cast to
q's dtype.

Shapes the hardware dislikes are handled outside the kernel: G is zero-padded to a power of two
>= 16 (Triton's dot needs every dim >= 16; padded query rows are dropped), head dims that are not a
power of two >= 16 are zero-padded (this copies the pool, so such head dims cost a copy per call),
and the page table's columns are padded with page 0 up to a multiple of `pages_per_block` (the
extra entries lie past every length). On GPU the page size S and `pages_per_block` must be powers of
two with pages_per_block * S >= 16.

Backends: on GPU the kernel lowers through Pallas' Triton backend (`pl.pallas_call` with Triton
compiler params; num_warps/num_stages are untuned starting points); elsewhere (CPU tests) it runs in
Pallas interpret mode, chosen automatically. The grid is (B, K) with no split along the sequence, so
a small B * K leaves SMs idle on long sequences.

This module is a leaf: it imports nothing from `jsdr` and registers nothing on import.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jsdr_kernels.common import LOG2E as _LOG2E, MASKED as _MASKED, compiler_params, dot as _dot, target_kind, \
    is_pow2 as _is_pow2, masked_softmax, next_pow2 as _next_pow2, pad_axis as _pad_axis

__all__ = ["default_pages_per_block", "paged_attention", "reference_paged_attention"]

_BLOCK_TOKENS = 128  # default tokens per loop step (pages_per_block * S), untuned
_NUM_WARPS, _NUM_STAGES = 4, 2  # Triton launch parameters, untuned


# ---------------------------------------------------------------------------------------------
# The specification


def reference_paged_attention(q, k_pages, v_pages, page_table, lengths, scale: float | None = None):
    """Plain attention over gathered pages in float32, written to be read: the kernel must equal this.

    keys[b, k, p]    = k_pages[k, page_table[b, p // S], p % S]        (p < M * S; same for values)
    logits[b, h, p]  = scale * <q[b, h], keys[b, h // (H // K), p]>
    out[b, h]        = sum_{p < lengths[b]} softmax_p(logits over p < lengths[b]) * values[b, h // (H // K), p]
                       (zeros when lengths[b] == 0)
    """
    B, H, D = q.shape
    K, _, S, _ = k_pages.shape
    M = page_table.shape[1]
    scale = D ** -0.5 if scale is None else scale
    keys = k_pages[:, page_table].reshape(K, B, M * S, D).astype(jnp.float32)  # [K, B, M*S, D]
    values = v_pages[:, page_table].reshape(K, B, M * S, D).astype(jnp.float32)
    keys = jnp.repeat(keys, H // K, axis=0)  # the spec may repeat; the kernel never does
    values = jnp.repeat(values, H // K, axis=0)
    visible = jnp.arange(M * S)[None, :] < jnp.asarray(lengths)[:, None]  # [B, M*S]
    logits = jnp.einsum("bhd,hbpd->bhp", q.astype(jnp.float32), keys, precision=lax.Precision.HIGHEST) * scale
    probs = masked_softmax(logits, visible[:, None])  # sequences of length 0 give zeros
    values = jnp.where(visible[None, :, :, None], values, 0.0)  # unseen slots may hold anything
    out = jnp.einsum("bhp,hbpd->bhd", probs, values, precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# The kernel. Refs: q [Gp, Dp] of one (sequence, kv head); the kv head's whole pools [P, S, Dp];
# the sequence's page-table row [Mp]; its length [1]. Logits are in base-2 units (scale * log2 e).


def _kernel(q_ref, k_ref, v_ref, pt_ref, len_ref, o_ref, *, scale2: float, pages_per_block: int):
    q = q_ref[...]
    gp, dp = q.shape
    page_size = k_ref.shape[1]
    block = pages_per_block * page_size  # tokens per step
    length = len_ref[0]

    def body(j, carry):
        acc, m, l = carry
        pages = pt_ref[pl.ds(j * pages_per_block, pages_per_block)]  # pool pages of this step
        k = k_ref[pages].reshape(block, dp)  # gather [pages_per_block, S, Dp] -> [block, Dp]
        v = v_ref[pages].reshape(block, dp)
        pos = j * block + lax.broadcasted_iota(jnp.int32, (1, block), 1)
        valid = pos < length  # [1, block]
        s = jnp.where(valid, _dot(q, k, 1, 1) * scale2, _MASKED)  # [Gp, block]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(valid, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        v = jnp.where(valid.reshape(block, 1), v, jnp.zeros_like(v))  # 0 * NaN would be NaN
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0)
        return acc, m_new, l

    init = (jnp.zeros((gp, dp), jnp.float32), jnp.full((gp,), _MASKED, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    acc, _, l = lax.fori_loop(0, lax.div(length + block - 1, block), body, init)
    l_safe = jnp.where(l > 0.0, l, 1.0)  # length 0: acc is 0, the output is 0
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Public entry point


def default_pages_per_block(page_size: int, max_pages: int) -> int:
    """About 128 tokens per step, no more pages than a sequence can have (rounded up to a power of
    two), and at least 16 tokens (Triton's dot)."""
    ppb = min(max(1, _BLOCK_TOKENS // page_size), _next_pow2(max_pages))
    return max(ppb, _next_pow2(-(-16 // page_size)))


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, scale: float | None = None,
                    pages_per_block: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Decode attention over a paged K/V pool; same contract as `reference_paged_attention` (see the
    module docstring).

    pages_per_block: pages per loop step (default `default_pages_per_block(S, M)`).
    interpret: run the kernel in Pallas interpret mode (default: everywhere but GPU).
    k_pages and v_pages are cast to q's dtype; the output has q's dtype. Not differentiable.
    """
    if q.ndim != 3 or k_pages.ndim != 4 or v_pages.ndim != 4:
        raise ValueError(f"paged_attention: q must be [B, H, D] and k_pages, v_pages [K, P, S, D]; got "
                         f"q{tuple(q.shape)} k_pages{tuple(k_pages.shape)} v_pages{tuple(v_pages.shape)}")
    B, H, D = q.shape
    K, P, S, _ = k_pages.shape
    if k_pages.shape != v_pages.shape or k_pages.shape[3] != D:
        raise ValueError(f"paged_attention: k_pages{tuple(k_pages.shape)} and v_pages{tuple(v_pages.shape)} "
                         f"must both be [K, P, S, D={D}]")
    if H % K:
        raise ValueError(f"paged_attention: num_heads={H} must be a multiple of num_kv_heads={K}")
    if page_table.ndim != 2 or page_table.shape[0] != B or tuple(lengths.shape) != (B,):
        raise ValueError(f"paged_attention: page_table{tuple(page_table.shape)} must be [B={B}, M] and "
                         f"lengths{tuple(lengths.shape)} [B={B}]")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"paged_attention: q dtype {q.dtype} is not floating point")
    M = page_table.shape[1]
    if interpret is None:
        interpret = target_kind() is None
    ppb = default_pages_per_block(S, M) if pages_per_block is None else int(pages_per_block)
    if ppb < 1:
        raise ValueError(f"paged_attention: pages_per_block={ppb} must be >= 1")
    if not interpret and not (_is_pow2(S) and _is_pow2(ppb) and ppb * S >= 16):
        raise ValueError(f"paged_attention on GPU: page size {S} and pages_per_block {ppb} must be powers "
                         f"of two with pages_per_block * page_size >= 16 (Triton tiles)")

    G = H // K
    Gp = max(16, _next_pow2(G))
    Dp = D if (_is_pow2(D) and D >= 16) else _next_pow2(max(D, 16))
    Mp = -(-M // ppb) * ppb
    scale = float(D ** -0.5 if scale is None else scale)

    qp = _pad_axis(_pad_axis(q.reshape(B, K, G, D), 3, Dp), 2, Gp)
    kp = _pad_axis(k_pages.astype(q.dtype), 3, Dp)
    vp = _pad_axis(v_pages.astype(q.dtype), 3, Dp)
    pt = _pad_axis(page_table.astype(jnp.int32), 1, Mp)  # page 0: read past every length, never used
    lens = jnp.clip(lengths.astype(jnp.int32), 0, M * S)

    params = compiler_params(bool(interpret), _NUM_WARPS, _NUM_STAGES)
    group = pl.BlockSpec((None, None, Gp, Dp), lambda b, h: (b, h, 0, 0))
    pool = pl.BlockSpec((None, P, S, Dp), lambda b, h: (h, 0, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, scale2=scale * _LOG2E, pages_per_block=ppb),
        name="paged_attention", grid=(B, K), interpret=bool(interpret), compiler_params=params,
        in_specs=[group, pool, pool,
                  pl.BlockSpec((None, Mp), lambda b, h: (b, 0)),
                  pl.BlockSpec((1,), lambda b, h: (b,))],
        out_specs=group,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
    )(qp, kp, vp, pt, lens)
    return out[:, :, :G, :D].reshape(B, H, D)
