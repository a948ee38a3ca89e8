"""Small helpers shared by the loss modules: config validation and the model forward."""

from __future__ import annotations

from typing import Any

import jax

from jsdr.model.transformer import ModelConfig, forward_hidden


def check_choice(cls: str, field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{cls}.{field}={value!r} is not supported; choose one of {allowed}")


def check_range(cls: str, field: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, kind: type | tuple = (int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{cls}.{field}={value!r} must be a number")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{cls}.{field}={value!r} must be in {lb}{'-inf' if lo is None else lo}, "
                         f"{'inf' if hi is None else hi}{rb}")


def check_chunk(cls: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{cls}.chunk_size={value!r} must be a positive int (positions per lm-head chunk) "
                         f"or None (one chunk)")


def hidden(params, lora, tokens, positions, segment_ids, model_cfg: ModelConfig, lora_scale: float,
           remat: str, attn_impl: str, dtype, lora_dropout: float = 0.0, rng=None) -> jax.Array:
    """forward_hidden with the loss functions' static forward options. LoRA dropout (rate > 0) is
    applied only with a LoRA tree and an rng (the trained forward; never teacher/reference)."""
    kw = {}
    if lora_dropout and lora_dropout > 0 and lora is not None:
        if rng is None:
            raise ValueError(f"lora_dropout={lora_dropout} needs an rng key passed to the loss function")
        kw["lora_dropout"] = (float(lora_dropout), rng)
    return forward_hidden(params, tokens, positions, segment_ids, model_cfg, lora, lora_scale,
                          attn_impl=attn_impl, remat=remat, dtype=dtype, **kw)
