"""The decoder: Llama 3.x, Qwen2/2.5 and Qwen3 as one Flax (linen) module, used as a pure function.

The families differ only by flags of `ModelConfig`: qkv bias (Qwen2), per-head q/k RMSNorm
(Qwen3), rope scaling ("llama3", "linear"), tied embeddings, head_dim. Every parameter is declared
once in params.py (logical axes, initializer, HF name) and created by the module that uses it
through `nn.with_logical_partitioning`; `Decoder.apply({"params": params, "lora": lora}, ...)` takes
the plain nested dicts of HF-derived names. The decoder layers are one `nn.scan` over a stacked
leading axis (logical axis "layers"), wrapped in `nn.remat` with a named policy, so compile time
does not grow with depth.

Parameter tree (kernels are [in, out], i.e. HF's [out, in] transposed; L = num_layers)::

    embed_tokens/embedding            [V, E]
    layers/input_layernorm/scale      [L, E]
    layers/self_attn/{q,k,v}_proj/kernel  [L, E, H*D] / [L, E, K*D]   (+ bias [L, H*D] when qkv_bias)
    layers/self_attn/o_proj/kernel    [L, H*D, E]
    layers/self_attn/{q,k}_norm/scale [L, D]                          (qk_norm only)
    layers/post_attention_layernorm/scale [L, E]
    layers/mlp/{gate,up}_proj/kernel  [L, E, F];  layers/mlp/down_proj/kernel [L, F, E]
    norm/scale                        [E]
    lm_head/kernel                    [E, V]                          (untied only)

A LoRA tree (see lora.py) is the module's second variable collection, "lora": it mirrors the
targeted projections, {"lora_a": [L, in, r], "lora_b": [L, r, out]}; each targeted projection
computes x W + scale * (x A) B, and the base tree is never modified.

Plain JAX, not Flax: the lm head (`lm_head`, `lm_head_kernel`: losses take the raw [E, V] kernel to
chunk the vocabulary), the KV cache (a value carried through the layer scan, not a mutable
collection), rope, `init_params` (one key per leaf, so seeded weights do not change).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsdr.model.attention import PagedIndex, PagedKV, attention, paged_attention
from jsdr.model.params import ModelConfig, by_path
from jsdr.sharding import constrain

__all__ = ["ModelConfig", "Params", "Model", "Decoder", "forward_hidden", "forward", "lm_head", "lm_head_kernel",
           "init_cache", "CACHE_AXES", "CACHE_SEQ_AXIS", "param_axes", "param_shapes", "init_params",
           "positions_from_segments", "rope_inv_freq", "REMAT_POLICIES"]

Params = dict[str, Any]

_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = tuple(_POLICIES)


def _check_remat(policy: str) -> None:
    if policy not in _POLICIES:
        raise ValueError(f"remat policy {policy!r} unknown; choose one of {REMAT_POLICIES}")


# ---------------------------------------------------------------------------------------------
# building blocks (plain functions of arrays)


def rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [D/2] including the rope scaling of the config."""
    head_dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rope = cfg.rope
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rope["factor"]
    if kind == "llama3":
        factor = rope["factor"]
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x, positions, inv_freq):
    """x: [B, T, N, D]; positions: [B, T]. Half-split rotation (the HF convention)."""
    ang = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x, a, b, scale: float):
    """scale * (x A) B, the LoRA path of a projection, with a hand-written backward.

    The backward is what autodiff gives (du = scale dY B^T; dX = du A^T; dA = X^T du; dB = scale
    u^T dY, u = X A saved from the forward), written out so that XLA receives dY as one value. With
    autodiff XLA:CPU fused the producer of dY (e.g. the SiLU-gate backward) into each of its
    consumers, once per layout: the token-contracting dB dot got its own transposed recomputation
    of it. The LoRA fwd + bwd of scripts/bench_forward.py ran 15-25% faster this way (see
    docs/performance.md); gradients equal autodiff's (tests/test_lora.py)."""
    return _lora_delta_fwd(x, a, b, scale)[0]


def _lora_delta_fwd(x, a, b, scale):
    u = jnp.einsum("...i,ir->...r", x, a)
    return scale * jnp.einsum("...r,ro->...o", u, b), (x, a, b, u)


