"""The one attention entry point of jsdr.

    attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset=0, causal=True, impl="xla",
              scale=None, kv_layout="bskd")

q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (grouped-query attention; K/V are never
repeated in memory). kv_layout="cache" takes the KV cache's layout instead: k [B, K, D, S] and
v [B, K, S, D], the operands of the two attention matmuls exactly as a dot reads them, so a decode
step never transposes the cache; implementations without a native cache path get transposed views.

Segment ids are int32 [B, T] / [B, S]: 0 marks padding (or an unwritten cache slot), equal
non-zero ids may attend to each other (sequence packing). Causality is by array slot:
query i sits at slot `q_offset + i` of the key array and sees key slots <= its own. With a KV cache
`q_offset` is the cache write index; in training it is 0 and T == S.

A query row that sees no key at all (a padding position) returns zeros, never NaN.

impl: "xla" (reference, CPU default), "cudnn" (jax.nn.dot_product_attention, GPU), "pallas"
(kernels/flash_attention.py, registered when that module is importable).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_IMPLS: dict[str, AttentionFn] = {}
_CACHE_NATIVE: set[str] = set()  # impls that take kv_layout="cache" themselves
KV_LAYOUTS = ("bskd", "cache")


def register(name: str, cache_layout: bool = False) -> Callable[[AttentionFn], AttentionFn]:
    """Register an attention implementation fn(q, k, v, q_seg, kv_seg, q_offset, causal, scale)
    with k, v [B, S, K, D]; cache_layout=True: it also accepts kv_layout="cache" as a keyword."""
    def deco(fn: AttentionFn) -> AttentionFn:
        _IMPLS[name] = fn
        if cache_layout:
            _CACHE_NATIVE.add(name)
        return fn
    return deco


def available() -> list[str]:
    _load_optional()
    return sorted(_IMPLS)


def _load_optional() -> None:
    if "pallas" not in _IMPLS:
        try:  # the Pallas kernel registers itself on import
            import kernels.flash_attention  # noqa: F401
        except ImportError:
            pass


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset=0, causal: bool = True,
              impl: str = "xla", scale: float | None = None, kv_layout: str = "bskd") -> jax.Array:
    if impl not in _IMPLS:
        _load_optional()
    if impl not in _IMPLS:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of {available()}")
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout {kv_layout!r} unknown; choose one of {KV_LAYOUTS}")
    B, T, H, D = q.shape
    K = k.shape[1] if kv_layout == "cache" else k.shape[2]
    if H % K:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={K}")
    scale = D ** -0.5 if scale is None else scale
    fn = _IMPLS[impl]
    if kv_layout == "cache":
        if impl in _CACHE_NATIVE:
            return fn(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, scale, kv_layout="cache")
        k, v = k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3)
    return fn(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, scale)


def make_mask(q_segment_ids, kv_segment_ids, q_offset, causal: bool) -> jax.Array:
    """Boolean [B, T, S]: True where query t may attend to key s."""
    T, S = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        q_slot = jnp.arange(T)[:, None] + q_offset
        mask = mask & (jnp.arange(S)[None, :] <= q_slot)[None]
    return mask


@register("xla", cache_layout=True)
def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, scale, kv_layout="bskd"):
    B, T, H, D = q.shape
    cache = kv_layout == "cache"
    K = k.shape[1] if cache else k.shape[2]
    # batch dims (b, k) lead on q and on the output: with the cache layout both matmuls then read
    # k and v as they lie (einsum's own choice of dimension order transposed the cache every step)
    qg = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    k_dims, v_dims = ("bkds", "bksd") if cache else ("bskd", "bskd")
    logits = jnp.einsum(f"bkgtd,{k_dims}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = make_mask(q_segment_ids, kv_segment_ids, q_offset, causal)[:, None, None]
    logits = jnp.where(mask, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # fully masked rows -> zeros
    out = jnp.einsum(f"bkgts,{v_dims}->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)


@register("cudnn")
def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, scale):
    mask = make_mask(q_segment_ids, kv_segment_ids, q_offset, causal)[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    return jnp.where((mask.any(-1))[:, 0, :, None, None], out, 0).astype(q.dtype)
