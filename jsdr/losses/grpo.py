"""GRPO: group-normalised advantages and the clipped policy-gradient objective.

Batch (all [B, T] unless said; `build_grpo_batch` makes the token arrays):
    tokens, positions, segment_ids  int32  left-padded prompt + completion (segment id 0 = padding)
    targets                         int32  targets[b, t] = the token after tokens[b, t]
    mask                            f32    1 where targets[b, t] is a completion token (0 after
                                           the stop token and on prompt/padding positions)
    old_logprobs                    f32    log-probs of targets under the sampling policy at the
                                           mask positions (`policy_logprobs` at rollout time), or None
    advantages                      f32 [B] one advantage per completion (`group_advantages`)
    token_norm                      f32 [B] aggregation "dapo": the step's completion tokens / grad_accum
                                           (the same on every row), or None (the micro-batch's own count)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jsdr.config import check, field
from jsdr.data.batches import GRPOBatch
from jsdr.losses import divergence
from jsdr.losses.common import check_chunk, check_number
from jsdr.model.transformer import Model

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
REWARD_SCALES = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO options. The group size and the temperature are the rollout's (`rollout.n`,
    `rollout.temperature`): the loss receives them from the method, so they are configured once."""

    epsilon_low: float = field(0.2, "ratio clip below: 1 - epsilon_low")
    epsilon_high: float = field(0.2, "ratio clip above: 1 + epsilon_high (DAPO uses a larger value)")
    beta: float = field(0.0, "weight of the k3 KL to the base model (LoRA off); 0 = no reference forward")
    scale_rewards: Literal["group", "batch", "none"] = field(
        "group", "the group-centred rewards are divided by (std + adv_eps) of: group = their group | batch = all "
                 "rewards of the step's batch (TRL's scale_rewards) | none = not divided (Dr. GRPO)")
    adv_eps: float = field(1e-4, "added to the std that scale_rewards divides by")
    importance_sampling_level: Literal["token", "sequence"] = field(
        "token", "token: one ratio per token | sequence (GSPO): one ratio per completion, exp of the mean of its "
                 "token log-ratios, clipped like the token ratio (clip_* and ratio_mean then count completions)")
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = field(
        "grpo", "grpo: mean per completion, then over completions | dapo: sum over every completion token of the "
                "step (all micro-batches) / their number (as TRL; before, a mean per micro-batch) | "
                "dr_grpo: sum / (B x max_completion_length)")
    max_completion_length: int | None = field(None, "dr_grpo normaliser (None = the batch's row length)")
    num_iterations: int = field(
        1, "optimizer steps per rollout batch (GRPO's mu): each batch is trained on this many times, the ratio "
           "taken to the log-probs of the policy that sampled it, computed by a training forward at rollout "
           "time (1: none needed, the ratio is 1)")
    mask_truncated_completions: bool = field(
        False, "completions cut at rollout.max_new_tokens (not stopped) get no loss (DAPO); counted in "
               "rollout/truncated either way")
    overlong_buffer: int = field(
        0, "DAPO's soft overlong punishment: a completion of L > M - buffer tokens (M = rollout.max_new_tokens) "
           "gets reward -= min((L - (M - buffer)) / buffer, 1) x overlong_penalty (logged as "
           "reward/overlong_penalty); 0 = off")
    overlong_penalty: float = field(1.0, "the overlong punishment at L = rollout.max_new_tokens")
    dynamic_sampling: bool = field(
        False, "DAPO's dynamic sampling: groups whose rewards are all equal are dropped and replaced by the groups "
               "of further prompts with unequal rewards, sampled in up to max_refills rounds; a batch still short "
               "is completed with dropped groups (advantages 0). Logs rollout/groups_dropped (equal-reward groups "
               "sampled), rollout/refills (rounds) and rollout/groups_padded (dropped groups put back); reward/*, "
               "rollout/length and rollout/truncated then describe the batch trained on")
    max_refills: int = field(3, "dynamic sampling: rounds of further prompts per batch")
    chunk_size: int | None = field(divergence.DEFAULT_CHUNK, "positions per lm-head chunk (None = one chunk)")

    def __post_init__(self):
        check_number(self.epsilon_low, "epsilon_low", 0.0, 1.0, hi_open=True)
        check_number(self.epsilon_high, "epsilon_high", 0.0, None)
        check_number(self.beta, "beta", 0.0, None)
        check(self.scale_rewards in REWARD_SCALES, "scale_rewards",
              f"{self.scale_rewards!r} is not supported; choose one of {list(REWARD_SCALES)}")
        check_number(self.adv_eps, "adv_eps", 0.0, None)
        check(self.importance_sampling_level in IMPORTANCE_LEVELS, "importance_sampling_level",
              f"{self.importance_sampling_level!r} is not supported; choose one of {list(IMPORTANCE_LEVELS)}")
        check(self.aggregation in AGGREGATIONS, "aggregation",
              f"{self.aggregation!r} is not supported; choose one of {list(AGGREGATIONS)}")
        m = self.max_completion_length
        check(m is None or (_is_int(m) and m >= 1), "max_completion_length", f"{m!r} must be a positive int or None")
        check(_is_int(self.num_iterations) and self.num_iterations >= 1, "num_iterations",
              f"{self.num_iterations!r} must be a positive int")
        for name in ("mask_truncated_completions", "dynamic_sampling"):
            check(isinstance(getattr(self, name), bool), name, f"{getattr(self, name)!r} must be true or false")
        check(_is_int(self.overlong_buffer) and self.overlong_buffer >= 0, "overlong_buffer",
              f"{self.overlong_buffer!r} must be an int >= 0 (0 = off)")
        check_number(self.overlong_penalty, "overlong_penalty", 0.0, None)
        check(_is_int(self.max_refills) and self.max_refills >= 0, "max_refills",
              f"{self.max_refills!r} must be an int >= 0")
        check_chunk(self.chunk_size)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def group_advantages(rewards, num_generations: int, scale: str = "group", eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std + eps), groups of `num_generations` consecutive
    rewards ([N * G] -> [N * G] f32). The std (unbiased, n - 1, as in TRL) is that of the group
    (scale "group"), of all the rewards given (scale "batch": TRL's scale_rewards="batch"), or
    nothing is divided (scale "none"). A group whose rewards are all equal gets zero advantages."""
    r = jnp.asarray(rewards, jnp.float32)
    G = int(num_generations)
    if r.ndim != 1 or r.shape[0] % G:
        raise ValueError(f"group_advantages: rewards of shape {r.shape} are not [N * num_generations] with "
                         f"num_generations={G}")
    if scale not in REWARD_SCALES:
        raise ValueError(f"group_advantages: scale={scale!r}; choose one of {list(REWARD_SCALES)}")
    g = r.reshape(-1, G)
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (jnp.std(g, axis=1, keepdims=True, ddof=1 if G > 1 else 0) + eps)
    elif scale == "batch":
        centred = centred / (jnp.std(r, ddof=1 if r.shape[0] > 1 else 0) + eps)
    return centred.reshape(-1)


def overlong_penalty(lengths, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment, added to the rewards ([R] lengths -> [R] f32, <= 0): 0 up to
    max_new_tokens - buffer tokens, then falling linearly to -penalty at max_new_tokens (and below
    it no further). buffer 0: all zeros."""
    lengths = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.zeros(lengths.shape, np.float32)
    over = (lengths - (max_new_tokens - buffer)) / buffer
    return (-np.clip(over, 0.0, 1.0) * penalty).astype(np.float32)


def policy_objective(logp, old_logprobs, advantages, mask, cfg: GRPOConfig = GRPOConfig(), ref_logp=None,
                     entropy=None, token_norm=None):
    """The GRPO loss from per-token log-probs [B, T] (differentiable) and the batch's old log-probs,
    advantages [B] and mask. ref_logp: reference log-probs (needed when cfg.beta > 0). token_norm
    ([B], aggregation "dapo"): the divisor of the token sum, the step's completion tokens / grad_accum,
    so that the trainer's mean over micro-batches is the sum over the step / its token count (None:
    this micro-batch's token count).

    Per token: rho = exp(logp - old), term = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    (+ beta (exp(r) - r - 1), r = ref_logp - logp), aggregated per cfg.aggregation. With
    importance_sampling_level "sequence" (GSPO), rho is one ratio per completion: exp of the mean of
    its tokens' logp - old, shared by its tokens.
    Metrics: loss, clip_low / clip_high (fraction of tokens, or of non-empty completions with a
    sequence ratio, where the clip is active on that side), ratio_mean (over the same), kl (mean k3,
    when beta > 0), entropy (when given), n_tokens."""
    mask = jnp.asarray(mask, jnp.float32)
    old = jnp.where(mask > 0, jnp.asarray(old_logprobs, jnp.float32), 0.0)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    logp_m = jnp.where(mask > 0, logp, 0.0)
    log_ratio = logp_m - old
    per_completion = cfg.importance_sampling_level == "sequence"
    if per_completion:
        n = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
        log_ratio = divergence.masked_sum(log_ratio, mask, axis=1)[:, None] / n
    ratio = jnp.exp(log_ratio)  # [B, T], or [B, 1] per completion

    def ratio_metric(x):  # over the tokens, or over the non-empty completions when a ratio is per completion
        x = jnp.broadcast_to(x, mask.shape)
        return divergence.sequence_mean(x, mask) if per_completion else divergence.token_mean(x, mask)

    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    term = jnp.broadcast_to(-jnp.minimum(ratio * adv, clipped * adv), mask.shape)
    metrics = {}
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("GRPOConfig.beta > 0 needs the reference log-probs (ref_logp)")
        r = jnp.where(mask > 0, ref_logp, 0.0) - logp_m
        kl = jnp.exp(r) - r - 1.0
        term = term + cfg.beta * kl
        metrics["kl"] = divergence.token_mean(kl, mask)
    if cfg.aggregation == "grpo":
        loss = divergence.sequence_mean(term, mask, nonempty_only=False)
    elif cfg.aggregation == "dapo":
        if token_norm is None:
            loss = divergence.token_mean(term, mask)
        else:
            loss = divergence.masked_sum(term, mask) / jnp.asarray(token_norm, jnp.float32)[0]
    else:
        L = cfg.max_completion_length or mask.shape[1]
        loss = divergence.masked_sum(term, mask) / (mask.shape[0] * L)
    low = (ratio < 1.0 - cfg.epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + cfg.epsilon_high) & (adv > 0)
    metrics.update(loss=loss, clip_low=ratio_metric(low.astype(jnp.float32)),
                   clip_high=ratio_metric(high.astype(jnp.float32)), ratio_mean=ratio_metric(ratio),
                   n_tokens=jnp.sum(mask))
    if entropy is not None:
        metrics["entropy"] = divergence.token_mean(entropy, mask)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def policy_logprobs(lora, params, batch: GRPOBatch, *, model: Model, temperature: float,
                    chunk_size: int | None = divergence.DEFAULT_CHUNK, with_entropy: bool = False, rng=None):
    """log p(targets) [B, T] under (params, lora) at `temperature`, chunked (the policy's, or the
    reference's with lora=None). Values off the mask are meaningless."""
    h = model.hidden(params, lora, batch.tokens, batch.positions, batch.segment_ids, rng=rng)
    return divergence.token_logprobs(h, batch.targets, model.head_kernel(params), temperature=temperature,
                                     chunk_size=chunk_size, with_entropy=with_entropy)


def grpo_loss(lora, params, batch: GRPOBatch, rng=None, *, model: Model, cfg: GRPOConfig = GRPOConfig(),
              temperature: float = 1.0):
    """(loss f32, metrics) of one GRPO micro-batch; differentiable w.r.t. `lora`.

    `temperature` is the rollout's. `batch.old_logprobs` None means one update per rollout batch:
    the sampling policy is the current one, so the old log-probs are the current log-probs under
    stop-gradient (ratio 1, no extra forward); with num_iterations > 1 the method fills them with
    `policy_logprobs` of the sampling adapter. With cfg.beta > 0 the reference policy is the base
    model (lora=None), under stop_gradient. `rng` is used only for LoRA dropout (policy forward only)."""
    logp, ent = policy_logprobs(lora, params, batch, model=model, temperature=temperature,
                                chunk_size=cfg.chunk_size, with_entropy=True, rng=rng)
    old = jax.lax.stop_gradient(logp) if batch.old_logprobs is None else batch.old_logprobs
    ref = None
    if cfg.beta > 0:
        ref = jax.lax.stop_gradient(policy_logprobs(None, params, batch, model=model, temperature=temperature,
                                                    chunk_size=cfg.chunk_size))
    return policy_objective(logp, old, batch.advantages, batch.mask, cfg, ref, ent, batch.token_norm)
