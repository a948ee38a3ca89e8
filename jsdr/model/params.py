"""One declaration per parameter: path, logical axes (hence shape), initializer, HF name, LoRA slot.

Everything else reads this table: the Flax model declares its parameters from it (transformer.py),
the checkpoint loader and saver take the HF names and transpose rules from it (hf.py), and LoRA
takes its targets, their in/out dims and axes and the PEFT module names from it (lora.py).

A parameter's shape is the size of each of its logical axes under a `ModelConfig` (`axis_sizes`);
its dtype is the model's parameter dtype (every parameter is stored in the checkpoint's dtype, or
the one asked for at load time). Layer parameters carry the logical axis "layers" first: they are
stacked over the decoder layers, and their HF name has an `{i}` for the layer index. Kernels are
stored [in, out], i.e. HF's [out, in] transposed (`transpose=True`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The sizes and family flags of a decoder (Llama 3.x, Qwen2/2.5, Qwen3)."""

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
        sizes = axis_sizes(self)
        return sum(math.prod(sizes[a] for a in p.axes) for p in declarations(self))


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The size of every logical parameter axis (q_heads / kv_heads are heads x head_dim, flattened)."""
    return {"layers": cfg.num_layers, "vocab": cfg.vocab_size, "embed": cfg.hidden_size, "norm": cfg.hidden_size,
            "mlp": cfg.intermediate_size, "q_heads": cfg.num_heads * cfg.head_dim,
            "kv_heads": cfg.num_kv_heads * cfg.head_dim, "head_dim": cfg.head_dim}


Init = Literal["normal", "ones", "zeros"]


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter.

    path: its place in the parameter tree; axes: its logical axes (one per dimension); init:
    normal(0, std) for matrices, ones for norm scales, zeros for biases; hf_name: the HF tensor name
    ("{i}" = layer index of a stacked parameter); transpose: HF stores it transposed ([out, in]);
    lora: a LoRA adapter can target it (a kernel [layers, in, out]: A is [layers, in, r], B is
    [layers, r, out]); present: whether a model of this config has it.
    """

    path: tuple[str, ...]
    axes: tuple[str, ...]
    init: Init
    hf_name: str
    transpose: bool = False
    lora: bool = False
    present: Callable[[ModelConfig], bool] = lambda cfg: True

    @property
    def stacked(self) -> bool:
        """Stacked over the decoder layers (axis 0), one HF tensor per layer."""
        return self.axes[0] == "layers"

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        sizes = axis_sizes(cfg)
        return tuple(sizes[a] for a in self.axes)

    def struct(self, cfg: ModelConfig, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape(cfg), jnp.dtype(dtype))

    def hf_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Shape of one HF tensor (one layer's slice of a stacked parameter, transposed back)."""
        shape = self.shape(cfg)[1:] if self.stacked else self.shape(cfg)
        return tuple(reversed(shape)) if self.transpose else shape

    def hf_names(self, cfg: ModelConfig) -> list[str]:
        """Every HF tensor name of this parameter (one per layer when stacked)."""
        return [self.hf_name.format(i=i) for i in range(cfg.num_layers)] if self.stacked else [self.hf_name]

    def initializer(self, std: float = 0.02) -> Callable:
        """fn(key, shape, dtype) -> array: normal(0, std) drawn in float32, ones or zeros."""
        if self.init == "ones":
            return lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype)
        if self.init == "zeros":
            return lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)
        return lambda key, shape, dtype=jnp.float32: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    # LoRA (kernels with lora=True only)

    @property
    def module(self) -> str:
        """The module name, which is also the PEFT target name ("q_proj")."""
        return self.path[-2]

    @property
    def block(self) -> str:
        """The layer block holding the module ("self_attn" or "mlp")."""
        return self.path[1]

    @property
    def lora_axes(self) -> tuple[str, str]:
        """(input axis, output axis) of a LoRA-capable kernel: A is [in, r], B is [r, out] per layer."""
        return self.axes[1], self.axes[2]

    @property
    def peft_module(self) -> str:
        """The module's HF name ("model.layers.{i}.self_attn.q_proj"); PEFT prefixes "base_model.model."."""
        return self.hf_name.rsplit(".", 1)[0]


def _layer(block: str, module: str, leaf: str, axes: tuple[str, ...], init: Init, **kw) -> Param:
    path = ("layers", block, module, leaf) if block else ("layers", module, leaf)
    hf_leaf = "bias" if leaf == "bias" else "weight"
    name = ".".join(p for p in ("model.layers.{i}", block, module, hf_leaf) if p)
    return Param(path, ("layers",) + axes, init, name, **kw)


def _kernel(block: str, module: str, axes: tuple[str, str]) -> Param:
    return _layer(block, module, "kernel", axes, "normal", transpose=True, lora=True)


PARAMS: tuple[Param, ...] = (
    Param(("embed_tokens", "embedding"), ("vocab", "embed"), "normal", "model.embed_tokens.weight"),
    _layer("", "input_layernorm", "scale", ("norm",), "ones"),
    _kernel("self_attn", "q_proj", ("embed", "q_heads")),
    _kernel("self_attn", "k_proj", ("embed", "kv_heads")),
    _kernel("self_attn", "v_proj", ("embed", "kv_heads")),
    _kernel("self_attn", "o_proj", ("q_heads", "embed")),
    _layer("self_attn", "q_proj", "bias", ("q_heads",), "zeros", present=lambda cfg: cfg.qkv_bias),
    _layer("self_attn", "k_proj", "bias", ("kv_heads",), "zeros", present=lambda cfg: cfg.qkv_bias),
    _layer("self_attn", "v_proj", "bias", ("kv_heads",), "zeros", present=lambda cfg: cfg.qkv_bias),
    _layer("self_attn", "o_proj", "bias", ("embed",), "zeros", present=lambda cfg: cfg.o_bias),
    _layer("self_attn", "q_norm", "scale", ("head_dim",), "ones", present=lambda cfg: cfg.qk_norm),
    _layer("self_attn", "k_norm", "scale", ("head_dim",), "ones", present=lambda cfg: cfg.qk_norm),
    _layer("", "post_attention_layernorm", "scale", ("norm",), "ones"),
    _kernel("mlp", "gate_proj", ("embed", "mlp")),
    _kernel("mlp", "up_proj", ("embed", "mlp")),
    _kernel("mlp", "down_proj", ("mlp", "embed")),
    Param(("norm", "scale"), ("norm",), "ones", "model.norm.weight"),
    Param(("lm_head", "kernel"), ("embed", "vocab"), "normal", "lm_head.weight", transpose=True,
          present=lambda cfg: not cfg.tie_word_embeddings),
)

# the projections a LoRA adapter can target, by module (= PEFT target) name, in canonical order
LORA_TARGETS: dict[str, Param] = {p.module: p for p in PARAMS if p.lora}


def declarations(cfg: ModelConfig) -> tuple[Param, ...]:
    """The parameters a model of `cfg` has, in declaration order."""
    return tuple(p for p in PARAMS if p.present(cfg))


def by_path(cfg: ModelConfig) -> dict[tuple[str, ...], Param]:
    return {p.path: p for p in declarations(cfg)}
