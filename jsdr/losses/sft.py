"""Supervised fine-tuning: next-token cross-entropy on the response tokens, with sequence packing.

Batch: `jsdr.data.batches.SFTBatch` (all [B, T]; `pack_sft_examples` makes one):
    tokens, positions, segment_ids  int32  inputs; segment id 0 = padding, packed examples get
                                           distinct ids 1, 2, ... within a row, positions restart
    targets                         int32  targets[b, t] = the token after tokens[b, t]
    mask                            f32    1 where targets[b, t] is a response token of the same
                                           example (prompt, padding and example ends are 0)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jsdr.config import check, field
from jsdr.data.batches import SFTBatch
from jsdr.losses import divergence
from jsdr.losses.common import check_chunk
from jsdr.model.transformer import Model


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    reduction: Literal["token", "sequence"] = field(
        "token", "token: cross-entropy summed over the mask / mask sum (every response token weighs the same) | "
                 "sequence: mean over each packed example's response tokens, then over the examples")
    chunk_size: int | None = field(divergence.DEFAULT_CHUNK, "positions per lm-head chunk (None = one chunk)")

    def __post_init__(self):
        check(self.reduction in ("token", "sequence"), "reduction", f"{self.reduction!r}: choose token or sequence")
        check_chunk(self.chunk_size)


def sft_head_loss(h, targets, mask, segment_ids, kernel, cfg: SFTConfig = SFTConfig()):
    """The SFT loss from final hidden states h [B, T, E]. Returns (loss, metrics: loss, accuracy
    (argmax = target over the mask), n_tokens)."""
    mask = jnp.asarray(mask, jnp.float32)
    ce, correct = divergence.cross_entropy(h, targets, kernel, chunk_size=cfg.chunk_size)
    if cfg.reduction == "token":
        loss = divergence.token_mean(ce, mask)
    else:
        B, T = mask.shape
        seg = jnp.asarray(segment_ids, jnp.int32)
        key = (jnp.arange(B, dtype=jnp.int32)[:, None] * (T + 1) + seg).reshape(-1)
        num = jax.ops.segment_sum(jnp.where(mask > 0, ce * mask, 0.0).reshape(-1), key, B * (T + 1))
        den = jax.ops.segment_sum(mask.reshape(-1), key, B * (T + 1))
        per_example = num / jnp.maximum(den, 1.0)
        loss = jnp.sum(per_example) / jnp.maximum(jnp.sum((den > 0).astype(jnp.float32)), 1.0)
    metrics = {"loss": loss, "accuracy": divergence.token_mean(correct, mask), "n_tokens": jnp.sum(mask)}
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def sft_loss(lora, params, batch: SFTBatch, rng=None, *, model: Model, cfg: SFTConfig = SFTConfig()):
    """(loss f32, metrics) of one SFT micro-batch; differentiable w.r.t. `lora` (or w.r.t. `params` with
    lora=None: full fine-tuning). `rng` is used only for LoRA dropout (model.lora_dropout > 0)."""
    h = model.hidden(params, lora, batch.tokens, batch.positions, batch.segment_ids, rng=rng)
    return sft_head_loss(h, batch.targets, batch.mask, batch.segment_ids, model.head_kernel(params), cfg)
