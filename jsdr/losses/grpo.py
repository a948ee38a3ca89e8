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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr.losses import divergence as D
from jsdr.losses.common import check_choice, check_chunk, check_range, hidden
from jsdr.model.transformer import ModelConfig, lm_head_kernel

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO options.

    epsilon_low / epsilon_high: ratio clip range [1 - eps_low, 1 + eps_high].
    beta: weight of the k3 KL estimate to the reference policy (the base model: LoRA off);
        0 = no reference forward.
    std_normalization, adv_eps, num_generations: see `group_advantages`.
    aggregation: "grpo" (mean over each completion's tokens, then over completions), "dapo" (mean
        over all completion tokens of the batch), "dr_grpo" (sum / (B * max_completion_length)).
    max_completion_length: the dr_grpo normaliser; None = the batch's row length T.
    temperature: logits are divided by it before the log-softmax (must match the sampler's, as
        must the old log-probs).
    chunk_size: positions per lm-head chunk (None = one chunk).
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    std_normalization: bool = True
    adv_eps: float = 1e-4
    aggregation: str = "grpo"
    num_generations: int = 8
    temperature: float = 1.0
    max_completion_length: int | None = None
    chunk_size: int | None = D.DEFAULT_CHUNK

    def __post_init__(self):
        n = "GRPOConfig"
        check_range(n, "epsilon_low", self.epsilon_low, 0.0, 1.0, hi_open=True)
        check_range(n, "epsilon_high", self.epsilon_high, 0.0, None)
        check_range(n, "beta", self.beta, 0.0, None)
        if not isinstance(self.std_normalization, bool):
            raise ValueError(f"GRPOConfig.std_normalization={self.std_normalization!r} must be true or false")
        check_range(n, "adv_eps", self.adv_eps, 0.0, None)
        check_choice(n, "aggregation", self.aggregation, AGGREGATIONS)
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 1:
            raise ValueError(f"GRPOConfig.num_generations={self.num_generations!r} must be a positive int")
        check_range(n, "temperature", self.temperature, 0.0, None, lo_open=True)
        if self.max_completion_length is not None and (not isinstance(self.max_completion_length, int)
                                                       or self.max_completion_length < 1):
            raise ValueError(f"GRPOConfig.max_completion_length={self.max_completion_length!r} must be a "
                             f"positive int or None")
        check_chunk(n, self.chunk_size)


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
        metrics["kl"] = D.token_mean(kl, mask)
    if cfg.aggregation == "grpo":
        loss = D.sequence_mean(term, mask, nonempty_only=False)
    elif cfg.aggregation == "dapo":
        loss = D.token_mean(term, mask)
    else:
        L = cfg.max_completion_length or mask.shape[1]
        loss = D.masked_sum(term, mask) / (mask.shape[0] * L)
    low = (ratio < 1.0 - cfg.epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + cfg.epsilon_high) & (adv > 0)
    metrics.update(loss=loss, clip_low=D.token_mean(low.astype(jnp.float32), mask),
                   clip_high=D.token_mean(high.astype(jnp.float32), mask),
                   ratio_mean=D.token_mean(ratio, mask), n_tokens=jnp.sum(mask))
    if entropy is not None:
        metrics["entropy"] = D.token_mean(entropy, mask)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def policy_logprobs(lora, params, batch, *, model_cfg: ModelConfig, cfg: GRPOConfig = GRPOConfig(),
                    lora_scale: float = 1.0, remat: str = "none", attn_impl: str = "xla", dtype=None,
                    with_entropy: bool = False, lora_dropout: float = 0.0, rng=None):
    """log p(targets) [B, T] under (params, lora) at cfg.temperature, chunked (to recompute old
    log-probs, or the reference's with lora=None). Values off the mask are meaningless."""
    h = hidden(params, lora, batch["tokens"], batch["positions"], batch["segment_ids"], model_cfg, lora_scale,
               remat, attn_impl, dtype, lora_dropout, rng)
    return D.token_logprobs(h, batch["targets"], lm_head_kernel(params, model_cfg), temperature=cfg.temperature,
                            chunk_size=cfg.chunk_size, with_entropy=with_entropy)


def grpo_loss(lora, params, batch, rng=None, *, model_cfg: ModelConfig, cfg: GRPOConfig = GRPOConfig(),
              lora_scale: float = 1.0, remat: str = "none", attn_impl: str = "xla", dtype=None,
              lora_dropout: float = 0.0):
    """(loss f32, metrics) of one GRPO micro-batch; differentiable w.r.t. `lora`. With cfg.beta > 0
    the reference policy is the base model (lora=None), under stop_gradient. `rng` is used only for
    LoRA dropout (lora_dropout > 0, policy forward only)."""
    fwd = dict(model_cfg=model_cfg, cfg=cfg, lora_scale=lora_scale, remat=remat, attn_impl=attn_impl, dtype=dtype)
    logp, ent = policy_logprobs(lora, params, batch, with_entropy=True, lora_dropout=lora_dropout, rng=rng, **fwd)
    ref = None
    if cfg.beta > 0:
        ref = jax.lax.stop_gradient(policy_logprobs(None, params, batch, **fwd))
    return policy_objective(logp, batch["old_logprobs"], batch["advantages"], batch["mask"], cfg, ref, ent)


def build_grpo_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                     prompt_len: int | None = None, completion_len: int | None = None,
                     pad_id: int = 0) -> dict[str, np.ndarray]:
    """tokens / positions / segment_ids / targets / mask for prompt + completion rows: the prompt
    left-padded to `prompt_len`, the completion (already cut after its stop token) right-padded to
    `completion_len` (defaults: the longest). mask[b, t] = 1 where targets[b, t] is a completion
    token, so the first completion token is predicted at position prompt_len - 1. The caller adds
    old_logprobs [B, T] and advantages [B]."""
    if len(prompts) != len(completions):
        raise ValueError(f"build_grpo_batch: {len(prompts)} prompts but {len(completions)} completions")
    P = max(len(p) for p in prompts) if prompt_len is None else prompt_len
    C = max([len(c) for c in completions] + [1]) if completion_len is None else completion_len
    B, T = len(prompts), P + C
    out = {k: np.zeros((B, T), np.int32) for k in ("tokens", "positions", "segment_ids", "targets")}
    out["tokens"][:] = pad_id
    out["targets"][:] = pad_id
    out["mask"] = np.zeros((B, T), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        p, c = list(p), list(c)
        if not p:
            raise ValueError(f"row {b}: empty prompt")
        if len(p) > P:
            raise ValueError(f"row {b}: prompt of {len(p)} tokens exceeds prompt_len={P}")
        if len(c) > C:
            raise ValueError(f"row {b}: completion of {len(c)} tokens exceeds completion_len={C}")
        start = P - len(p)
        seq = p + c
        out["tokens"][b, start:P + len(c)] = seq
        out["segment_ids"][b, start:P + len(c)] = 1
        out["positions"][b, start:P + len(c)] = np.arange(len(seq))
        out["targets"][b, start:P + len(c) - 1] = seq[1:]
        out["mask"][b, P - 1:P - 1 + len(c)] = 1.0
    return out