def _lora_delta_bwd(scale, res, dy):
    x, a, b, u = res
    du = scale * jnp.einsum("...o,ro->...r", dy, b)
    return (jnp.einsum("...r,ir->...i", du, a), jnp.einsum("...i,...r->ir", x, du),
            scale * jnp.einsum("...r,...o->ro", u, dy))


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def dense(x, p: Params, lora: Params | None, lora_scale: float, dropout: tuple[float, jax.Array] | None = None):
    """x W (+ b) (+ scale * (drop(x) A) B). The LoRA path never touches W.

    dropout: (rate, key) applies inverted dropout to the LoRA input only (as PEFT's lora_dropout).
    """
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
    if p.get("bias") is not None:
        y = y + p["bias"].astype(x.dtype)
    if lora is not None:
        a, b = lora["lora_a"].astype(x.dtype), lora["lora_b"].astype(x.dtype)
        xl = x
        if dropout is not None and dropout[0] > 0:
            rate, key = dropout
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            xl = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
        y = y + lora_delta(xl, a, b, float(lora_scale))
    return y


# ---------------------------------------------------------------------------------------------
# Flax modules. Each parameter comes from its declaration in params.py, found by the module's path.


def _declare(module: nn.Module, leaf: str, cfg: ModelConfig, dtype) -> jax.Array | None:
    """The parameter `leaf` of `module` as declared in params.py (None when `cfg` has no such
    parameter). Stacked parameters are declared per layer; `nn.scan` adds the "layers" axis."""
    decl = by_path(cfg).get(tuple(module.scope.path) + (leaf,))
    if decl is None:
        return None
    axes, shape = decl.axes, decl.shape(cfg)
    if decl.stacked:
        axes, shape = axes[1:], shape[1:]
    return module.param(leaf, nn.with_logical_partitioning(decl.initializer(), axes), shape, dtype)


class Linear(nn.Module):
    """`dense` with its kernel (and bias) declared in params.py and its LoRA leaves, when the adapter
    targets it, read from the "lora" collection."""

    cfg: ModelConfig
    lora_scale: float = 1.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, dropout=None):
        p = {"kernel": _declare(self, "kernel", self.cfg, self.param_dtype),
             "bias": _declare(self, "bias", self.cfg, self.param_dtype)}
        lora = None
        if self.has_variable("lora", "lora_a"):
            lora = {"lora_a": self.get_variable("lora", "lora_a"), "lora_b": self.get_variable("lora", "lora_b")}
        return dense(x, p, lora, self.lora_scale, dropout)


class RMSNorm(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return rms_norm(x, _declare(self, "scale", self.cfg, self.param_dtype), self.cfg.rms_norm_eps)


def _fresh_prefill(cache_index, cache_len: int, length: int) -> bool:
    """True when the cache write index is the static 0 (a Python int, as `init_cache(...,
    static_index=True)` gives) and the cache is exactly as long as the new tokens."""
    return isinstance(cache_index, int) and cache_index == 0 and cache_len == length


class Attention(nn.Module):
    cfg: ModelConfig
    attn_impl: str = "xla"
    lora_scale: float = 1.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids, inv_freq, kv_cache, cache_index, drop):
        """kv_cache: None or (k [L,B,K,D,S], v [L,B,K,S,D], layer index, cache segment ids [B,S]):
        the whole stacked cache (see `init_cache`), of which only this layer's new slots are written
        (in place when the cache is a loop carry), so a decode step never copies the cache; or
        (k pool, v pool, layer index, PagedIndex): the paged pools (see attention.PagedKV)."""
        cfg = self.cfg
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        linear = functools.partial(Linear, cfg, self.lora_scale, self.param_dtype)
        q = linear(name="q_proj")(x, drop(0)).reshape(batch, length, heads, head_dim)
        k = linear(name="k_proj")(x, drop(1)).reshape(batch, length, kv_heads, head_dim)
        v = linear(name="v_proj")(x, drop(2)).reshape(batch, length, kv_heads, head_dim)
        if cfg.qk_norm:
            q = RMSNorm(cfg, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg, self.param_dtype, name="k_norm")(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))

        if kv_cache is not None and isinstance(kv_cache[3], PagedIndex):  # paged pools (the paged engine)
            k_pool, v_pool, layer, index = kv_cache
            o, k_pool, v_pool = paged_attention(q, k, v, k_pool, v_pool, layer, index, positions,
                                                num_layers=cfg.num_layers, impl=self.attn_impl)
            new_cache = (k_pool, v_pool)
        elif kv_cache is None:
            o = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_offset=0, causal=True,
                          impl=self.attn_impl)
            new_cache = None
        else:
            ck_all, cv_all, layer, cache_segment_ids = kv_cache  # [L, B, K, D, S] / [L, B, K, S, D]
            ck_all = jax.lax.dynamic_update_slice(ck_all, k.transpose(0, 2, 3, 1)[None].astype(ck_all.dtype),
                                                  (layer, 0, 0, 0, cache_index))
            cv_all = jax.lax.dynamic_update_slice(cv_all, v.transpose(0, 2, 1, 3)[None].astype(cv_all.dtype),
                                                  (layer, 0, 0, cache_index, 0))
            if self.attn_impl != "xla" and _fresh_prefill(cache_index, ck_all.shape[-1], length):
                # a prefill into an empty cache of its own length: the new tokens attend only to
                # themselves, so the training kernel (flash / cuDNN's causal path) applies as is
                o = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_offset=0,
                              causal=True, impl=self.attn_impl)
            else:
                ck = constrain(jax.lax.dynamic_index_in_dim(ck_all, layer, axis=0, keepdims=False),
                               CACHE_AXES["k"][1:])
                cv = constrain(jax.lax.dynamic_index_in_dim(cv_all, layer, axis=0, keepdims=False),
                               CACHE_AXES["v"][1:])
                o = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), q_segment_ids=segment_ids,
                              kv_segment_ids=cache_segment_ids, q_offset=cache_index, causal=True,
                              impl="xla" if self.attn_impl == "pallas" else self.attn_impl, kv_layout="cache")
            new_cache = (ck_all, cv_all)
        o = linear(name="o_proj")(o.reshape(batch, length, heads * head_dim), drop(3))
        return o, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    lora_scale: float = 1.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, drop):
        linear = functools.partial(Linear, self.cfg, self.lora_scale, self.param_dtype)
        gate = linear(name="gate_proj")(x, drop(4))
        up = linear(name="up_proj")(x, drop(5))
        gate = constrain(gate, ("act_batch", "act_seq", "act_mlp"))
        return linear(name="down_proj")(jax.nn.silu(gate) * up, drop(6))


