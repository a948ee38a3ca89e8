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
(`jsdr_kernels.flash_attention`, from the repository's kernels/ folder; on CPU it runs in Pallas
interpret mode). The kernel module is a leaf that knows nothing of jsdr: this module imports it,
registers it and runs it per shard under an active mesh (`pallas_attention`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jsdr import sharding

try:
    from jsdr_kernels import flash_attention as flash
except ModuleNotFoundError as e:  # a checkout on sys.path without `pip install -e .`
    if e.name != "jsdr_kernels":
        raise
    raise ModuleNotFoundError(
        "jsdr_kernels (the Pallas kernels in the repository's kernels/ folder) is not importable: "
        "install the project (`pip install -e .`), which maps kernels/jsdr_kernels to that name",
        name=e.name) from e

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
    return sorted(_IMPLS)


IMPL_CHOICES = ("auto", "xla", "pallas", "cudnn")


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` names on `platform` (default: JAX's default backend): "auto" is the
    Pallas flash kernel on GPU (memory linear in the sequence length) and "xla" elsewhere (on CPU the
    kernel runs only in the slow interpret mode); the others are themselves."""
    if impl not in IMPL_CHOICES:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of {list(IMPL_CHOICES)}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm") else "xla"


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset=0, causal: bool = True,
              impl: str = "xla", scale: float | None = None, kv_layout: str = "bskd") -> jax.Array:
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
    """cuDNN's fused attention. Causality goes to cuDNN as its own mask type (`is_causal`) whenever it
    is the plain lower triangle (queries and keys the same positions: T == S and a static offset 0),
    so that cuDNN skips the tiles above the diagonal; the explicit mask then holds only what the
    segment ids add (packing, padding). Rows that see no key (padding) give zeros, as in "xla"."""
    plain_causal = causal and q.shape[1] == k.shape[1] and isinstance(q_offset, int) and q_offset == 0
    mask = make_mask(q_segment_ids, kv_segment_ids, q_offset, causal and not plain_causal)[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=plain_causal,
                                       implementation="cudnn")
    # with T == S a row that sees a key of its segment sees its own position (on the diagonal), so the
    # segment mask alone says which rows see nothing
    return jnp.where((mask.any(-1))[:, 0, :, None, None], out, 0).astype(q.dtype)


@register("pallas")
def pallas_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, scale):
    """`jsdr_kernels.flash_attention.flash_attention`; under an active `sharding.use_mesh` it runs per
    shard inside `shard_map` (a GPU custom call cannot be partitioned by XLA): the batch over the
    mesh axes of "act_batch", the heads over those of "act_heads" when the kv heads split the same
    way (the group of a local query head must be a local kv head), else heads replicated."""
    kernel = functools.partial(flash.flash_attention, causal=causal, scale=scale)
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((B, T), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = jnp.ones((B, S), jnp.int32)
    batch = sharding.logical_to_spec(("act_batch",), (B,), mesh)[0]
    heads = sharding.logical_to_spec(("act_heads",), (H,), mesh)[0]
    kv_heads = sharding.logical_to_spec(("act_kv_heads",), (K,), mesh)[0]
    if heads != kv_heads:
        heads = kv_heads = None
    q_spec = PartitionSpec(batch, None, heads, None)
    kv_spec = PartitionSpec(batch, None, kv_heads, None)
    seg_spec = PartitionSpec(batch, None)
    sharded = jax.shard_map(kernel, mesh=mesh, check_vma=False,
                            in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec, PartitionSpec()),
                            out_specs=q_spec)
    return sharded(q, k, v, q_segment_ids, kv_segment_ids, jnp.asarray(q_offset, jnp.int32))


# ---------------------------------------------------------------------------------------------
# Paged KV cache (the paged sampling engine, jsdr/sampling/paged.py).
#
# One pool per key and value holds the pages of every layer: [K, L * P, S, D] (kv heads, layers x
# pages, tokens per page, head dim); page p of layer l is row l * P + p, so a layer's pages are read
# straight from the pool (no per-layer slice is ever materialised) by offsetting the page table. Page
# 0 of every layer is a scratch page: writes of padding tokens land there and nothing reads it
# unmasked. Under a mesh the pool is split over the data-parallel axes along its page axis (each
# shard holds whole layers x its own pages; page ids are local to the shard) and over the tensor
# axis along kv heads, so every read and write stays on its device.

class PagedKV(NamedTuple):
    """A paged KV cache as the decoder takes it (`Decoder(..., cache=PagedKV(...))`).

    k, v: pools [K, L * P, S, D]. page_table [B, M] int32: page j of row b (its tokens j*S ..
    j*S+S-1) is pool page page_table[b, j] (local id under a mesh). valid [B, T] bool: which of the
    new tokens are real; the others write to the scratch page. The new tokens' positions (the
    decoder's `positions`) say where they are written; a query at position p attends to positions
    0..p of its row. fresh (a Python bool, static): every row's new tokens start at position 0, so
    they attend only to each other, and with impl "pallas" the flash kernel runs on them directly
    (a prefill's first chunk) instead of reading them back from the pages.
    """

    k: jax.Array
    v: jax.Array
    page_table: jax.Array
    valid: jax.Array
    fresh: bool = False


class PagedIndex(NamedTuple):
    """The per-call part of PagedKV that every layer reads (the pools travel through the layer scan)."""

    page_table: jax.Array
    valid: jax.Array
    fresh: bool = False


def paged_xla(q, k_pool, v_pool, page_table, positions, scale):
    """Attention of q [B, T, H, D] at `positions` [B, T] over the pages `page_table` [B, M] (already
    offset to the layer) of pools [K, LP, S, D]: gather M pages per row, mask keys after the query."""
    B, T, H, D = q.shape
    K, _, S, _ = k_pool.shape
    M = page_table.shape[1]
    kg = k_pool[:, page_table].reshape(K, B, M * S, D).astype(q.dtype)  # batch dims (k, b) lead, as a dot wants
    vg = v_pool[:, page_table].reshape(K, B, M * S, D).astype(q.dtype)
    qg = q.reshape(B, T, K, H // K, D).transpose(2, 0, 3, 1, 4)  # [K, B, G, T, D]
    logits = jnp.einsum("kbgtd,kbsd->kbgts", qg, kg, preferred_element_type=jnp.float32) * scale
    mask = (jnp.arange(M * S)[None, None, :] <= positions[:, :, None])[None, :, None]  # [1, B, 1, T, M*S]
    logits = jnp.where(mask, logits, -1e30)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("kbgts,kbsd->kbgtd", probs.astype(vg.dtype), vg, preferred_element_type=jnp.float32)
    return out.transpose(1, 3, 0, 2, 4).reshape(B, T, H, D).astype(q.dtype)


def _paged_local(q, k_new, v_new, k_pool, v_pool, layer, page_table, positions, valid, *, num_layers, impl, scale,
                 fresh=False):
    """Per shard: write the new keys/values into this layer's pages, then attend over them."""
    K, LP, S, _ = k_pool.shape
    base = layer * (LP // num_layers)
    M = page_table.shape[1]
    slot = jnp.take_along_axis(page_table, jnp.clip(positions // S, 0, M - 1), axis=1)
    pid = jnp.where(valid, slot, 0) + base  # padding tokens -> the scratch page
    off = positions % S
    k_pool = k_pool.at[:, pid, off].set(k_new.transpose(2, 0, 1, 3).astype(k_pool.dtype))  # [K, B, T, D]
    v_pool = v_pool.at[:, pid, off].set(v_new.transpose(2, 0, 1, 3).astype(v_pool.dtype))
    table = page_table + base
    if impl == "pallas" and q.shape[1] == 1:  # a decode step: the kernel reads only the pages in use
        from jsdr_kernels.paged_attention import paged_attention as kernel
        lengths = jnp.where(valid[:, 0], positions[:, 0] + 1, 0).astype(jnp.int32)
        o = kernel(q[:, 0], k_pool, v_pool, table, lengths, scale=scale)[:, None]
    elif impl == "pallas" and fresh:  # a first prefill chunk: its tokens are the whole context
        seg = valid.astype(jnp.int32)
        o = flash.flash_attention(q, k_new, v_new, seg, seg, 0, causal=True, scale=scale)
    else:
        o = paged_xla(q, k_pool, v_pool, table, positions, scale)
    return jnp.where(valid[:, :, None, None], o, 0).astype(q.dtype), k_pool, v_pool


def _paged_axes(num_heads: int, num_kv_heads: int, mesh):
    """Mesh axes of (rows and pool pages, query heads, kv heads) of the paged op: rows over every
    data-parallel axis, heads over "tensor" only when query and kv heads split the same way."""
    batch = sharding.logical_to_spec(("act_batch",), None, mesh)[0]
    heads = sharding.logical_to_spec(("act_heads",), (num_heads,), mesh)[0]
    kv_heads = sharding.logical_to_spec(("act_kv_heads",), (num_kv_heads,), mesh)[0]
    if heads != kv_heads:
        heads = kv_heads = None
    return batch, heads, kv_heads


def pool_spec(num_heads: int, num_kv_heads: int, mesh) -> PartitionSpec:
    """How a KV pool [K, L * P, S, D] lies on `mesh` (under the active rules): kv heads as the paged
    op splits them, pages over the data-parallel axes (P per shard)."""
    batch, _, kv_heads = _paged_axes(num_heads, num_kv_heads, mesh)
    return PartitionSpec(kv_heads, batch, None, None)


def paged_attention(q, k_new, v_new, k_pool, v_pool, layer, index: PagedIndex, positions, *, num_layers: int,
                    impl: str = "xla", scale: float | None = None):
    """Write k_new / v_new [B, T, K, D] at `positions` [B, T] into layer `layer`'s pages of the pools
    and attend with q [B, T, H, D] (causally, over positions 0..p of the row). Returns (out [B, T, H,
    D], k_pool, v_pool). impl "pallas" runs decode steps (T == 1) through the Pallas paged kernel and
    chunks that start every row at position 0 (index.fresh) through the flash kernel; everything
    else gathers the pages in XLA. Under an active mesh the whole op runs per shard in
    `shard_map` (rows and pages over the data-parallel axes, heads over "tensor" when the kv heads
    split), so no pool page ever crosses a device."""
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    fn = functools.partial(_paged_local, num_layers=num_layers, impl=impl, scale=scale, fresh=index.fresh is True)
    args = (q, k_new, v_new, k_pool, v_pool, jnp.asarray(layer, jnp.int32), index.page_table,
            positions.astype(jnp.int32), index.valid)
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:
        return fn(*args)
    batch, heads, kv_heads = _paged_axes(H, k_new.shape[2], mesh)
    q_spec, kv_spec = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, kv_heads, None)
    pages, rows = PartitionSpec(kv_heads, batch, None, None), PartitionSpec(batch, None)
    sharded = jax.shard_map(fn, mesh=mesh, check_vma=False,
                            in_specs=(q_spec, kv_spec, kv_spec, pages, pages, PartitionSpec(), rows, rows, rows),
                            out_specs=(q_spec, pages, pages))
    return sharded(*args)
