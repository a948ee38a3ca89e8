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
