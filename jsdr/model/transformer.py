"""The decoder: Llama 3.x, Qwen2/2.5 and Qwen3 as one pure function.

The families differ only by flags of `ModelConfig`: qkv bias (Qwen2), per-head q/k RMSNorm
(Qwen3), rope scaling ("llama3", "linear"), tied embeddings, head_dim. Parameters are a plain
nested dict with HF-derived names; the decoder layers are stacked on a leading axis and run
with `lax.scan`, so compile time does not grow with depth.

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

A LoRA tree (see lora.py) mirrors the targeted projections: {"lora_a": [L, in, r], "lora_b":
[L, r, out]}; each targeted projection computes x W + scale * (x A) B.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jsdr.model.attention import attention
from jsdr.sharding import constrain

Params = dict[str, Any]

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs of the HF rope dict, or None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias=true also biases o_proj; Qwen2 does not
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "qwen3"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling or ())

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(self)))


# ---------------------------------------------------------------------------------------------
# parameter shapes and logical axes


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (same tree structure as the params)."""
    attn = {
        "q_proj": {"kernel": ("layers", "embed", "q_heads")},
        "k_proj": {"kernel": ("layers", "embed", "kv_heads")},
        "v_proj": {"kernel": ("layers", "embed", "kv_heads")},
        "o_proj": {"kernel": ("layers", "q_heads", "embed")},
    }
    if cfg.qkv_bias:
        attn["q_proj"]["bias"] = ("layers", "q_heads")
        attn["k_proj"]["bias"] = ("layers", "kv_heads")
        attn["v_proj"]["bias"] = ("layers", "kv_heads")
    if cfg.o_bias:
        attn["o_proj"]["bias"] = ("layers", "embed")
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": ("layers", "head_dim")}
        attn["k_norm"] = {"scale": ("layers", "head_dim")}
    tree = {
        "embed_tokens": {"embedding": ("vocab", "embed")},
        "layers": {
            "input_layernorm": {"scale": ("layers", "norm")},
            "self_attn": attn,
            "post_attention_layernorm": {"scale": ("layers", "norm")},
            "mlp": {
                "gate_proj": {"kernel": ("layers", "embed", "mlp")},
                "up_proj": {"kernel": ("layers", "embed", "mlp")},
                "down_proj": {"kernel": ("layers", "mlp", "embed")},
            },
        },
        "norm": {"scale": ("norm",)},
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"kernel": ("embed", "vocab")}
    return tree


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> Params:
    """jax.ShapeDtypeStruct for every parameter (no memory is allocated)."""
    L, E, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    HD, KD, D = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    dims = {"layers": L, "embed": E, "mlp": F, "vocab": V, "q_heads": HD, "kv_heads": KD,
            "head_dim": D, "norm": E}

    def shape_of(axes):
        return jax.ShapeDtypeStruct(tuple(dims[a] for a in axes), dtype)

    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)
    return jax.tree.map(shape_of, param_axes(cfg), is_leaf=is_axes)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norms) for tests and from-scratch models."""
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, s), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(s.shape, dtype))
        elif "bias" in name:
            out.append(jnp.zeros(s.shape, dtype))
        else:
            out.append((std * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


# ---------------------------------------------------------------------------------------------
# building blocks


def rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [D/2] including the rope scaling of the config."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
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


def dense(x, p: Params, lora: Params | None, lora_scale: float, dropout: tuple[float, jax.Array] | None = None):
    """x W (+ b) (+ scale * (drop(x) A) B). The LoRA path never touches W.

    dropout: (rate, key) applies inverted dropout to the LoRA input only (as PEFT's lora_dropout).
    """
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    if lora is not None:
        a, b = lora["lora_a"].astype(x.dtype), lora["lora_b"].astype(x.dtype)
        xl = x
        if dropout is not None and dropout[0] > 0:
            rate, key = dropout
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            xl = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
        y = y + lora_scale * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", xl, a), b)
    return y


def _sub(tree, *keys):
    for k in keys:
        if tree is None:
            return None
        tree = tree.get(k)
    return tree


def decoder_layer(cfg: ModelConfig, h, lp: Params, ll: Params | None, lora_scale, positions,
                  segment_ids, kv_cache, cache_index, inv_freq, attn_impl, lora_dropout=None):
    """One decoder layer. kv_cache: None or (k [L,B,K,D,S], v [L,B,K,S,D], layer index, cache segment
    ids [B,S]): the whole stacked cache (see `init_cache`), of which only this layer's new slots are
    written (in place when the cache is a loop carry), so a decode step never copies the cache.

    lora_dropout: None or (rate, key of this layer); each projection draws its own mask.
    """
    B, T, _ = h.shape
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn_p, attn_l = lp["self_attn"], _sub(ll, "self_attn")

    def drop(i):
        if lora_dropout is None:
            return None
        return lora_dropout[0], jax.random.fold_in(lora_dropout[1], i)

    x = rms_norm(h, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
    q = dense(x, attn_p["q_proj"], _sub(attn_l, "q_proj"), lora_scale, drop(0)).reshape(B, T, H, D)
    k = dense(x, attn_p["k_proj"], _sub(attn_l, "k_proj"), lora_scale, drop(1)).reshape(B, T, K, D)
    v = dense(x, attn_p["v_proj"], _sub(attn_l, "v_proj"), lora_scale, drop(2)).reshape(B, T, K, D)
    if cfg.qk_norm:
        q = rms_norm(q, attn_p["q_norm"]["scale"], cfg.rms_norm_eps)
        k = rms_norm(k, attn_p["k_norm"]["scale"], cfg.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    q = constrain(q, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
    k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))

    if kv_cache is None:
        o = attention(q, k, v, segment_ids, segment_ids, 0, True, attn_impl)
        new_cache = None
    else:
        ck_all, cv_all, layer, cseg = kv_cache  # [L, B, K, D, S] / [L, B, K, S, D]
        ck_all = jax.lax.dynamic_update_slice(ck_all, k.transpose(0, 2, 3, 1)[None].astype(ck_all.dtype),
                                              (layer, 0, 0, 0, cache_index))
        cv_all = jax.lax.dynamic_update_slice(cv_all, v.transpose(0, 2, 1, 3)[None].astype(cv_all.dtype),
                                              (layer, 0, 0, cache_index, 0))
        ck = constrain(jax.lax.dynamic_index_in_dim(ck_all, layer, axis=0, keepdims=False), CACHE_AXES["k"][1:])
        cv = constrain(jax.lax.dynamic_index_in_dim(cv_all, layer, axis=0, keepdims=False), CACHE_AXES["v"][1:])
        o = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), segment_ids, cseg, cache_index, True,
                      "xla" if attn_impl == "pallas" else attn_impl, kv_layout="cache")
        new_cache = (ck_all, cv_all)
    o = dense(o.reshape(B, T, H * D), attn_p["o_proj"], _sub(attn_l, "o_proj"), lora_scale, drop(3))
    h = h + o
    h = constrain(h, ("act_batch", "act_seq", "act_embed"))

    mlp_p, mlp_l = lp["mlp"], _sub(ll, "mlp")
    x = rms_norm(h, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    g = dense(x, mlp_p["gate_proj"], _sub(mlp_l, "gate_proj"), lora_scale, drop(4))
    u = dense(x, mlp_p["up_proj"], _sub(mlp_l, "up_proj"), lora_scale, drop(5))
    g = constrain(g, ("act_batch", "act_seq", "act_mlp"))
    y = dense(jax.nn.silu(g) * u, mlp_p["down_proj"], _sub(mlp_l, "down_proj"), lora_scale, drop(6))
    h = constrain(h + y, ("act_batch", "act_seq", "act_embed"))
    return h, new_cache


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if policy not in policies:
        raise ValueError(f"remat policy {policy!r} unknown; choose one of {REMAT_POLICIES}")
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


# Logical axes of the KV cache. Keys are stored [L, B, K, D, S] and values [L, B, K, S, D]: the two
# attention matmuls of a decode step (q k^T over D, p v over S) then read each layer's slice as it
# lies, where [B, S, K, D] made XLA transpose the whole cache of every layer at every step (on CPU
# that was a quarter of a decode step of the layers). attention(..., kv_layout="cache") reads it.
CACHE_AXES = {"k": ("layers", "act_batch", "act_kv_heads", "act_head_dim", "cache_seq"),
              "v": ("layers", "act_batch", "act_kv_heads", "cache_seq", "act_head_dim")}
CACHE_SEQ_AXIS = {name: axes.index("cache_seq") for name, axes in CACHE_AXES.items()}


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for `length` slots: k [L, B, K, D, S], v [L, B, K, S, D] (see CACHE_AXES),
    segment ids [B, S] (0 = empty slot), write index."""
    L, K, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    return {"k": jnp.zeros((L, batch, K, D, length), dtype), "v": jnp.zeros((L, batch, K, length, D), dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def forward_hidden(params: Params, tokens, positions, segment_ids, cfg: ModelConfig, lora: Params | None = None,
                   lora_scale: float = 1.0, *, cache: dict | None = None, attn_impl: str = "xla",
                   remat: str = "none", dtype=None, lora_dropout: tuple[float, jax.Array] | None = None):
    """Final-norm hidden states [B, T, E] (and the updated cache when `cache` is given).

    tokens, positions, segment_ids: int32 [B, T]. segment_ids 0 = padding; packed sequences use
    distinct ids with positions restarting at 0. With `cache`, the T new tokens are written at
    `cache["index"]` and attend to everything written before them. lora_dropout: (rate, PRNG key)
    drops the input of every LoRA path (training only; the rate is static, the key may be traced).
    """
    dtype = dtype or params["embed_tokens"]["embedding"].dtype
    tokens = constrain(tokens, ("act_batch", "act_seq"))
    h = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dtype)
    h = constrain(h, ("act_batch", "act_seq", "act_embed"))
    inv_freq = rope_inv_freq(cfg)
    layer_lora = None if lora is None else lora.get("layers")
    T = tokens.shape[1]
    rate = 0.0
    drop_keys = None  # one key per layer, scanned with the weights
    if lora_dropout is not None and layer_lora is not None:
        rate = float(lora_dropout[0])
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"lora_dropout rate {rate} must be in [0, 1)")
        if rate > 0:
            drop_keys = jax.random.split(lora_dropout[1], cfg.num_layers)
    layer_drop = lambda k: None if k is None else (rate, k)

    if cache is None:
        def body(h, xs):
            lp, ll, dk = xs
            h, _ = decoder_layer(cfg, h, lp, ll, lora_scale, positions, segment_ids, None, 0, inv_freq, attn_impl,
                                 layer_drop(dk))
            return h, None
        h, _ = jax.lax.scan(_remat(body, remat), h, (params["layers"], layer_lora, drop_keys))
        new_cache = None
    else:
        idx = cache["index"]
        cseg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32), idx, axis=1)

        def body(carry, xs):
            h, ck, cv = carry
            lp, ll, dk, layer = xs
            h, (ck, cv) = decoder_layer(cfg, h, lp, ll, lora_scale, positions, segment_ids, (ck, cv, layer, cseg),
                                        idx, inv_freq, attn_impl, layer_drop(dk))
            return (h, ck, cv), None
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, ks, vs), _ = jax.lax.scan(_remat(body, remat), (h, cache["k"], cache["v"]),
                                      (params["layers"], layer_lora, drop_keys, layers))
        new_cache = {"k": ks, "v": vs, "segment_ids": cseg, "index": idx + T}

    h = rms_norm(h, params["norm"]["scale"], cfg.rms_norm_eps)
    return h if cache is None else (h, new_cache)


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
