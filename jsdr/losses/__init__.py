"""Pure loss functions for SFT, GRPO and OPSD.

Every method exposes one function with the shared signature

    loss_fn(lora, params, batch, rng, *, model_cfg, cfg, lora_scale=1.0, remat="none",
            attn_impl="xla", dtype=None) -> (loss f32 scalar, {name: f32 scalar})

(OPSD also takes `teacher_lora` for the EMA teacher). They are differentiable w.r.t. `lora` and
jit-able with any static configuration; the lm-head and the per-token losses run in chunks of
positions under `jax.checkpoint` (see divergence.py), so [T, V] logits never exist.
"""

from jsdr.losses.divergence import DEFAULT_CHUNK, chunked_positions, gather_positions, jsd_terms
from jsdr.losses.grpo import (GRPOConfig, build_grpo_batch, group_advantages, grpo_loss, policy_logprobs,
                              policy_objective)
from jsdr.losses.opsd import (OPSDConfig, build_opsd_batch, ema_update, opsd_head_loss, opsd_loss,
                              teacher_logprobs)
from jsdr.losses.sft import SFTConfig, pack_sft_examples, sft_head_loss, sft_loss

LOSSES = {"sft": sft_loss, "grpo": grpo_loss, "opsd": opsd_loss}
CONFIGS = {"sft": SFTConfig, "grpo": GRPOConfig, "opsd": OPSDConfig}

__all__ = [
    "DEFAULT_CHUNK", "CONFIGS", "LOSSES", "GRPOConfig", "OPSDConfig", "SFTConfig", "build_grpo_batch",
    "build_opsd_batch", "chunked_positions", "ema_update", "gather_positions", "group_advantages", "grpo_loss",
    "jsd_terms", "opsd_head_loss", "opsd_loss", "pack_sft_examples", "policy_logprobs", "policy_objective",
    "sft_head_loss", "sft_loss", "teacher_logprobs",
]