class DecoderLayer(nn.Module):
    """One decoder layer, the body of the layer scan.

    carry: h [B, T, E], or (h, cache k, cache v) when decoding with a KV cache. xs: (LoRA dropout key
    of this layer or None, layer index). The other arguments are the same for every layer.
    """

    cfg: ModelConfig
    attn_impl: str = "xla"
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, xs, positions, segment_ids, inv_freq, cache_segment_ids, cache_index):
        cfg = self.cfg
        drop_key, layer = xs
        cached = isinstance(carry, tuple)
        h = carry[0] if cached else carry

        def drop(i):  # each projection draws its own dropout mask
            return None if drop_key is None else (self.lora_dropout, jax.random.fold_in(drop_key, i))

        x = RMSNorm(cfg, self.param_dtype, name="input_layernorm")(h)
        kv_cache = (carry[1], carry[2], layer, cache_segment_ids) if cached else None
        o, new_cache = Attention(cfg, self.attn_impl, self.lora_scale, self.param_dtype, name="self_attn")(
            x, positions, segment_ids, inv_freq, kv_cache, cache_index, drop)
        h = constrain(h + o, ("act_batch", "act_seq", "act_embed"))
        x = RMSNorm(cfg, self.param_dtype, name="post_attention_layernorm")(h)
        y = MLP(cfg, self.lora_scale, self.param_dtype, name="mlp")(x, drop)
        h = constrain(h + y, ("act_batch", "act_seq", "act_embed"))
        return ((h,) + new_cache if cached else h), None


