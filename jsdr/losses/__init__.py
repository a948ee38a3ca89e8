"""Pure loss functions for SFT, GRPO and OPSD (jnp only; batches are built in jsdr.data.batches).

Every method exposes one function with the shared signature

    loss_fn(lora, params, batch, rng, *, model: Model, cfg, ...) -> (loss f32 scalar, {name: f32 scalar})

(GRPO also takes the rollout `temperature`; OPSD takes `teacher_lora` for the EMA teacher). They are
differentiable w.r.t. `lora` and jit-able with `model` and `cfg` static; the lm-head and the per-token
losses run in chunks of positions under `jax.checkpoint` (see divergence.py), so [T, V] logits never exist.
"""

from jsdr.losses.divergence import DEFAULT_CHUNK, chunked_positions, gather_positions, jsd_terms
from jsdr.losses.grpo import GRPOConfig, group_advantages, grpo_loss, policy_logprobs, policy_objective
from jsdr.losses.opsd import OPSDConfig, ema_update, opsd_head_loss, opsd_loss, teacher_logprobs
from jsdr.losses.sft import SFTConfig, sft_head_loss, sft_loss

__all__ = [
    "DEFAULT_CHUNK", "GRPOConfig", "OPSDConfig", "SFTConfig", "chunked_positions", "ema_update", "gather_positions",
    "group_advantages", "grpo_loss", "jsd_terms", "opsd_head_loss", "opsd_loss", "policy_logprobs",
    "policy_objective", "sft_head_loss", "sft_loss", "teacher_logprobs",
]
