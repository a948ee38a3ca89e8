"""Supervised fine-tuning: next-token cross-entropy on the response tokens, with sequence packing.

Batch (all [B, T]; `pack_sft_examples` makes one):
    tokens, positions, segment_ids  int32  inputs; segment id 0 = padding, packed examples get
                                           distinct ids 1, 2, ... within a row, positions restart
    targets                         int32  targets[b, t] = the token after tokens[b, t]
    mask                            f32    1 where targets[b, t] is a response token of the same
                                           example (prompt, padding and example ends are 0)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr.losses import divergence as D
from jsdr.losses.common import check_choice, check_chunk, hidden
from jsdr.model.transformer import ModelConfig, lm_head_kernel

REDUCTIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """reduction: "token" (cross-entropy summed over the mask / mask sum: every response token
    weighs the same) or "sequence" (mean over each packed example's response tokens, then over the
    examples that have any). chunk_size: positions per lm-head chunk (None = one chunk)."""

    reduction: str = "token"
    chunk_size: int | None = D.DEFAULT_CHUNK

    def __post_init__(self):
        check_choice("SFTConfig", "reduction", self.reduction, REDUCTIONS)
        check_chunk("SFTConfig", self.chunk_size)


def sft_head_loss(h, targets, mask, segment_ids, kernel, cfg: SFTConfig = SFTConfig()):
    """The SFT loss from final hidden states h [B, T, E]. Returns (loss, metrics: loss, accuracy
    (argmax = target over the mask), n_tokens)."""
    mask = jnp.asarray(mask, jnp.float32)
    ce, correct = D.cross_entropy(h, targets, kernel, chunk_size=cfg.chunk_size)
    if cfg.reduction == "token":
        loss = D.token_mean(ce, mask)
    else:
        B, T = mask.shape
        seg = jnp.asarray(segment_ids, jnp.int32)
        key = (jnp.arange(B, dtype=jnp.int32)[:, None] * (T + 1) + seg).reshape(-1)
        num = jax.ops.segment_sum(jnp.where(mask > 0, ce * mask, 0.0).reshape(-1), key, B * (T + 1))
        den = jax.ops.segment_sum(mask.reshape(-1), key, B * (T + 1))
        per_example = num / jnp.maximum(den, 1.0)
        loss = jnp.sum(per_example) / jnp.maximum(jnp.sum((den > 0).astype(jnp.float32)), 1.0)
    metrics = {"loss": loss, "accuracy": D.token_mean(correct, mask), "n_tokens": jnp.sum(mask)}
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def sft_loss(lora, params, batch, rng=None, *, model_cfg: ModelConfig, cfg: SFTConfig = SFTConfig(),
             lora_scale: float = 1.0, remat: str = "none", attn_impl: str = "xla", dtype=None,
             lora_dropout: float = 0.0):
    """(loss f32, metrics) of one SFT micro-batch; differentiable w.r.t. `lora`. `rng` is used only
    for LoRA dropout (lora_dropout > 0)."""
    h = hidden(params, lora, batch["tokens"], batch["positions"], batch["segment_ids"], model_cfg, lora_scale,
               remat, attn_impl, dtype, lora_dropout, rng)
    return sft_head_loss(h, batch["targets"], batch["mask"], batch["segment_ids"], lm_head_kernel(params, model_cfg),
                         cfg)


def pack_sft_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, *,
                      num_rows: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pack (prompt_ids, response_ids) examples into rows of `seq_len` tokens.

    Greedy first fit in the given order: each example goes into the first row with room for
    len(prompt) + len(response) tokens, else into a new row. Rows are right-padded with `pad_id`
    (segment id 0). `num_rows` fixes the number of rows (static shapes; extra rows are all
    padding); it is an error if more are needed. An example longer than `seq_len` is an error
    (truncating or dropping overlong examples is the caller's decision)."""
    if seq_len < 2:
        raise ValueError(f"pack_sft_examples: seq_len={seq_len} must be at least 2")
    rows: list[list[tuple[list[int], list[int]]]] = []
    used: list[int] = []
    for i, (prompt, response) in enumerate(examples):
        p, r = list(prompt), list(response)
        n = len(p) + len(r)
        if n == 0:
            raise ValueError(f"example {i}: prompt and response are both empty")
        if n > seq_len:
            raise ValueError(f"example {i}: prompt ({len(p)}) + response ({len(r)}) = {n} tokens exceed "
                             f"seq_len={seq_len}; truncate or drop it before packing")
        for j in range(len(rows)):
            if used[j] + n <= seq_len:
                rows[j].append((p, r))
                used[j] += n
                break
        else:
            rows.append([(p, r)])
            used.append(n)
    B = len(rows) if num_rows is None else num_rows
    if len(rows) > B:
        raise ValueError(f"pack_sft_examples: the examples need {len(rows)} rows of {seq_len} tokens but "
                         f"num_rows={num_rows}")
    out = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "positions", "segment_ids", "targets")}
    out["tokens"][:] = pad_id
    out["targets"][:] = pad_id
    out["mask"] = np.zeros((B, seq_len), np.float32)
    for b, row in enumerate(rows):
        off = 0
        for s, (p, r) in enumerate(row, start=1):
            seq = p + r
            n = len(seq)
            sl = slice(off, off + n)
            out["tokens"][b, sl] = seq
            out["segment_ids"][b, sl] = s
            out["positions"][b, sl] = np.arange(n)
            out["targets"][b, off:off + n - 1] = seq[1:]
            # targets[t] = seq[t + 1] is a response token for t + 1 >= len(p)
            first = max(len(p) - 1, 0)
            out["mask"][b, off + first:off + n - 1] = 1.0
            off += n
    return out