class Decoder(nn.Module):
    """The whole decoder up to the final norm. Variables: "params" (the base tree) and optionally
    "lora" (the adapter tree). Returns hidden states [B, T, E] (and the new cache with `cache`)."""

    cfg: ModelConfig
    attn_impl: str = "xla"
    remat: str = "none"
    dtype: Any = None  # compute dtype; None = the dtype of the embedding
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    param_dtype: Any = jnp.float32  # dtype of parameters created by `init`

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, cache=None, drop_keys=None):
        cfg = self.cfg
        _check_remat(self.remat)
        embedding = _Embed(cfg, self.param_dtype, name="embed_tokens")()
        if self.is_initializing() and not cfg.tie_word_embeddings:
            _HeadKernel(cfg, self.param_dtype, name="lm_head")()  # declared here, read by lm_head_kernel
        dtype = self.dtype or embedding.dtype
        tokens = constrain(tokens, ("act_batch", "act_seq"))
        h = jnp.take(embedding, tokens, axis=0).astype(dtype)
        h = constrain(h, ("act_batch", "act_seq", "act_embed"))
        inv_freq = rope_inv_freq(cfg)

        layer = DecoderLayer
        if self.remat != "none":
            layer = nn.remat(layer, policy=_POLICIES[self.remat], prevent_cse=False)
        layers = nn.scan(layer, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                         length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        layers = layers(cfg, self.attn_impl, self.lora_scale, self.lora_dropout, self.param_dtype, name="layers")
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        if cache is None:
            h, _ = layers(h, (drop_keys, layer_ids), positions, segment_ids, inv_freq, None, 0)
            new_cache = None
        elif isinstance(cache, PagedKV):
            index = PagedIndex(cache.page_table, cache.valid, cache.fresh)
            (h, ks, vs), _ = layers((h, cache.k, cache.v), (drop_keys, layer_ids), positions, segment_ids,
                                    inv_freq, index, 0)
            new_cache = cache._replace(k=ks, v=vs)
        else:
            idx = cache["index"]
            cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(
                cache["segment_ids"], segment_ids.astype(jnp.int32), idx, axis=1)
            (h, ks, vs), _ = layers((h, cache["k"], cache["v"]), (drop_keys, layer_ids), positions, segment_ids,
                                    inv_freq, cache_segment_ids, idx)
            new_cache = {"k": ks, "v": vs, "segment_ids": cache_segment_ids, "index": idx + tokens.shape[1]}
        h = RMSNorm(cfg, self.param_dtype, name="norm")(h)
        return h if cache is None else (h, new_cache)


class _Embed(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return _declare(self, "embedding", self.cfg, self.param_dtype)


class _HeadKernel(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return _declare(self, "kernel", self.cfg, self.param_dtype)


# ---------------------------------------------------------------------------------------------
# parameter shapes and logical axes: the abstract `Decoder.init` (no memory is allocated)


@functools.lru_cache(maxsize=16)
def _abstract_params(cfg: ModelConfig, dtype_name: str) -> Params:
    """The boxed (nn.LogicallyPartitioned) parameter tree of `Decoder.init`, shapes only."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    model = Decoder(cfg, param_dtype=jnp.dtype(dtype_name))
    return jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, tokens)["params"]


def _unboxed(cfg: ModelConfig, dtype, fn) -> Params:
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(fn, _abstract_params(cfg, jnp.dtype(dtype).name), is_leaf=is_box)


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (same tree structure as the params), as the Flax
    module declares them (`nn.with_logical_partitioning`, "layers" added by the layer scan)."""
    return _unboxed(cfg, jnp.float32, lambda box: tuple(box.names))


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> Params:
    """jax.ShapeDtypeStruct for every parameter (no memory is allocated)."""
    return _unboxed(cfg, dtype, lambda box: box.value)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (the declared initializers: normal(0, std) matrices, unit norms, zero
    biases) for tests and from-scratch models. One key per leaf, split in tree order (not Flax's
    per-path keys), so a seed gives the same weights as before the model moved to Flax."""
    shapes = param_shapes(cfg, dtype)
    decls = by_path(cfg)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = [decls[tuple(k.key for k in path)].initializer(std)(leaf_key, s.shape, dtype)
           for (path, s), leaf_key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


# Logical axes of the KV cache. Keys are stored [L, B, K, D, S] and values [L, B, K, S, D]: the two
# attention matmuls of a decode step (q k^T over D, p v over S) then read each layer's slice as it
# lies, where [B, S, K, D] made XLA transpose the whole cache of every layer at every step (on CPU
# that was a quarter of a decode step of the layers). attention(..., kv_layout="cache") reads it.
CACHE_AXES = {"k": ("layers", "act_batch", "act_kv_heads", "act_head_dim", "cache_seq"),
              "v": ("layers", "act_batch", "act_kv_heads", "cache_seq", "act_head_dim")}
CACHE_SEQ_AXIS = {name: axes.index("cache_seq") for name, axes in CACHE_AXES.items()}


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32, static_index: bool = False) -> dict:
    """An empty KV cache for `length` slots: k [L, B, K, D, S], v [L, B, K, S, D] (see CACHE_AXES),
    segment ids [B, S] (0 = empty slot), write index. static_index=True: the index is the Python int
    0, for a cache that one prefill of exactly `length` tokens fills (it can then attend through the
    model's attention kernel instead of over the cache; such a cache cannot be a loop carry)."""
    layers, kv_heads, head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    return {"k": jnp.zeros((layers, batch, kv_heads, head_dim, length), dtype),
            "v": jnp.zeros((layers, batch, kv_heads, length, head_dim), dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "index": 0 if static_index else jnp.zeros((), jnp.int32)}


# ---------------------------------------------------------------------------------------------
# the forward as pure functions of plain trees


def forward_hidden(params: Params, tokens, positions, segment_ids, cfg: ModelConfig, lora: Params | None = None,
                   lora_scale: float = 1.0, *, cache: dict | None = None, attn_impl: str = "xla",
                   remat: str = "none", dtype=None, lora_dropout: tuple[float, jax.Array] | None = None):
    """Final-norm hidden states [B, T, E] (and the updated cache when `cache` is given).

    tokens, positions, segment_ids: int32 [B, T]. segment_ids 0 = padding; packed sequences use
    distinct ids with positions restarting at 0. With `cache`, the T new tokens are written at
    `cache["index"]` and attend to everything written before them; a `PagedKV` cache writes them
    into the pages of their `positions` and each attends to its row's positions up to its own.
    lora_dropout: (rate, PRNG key)
    drops the input of every LoRA path (training only; the rate is static, the key may be traced).
    """
    _check_remat(remat)
    rate, drop_keys = 0.0, None  # one dropout key per layer, scanned with the weights
    if lora_dropout is not None and lora is not None and lora.get("layers") is not None:
        rate = float(lora_dropout[0])
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"lora_dropout rate {rate} must be in [0, 1)")
        if rate > 0:
            drop_keys = jax.random.split(lora_dropout[1], cfg.num_layers)
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    model = Decoder(cfg, attn_impl=attn_impl, remat=remat, dtype=dtype, lora_scale=lora_scale, lora_dropout=rate)
    return model.apply(variables, tokens, positions, segment_ids, cache=cache, drop_keys=drop_keys)


def lm_head_kernel(params: Params, cfg: ModelConfig) -> jax.Array:
    """The [E, V] output projection (the transposed embedding when tied)."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def lm_head(params: Params, hidden, cfg: ModelConfig, out_dtype=jnp.float32):
    """Logits [..., V] from hidden states; accumulation in float32."""
    w = lm_head_kernel(params, cfg)
    logits = jnp.einsum("...e,ev->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return constrain(logits.astype(out_dtype), ("act_batch", "act_seq", "act_vocab")) if logits.ndim == 3 \
        else logits.astype(out_dtype)


def forward(params: Params, tokens, positions, segment_ids, cfg: ModelConfig, lora: Params | None = None,
            lora_scale: float = 1.0, **kw):
    """Logits [B, T, V] in float32 (a convenience over forward_hidden + lm_head)."""
    out = forward_hidden(params, tokens, positions, segment_ids, cfg, lora, lora_scale, **kw)
    if kw.get("cache") is not None:
        h, cache = out
        return lm_head(params, h, cfg), cache
    return lm_head(params, out, cfg)


@dataclasses.dataclass(frozen=True)
class Model:
    """A model and the static options of its forward pass, travelling as one value.

    Hashable, so it can be a static argument of `jax.jit`. Losses, the sampler and the train step take
    one `Model` instead of threading lora_scale / attn_impl / remat / dtype / lora_dropout separately.
    `dtype` is the compute dtype name (None: the dtype of the base weights).
    """

    cfg: ModelConfig
    lora_scale: float = 1.0
    attn_impl: str = "xla"
    remat: str = "none"
    dtype: str | None = None
    lora_dropout: float = 0.0

    def hidden(self, params: Params, lora: Params | None, tokens, positions, segment_ids, *,
               cache: dict | None = None, rng: jax.Array | None = None):
        """Final-norm hidden states (and the new cache when `cache` is given). LoRA dropout is applied
        only when this model has a rate > 0, a LoRA tree is given and `rng` is given (training)."""
        dropout = None
        if self.lora_dropout > 0 and lora is not None:
            if rng is None:
                raise ValueError(f"lora_dropout={self.lora_dropout} needs an rng key (the trained forward)")
            dropout = (float(self.lora_dropout), rng)
        return forward_hidden(params, tokens, positions, segment_ids, self.cfg, lora, self.lora_scale,
                              cache=cache, attn_impl=self.attn_impl, remat=self.remat,
                              dtype=None if self.dtype is None else jnp.dtype(self.dtype), lora_dropout=dropout)

    def head_kernel(self, params: Params) -> jax.Array:
        """The [E, V] output projection."""
        return lm_head_kernel(params, self.cfg)

    def logits(self, params: Params, hidden, out_dtype=jnp.float32) -> jax.Array:
        return lm_head(params, hidden, self.cfg, out_dtype)


def positions_from_segments(segment_ids) -> jax.Array:
    """Positions that restart at 0 for every segment and skip padding (left padding or packing)."""
    seg = jnp.asarray(segment_ids)
    valid = (seg != 0).astype(jnp.int32)
    csum = jnp.cumsum(valid, axis=1)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    base = jax.lax.cummax(jnp.where(starts, csum - valid, 0), axis=1)
    return jnp.where(valid == 1, csum - 1 - base, 0)
