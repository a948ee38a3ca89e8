"""GRPO: group-normalised advantages and the clipped policy-gradient objective.

Batch (all [B, T] unless said; `build_grpo_batch` makes the token arrays):
    tokens, positions, segment_ids  int32  left-padded prompt + completion (segment id 0 = padding)
    targets                         int32  targets[b, t] = the token after tokens[b, t]
    mask                            f32    1 where targets[b, t] is a completion token (0 after
                                           the stop token and on prompt/padding positions)
    old_logprobs                    f32    log-probs of targets under the sampling policy at the
                                           mask positions (from the sampler, or `policy_logprobs`)
    advantages                      f32 [B] one advantage per completion (`group_advantages`)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jsdr.config import check, field
from jsdr.data.batches import GRPOBatch
from jsdr.losses import divergence
from jsdr.losses.common import check_chunk, check_number
from jsdr.model.transformer import Model

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO options. The group size and the temperature are the rollout's (`rollout.n`,
    `rollout.temperature`): the loss receives them from the method, so they are configured once."""

    epsilon_low: float = field(0.2, "ratio clip below: 1 - epsilon_low")
    epsilon_high: float = field(0.2, "ratio clip above: 1 + epsilon_high (DAPO uses a larger value)")
    beta: float = field(0.0, "weight of the k3 KL to the base model (LoRA off); 0 = no reference forward")
    std_normalization: bool = field(True, "divide group-centred rewards by the group std (+ adv_eps)")
    adv_eps: float = field(1e-4, "added to the group std")
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = field(
        "grpo", "grpo: mean per completion, then over completions | dapo: mean over all tokens | "
                "dr_grpo: sum / (B x max_completion_length)")
    max_completion_length: int | None = field(None, "dr_grpo normaliser (None = the batch's row length)")
    chunk_size: int | None = field(divergence.DEFAULT_CHUNK, "positions per lm-head chunk (None = one chunk)")

    def __post_init__(self):
        check_number(self.epsilon_low, "epsilon_low", 0.0, 1.0, hi_open=True)
        check_number(self.epsilon_high, "epsilon_high", 0.0, None)
        check_number(self.beta, "beta", 0.0, None)
        check(isinstance(self.std_normalization, bool), "std_normalization",
              f"{self.std_normalization!r} must be true or false")
        check_number(self.adv_eps, "adv_eps", 0.0, None)
        check(self.aggregation in AGGREGATIONS, "aggregation",
              f"{self.aggregation!r} is not supported; choose one of {list(AGGREGATIONS)}")
        m = self.max_completion_length
        check(m is None or (isinstance(m, int) and not isinstance(m, bool) and m >= 1), "max_completion_length",
              f"{m!r} must be a positive int or None")
        check_chunk(self.chunk_size)


def group_advantages(rewards, num_generations: int, std_normalization: bool = True, eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std of its group + eps), groups of `num_generations`
    consecutive rewards ([N * G] -> [N * G] f32). The std is the unbiased (n - 1) one, as in
    TRL; with std_normalization=False only the mean is subtracted. A group whose rewards are all
    equal gets zero advantages."""
    r = jnp.asarray(rewards, jnp.float32)
    G = int(num_generations)
    if r.ndim != 1 or r.shape[0] % G:
        raise ValueError(f"group_advantages: rewards of shape {r.shape} are not [N * num_generations] with "
                         f"num_generations={G}")
    g = r.reshape(-1, G)
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if std_normalization:
        std = jnp.std(g, axis=1, keepdims=True, ddof=1 if G > 1 else 0)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def policy_objective(logp, old_logprobs, advantages, mask, cfg: GRPOConfig = GRPOConfig(), ref_logp=None,
                     entropy=None):
    """The GRPO loss from per-token log-probs [B, T] (differentiable) and the batch's old log-probs,
    advantages [B] and mask. ref_logp: reference log-probs (needed when cfg.beta > 0).

    Per token: rho = exp(logp - old), term = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    (+ beta (exp(r) - r - 1), r = ref_logp - logp), aggregated per cfg.aggregation.
    Metrics: loss, clip_low / clip_high (fraction of tokens where the clip is active on that side),
    ratio_mean, kl (mean k3, when beta > 0), entropy (when given), n_tokens."""
    mask = jnp.asarray(mask, jnp.float32)
    old = jnp.where(mask > 0, jnp.asarray(old_logprobs, jnp.float32), 0.0)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    logp_m = jnp.where(mask > 0, logp, 0.0)
    ratio = jnp.exp(logp_m - old)
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    term = -jnp.minimum(ratio * adv, clipped * adv)
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
        loss = divergence.token_mean(term, mask)
    else:
        L = cfg.max_completion_length or mask.shape[1]
        loss = divergence.masked_sum(term, mask) / (mask.shape[0] * L)
    low = (ratio < 1.0 - cfg.epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + cfg.epsilon_high) & (adv > 0)
    metrics.update(loss=loss, clip_low=divergence.token_mean(low.astype(jnp.float32), mask),
                   clip_high=divergence.token_mean(high.astype(jnp.float32), mask),
                   ratio_mean=divergence.token_mean(ratio, mask), n_tokens=jnp.sum(mask))
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
    stop-gradient (ratio 1, no extra forward). With cfg.beta > 0 the reference policy is the base
    model (lora=None), under stop_gradient. `rng` is used only for LoRA dropout (policy forward only)."""
    logp, ent = policy_logprobs(lora, params, batch, model=model, temperature=temperature,
                                chunk_size=cfg.chunk_size, with_entropy=True, rng=rng)
    old = jax.lax.stop_gradient(logp) if batch.old_logprobs is None else batch.old_logprobs
    ref = None
    if cfg.beta > 0:
        ref = jax.lax.stop_gradient(policy_logprobs(None, params, batch, model=model, temperature=temperature,
                                                    chunk_size=cfg.chunk_size))
    return policy_objective(logp, old, batch.advantages, batch.mask, cfg, ref, ent)
