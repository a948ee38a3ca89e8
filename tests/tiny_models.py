"""Tiny random models of every supported family, built with `transformers` and saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen3", "qwen2", "llama")

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_config(family: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    kw = dict(BASE)
    kw.update(overrides)
    if family == "qwen3":
        kw.setdefault("head_dim", 16)
        return Qwen3Config(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "llama":
        return LlamaConfig(**kw)
    raise ValueError(family)


def build_tiny_model(family: str, out_dir: str | Path | None = None, seed: int = 0,
                     max_shard_size: str | None = None, **overrides):
    """A transformers CausalLM with random weights (biases and norms randomised too, so that
    every parameter matters for the parity tests); saved to `out_dir` when given."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if out_dir is not None:
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out_dir, **kw)
    return model


# ---------------------------------------------------------------------------------------------
# logit-parity helpers shared by the model and LoRA tests


def left_padded_batch(seed: int, batch: int, length: int, pads, vocab: int = 256):
    """(tokens, segment ids) int32 [batch, length]; row i has pads[i] left-padding slots (segment 0)."""
    import numpy as np
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, vocab, (batch, length)).astype(np.int32)
    seg = (np.arange(length)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)
    return tokens, seg


def logit_tol(ref) -> float:
    """The parity tolerance: 1e-4 relative to the logit scale."""
    import numpy as np
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def torch_logits(model, tokens, seg):
    """float32 numpy logits of a transformers model with attention mask = segment ids != 0."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(seg, dtype=torch.long)).logits.float().numpy()


def jsdr_logits(params, cfg, tokens, seg, lora=None, scale=1.0, **kw):
    """numpy logits of jsdr's forward, positions derived from the segment ids."""
    import jax.numpy as jnp
    import numpy as np

    from jsdr.model import transformer as T
    pos = T.positions_from_segments(jnp.asarray(seg))
    return np.asarray(T.forward(params, jnp.asarray(tokens), pos, jnp.asarray(seg), cfg, lora, scale, **kw))
