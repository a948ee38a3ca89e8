"""On-Policy Self-Distillation (OPSD): the student (problem only) is pulled towards the teacher (the
same model whose prompt also holds the reference solution) on the student's own rollout, token by
token, over the full vocabulary.

Batch: `jsdr.data.batches.OPSDBatch` (`build_opsd_batch` makes one):
    s_tokens, s_positions, s_segment_ids   int32 [B, Ts]  student prompt + rollout
    t_tokens, t_positions, t_segment_ids   int32 [B, Tt]  teacher prompt + rollout
    s_index, t_index                       int32 [B, N]   the hidden state at s_index[b, j] of the
                                                          student sequence (t_index[b, j] of the
                                                          teacher's) predicts rollout_tokens[b, j]
    rollout_tokens                         int32 [B, N]
    rollout_mask                           f32   [B, N]   1 for real rollout tokens
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jsdr.config import check, field
from jsdr.data.batches import OPSDBatch
from jsdr.losses import divergence
from jsdr.losses.common import check_chunk, check_number
from jsdr.model.transformer import Model

VARIANTS = ("full", "sampled_token", "top_k")
TEACHERS = ("fixed", "live", "ema")
REDUCTIONS = ("sequence", "token")
CLIP_MODES = ("token", "vocab")


@dataclasses.dataclass(frozen=True)
class OPSDConfig:
    """OPSD options (defaults: paper v1). v3 is beta=0.0 (forward KL) with the per-token clip: the
    public v3 code caps each vocabulary entry's KL summand at tau = 0.05 (Qwen3-1.7B/4B; 0.06 for 8B),
    i.e. clip_tau=0.05, clip_mode="vocab" (configs/paper/opsd-v3-* and configs/public/opsd-*)."""

    beta: float = field(0.5, "generalized-JSD weight, TRL convention: 0 = forward KL(teacher || student), "
                             "1 = reverse KL")
    temperature: float = field(1.1, "teacher and student logits are divided by it (the sampling temperature)")
    clip_tau: float | None = field(None, "cap of the per-token divergence (clip_mode token) or of each vocabulary "
                                         "entry's contribution (clip_mode vocab); None = off")
    clip_mode: Literal["token", "vocab"] = field("token", "token: clip each position's divergence | vocab: clip "
                                                          "each vocabulary term (the public code)")
    reduction: Literal["sequence", "token"] = field("sequence", "sequence: mean per rollout, then over rollouts "
                                                                "(the paper) | token: over all tokens (public code)")
    variant: Literal["full", "sampled_token", "top_k"] = field(
        "full", "full: whole vocabulary | sampled_token: a_t = sg(log p_T(y_t) - log p_S(y_t)) on the sampled token "
                "| top_k: both distributions restricted to the teacher's top_k tokens")
    top_k: int = field(20, "teacher top-k support of the top_k variant")
    teacher: Literal["fixed", "live", "ema"] = field("fixed", "fixed: base weights, LoRA off (the paper) | live: "
                                                              "current weights | ema: a moving average of the LoRA")
    ema_decay: float = field(0.999, "decay of the ema teacher")
    chunk_size: int | None = field(divergence.DEFAULT_CHUNK, "rollout positions per lm-head chunk (None = one chunk)")
    reason_first: bool = field(False, "the teacher first writes its own analysis of the reference solution (a "
                                      "generation of up to max_reasoning_tokens, prompts.reason_first), then scores "
                                      "the rollout after it (the public code's variant; teacher fixed or live)")
    max_reasoning_tokens: int = field(4096, "reason_first: longest analysis the teacher writes")

    def __post_init__(self):
        check_number(self.beta, "beta", 0.0, 1.0)
        check(isinstance(self.max_reasoning_tokens, int) and self.max_reasoning_tokens > 0, "max_reasoning_tokens",
              "must be a positive int")
        check(not (self.reason_first and self.teacher == "ema"), "reason_first",
              "needs teacher fixed or live (the analysis is sampled with the teacher's weights; the EMA tree is not "
              "a sampler input)")
        check_number(self.temperature, "temperature", 0.0, None, lo_open=True)
        if self.clip_tau is not None:
            check_number(self.clip_tau, "clip_tau", 0.0, None, lo_open=True)
            check(self.variant != "sampled_token", "clip_tau", "is only supported with variant 'full' or 'top_k' "
                  "(the sampled-token term is not a divergence); set clip_tau=None")
        for key, allowed in (("clip_mode", CLIP_MODES), ("reduction", REDUCTIONS), ("variant", VARIANTS),
                             ("teacher", TEACHERS)):
            value = getattr(self, key)
            check(value in allowed, key, f"{value!r} is not supported; choose one of {list(allowed)}")
        check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1, "top_k",
              f"{self.top_k!r} must be a positive int")
        check_number(self.ema_decay, "ema_decay", 0.0, 1.0)
        check_chunk(self.chunk_size)




def ema_update(ema, lora, decay: float):
    """decay * ema + (1 - decay) * lora, leaf by leaf (each result keeps the dtype of `ema`)."""
    return jax.tree.map(lambda e, x: (decay * e.astype(jnp.float32)
                                      + (1.0 - decay) * jax.lax.stop_gradient(x).astype(jnp.float32)).astype(e.dtype),
                        ema, lora)


def opsd_head_loss(s_hidden, t_hidden, rollout_tokens, rollout_mask, kernel, cfg: OPSDConfig = OPSDConfig(),
                   t_kernel=None):
    """The OPSD loss from hidden states gathered at the rollout positions ([B, N, E] each).

    Returns (loss, metrics): div_mean (unclipped divergence, mean over tokens), div_max (per-token
    max), clip_frac (fraction of tokens the clip changed), student_entropy / teacher_entropy (mean
    over tokens, of the full tempered distributions), n_tokens."""
    if kernel.shape[-1] < cfg.top_k and cfg.variant == "top_k":
        raise ValueError(f"OPSDConfig.top_k={cfg.top_k} exceeds the vocabulary size {kernel.shape[-1]}")
    mask = jnp.asarray(rollout_mask, jnp.float32)
    terms = divergence.opsd_head(s_hidden, t_hidden, rollout_tokens, kernel, beta=cfg.beta, temperature=cfg.temperature,
                        clip_tau=cfg.clip_tau, clip_mode=cfg.clip_mode, variant=cfg.variant, top_k=cfg.top_k,
                        chunk_size=cfg.chunk_size, t_kernel=t_kernel)
    if cfg.reduction == "sequence":
        loss = divergence.sequence_mean(terms["loss"], mask)
    else:
        loss = divergence.token_mean(terms["loss"], mask)
    metrics = {
        "loss": loss,
        "div_mean": divergence.token_mean(terms["div"], mask),
        "div_max": divergence.masked_max(terms["div"], mask),
        "clip_frac": divergence.token_mean(terms["clipped"], mask),
        "student_entropy": divergence.token_mean(terms["s_ent"], mask),
        "teacher_entropy": divergence.token_mean(terms["t_ent"], mask),
        "n_tokens": jnp.sum(mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _teacher_lora(lora, teacher_lora, cfg: OPSDConfig):
    if cfg.teacher == "fixed":
        return None
    if cfg.teacher == "live":
        return None if lora is None else jax.lax.stop_gradient(lora)
    if teacher_lora is None:
        raise ValueError("OPSDConfig.teacher='ema' needs the EMA LoRA tree: pass teacher_lora=...")
    return jax.lax.stop_gradient(teacher_lora)


def teacher_hidden(lora, params, batch: OPSDBatch, *, model: Model, cfg: OPSDConfig = OPSDConfig(),
                   teacher_lora=None):
    """The teacher's final hidden states at the rollout positions [B, N, E] (stop-gradient; never
    LoRA dropout)."""
    tl = _teacher_lora(lora, teacher_lora, cfg)
    h = model.hidden(params, tl, batch.t_tokens, batch.t_positions, batch.t_segment_ids)
    return jax.lax.stop_gradient(divergence.gather_positions(h, batch.t_index))


def teacher_logprobs(lora, params, batch: OPSDBatch, *, model: Model, cfg: OPSDConfig = OPSDConfig(),
                     teacher_lora=None):
    """log p_T(rollout_tokens[b, j]) [B, N] at the OPSD temperature (diagnostics and tests)."""
    ht = teacher_hidden(lora, params, batch, model=model, cfg=cfg, teacher_lora=teacher_lora)
    return divergence.token_logprobs(ht, batch.rollout_tokens, model.head_kernel(params),
                                     temperature=cfg.temperature, chunk_size=cfg.chunk_size)


def opsd_loss(lora, params, batch: OPSDBatch, rng=None, *, model: Model, cfg: OPSDConfig = OPSDConfig(),
              teacher_lora=None):
    """(loss f32, metrics) of one OPSD micro-batch; differentiable w.r.t. `lora` (the student).

    The teacher forward is stop-gradient and uses base weights ("fixed"), the current LoRA
    ("live") or `teacher_lora` ("ema"). `rng` is used only for LoRA dropout (model.lora_dropout > 0,
    student forward only; the teacher never drops)."""
    hs = model.hidden(params, lora, batch.s_tokens, batch.s_positions, batch.s_segment_ids, rng=rng)
    hs = divergence.gather_positions(hs, batch.s_index)
    ht = teacher_hidden(lora, params, batch, model=model, cfg=cfg, teacher_lora=teacher_lora)
    return opsd_head_loss(hs, ht, batch.rollout_tokens, batch.rollout_mask, model.head_kernel(params), cfg)
