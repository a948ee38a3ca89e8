"""Shared test fixtures: tiny random Hugging Face models built on the fly (no hub needed).

JAX sees 8 virtual CPU devices in every test process so sharding tests can build any mesh;
unsharded code simply runs on device 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_tiny(tmp_path_factory):
    """(directory, transformers model) of a tiny untied Qwen3 with GQA 2:1, saved in one file."""
    d = tmp_path_factory.mktemp("qwen3_tiny")
    return d, build_tiny_model("qwen3", d)


@pytest.fixture(scope="session")
def qwen3_tiny_tied(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_tiny_tied")
    return d, build_tiny_model("qwen3", d, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def toy_tiny_assets(tmp_path_factory):
    """A directory with `model/` (a tiny random Qwen3 with the toy tokenizer, whose chat template has
    a thinking switch) and `train.jsonl` (32 toy problems with solutions and answers)."""
    import json

    from jsdr import toy
    d = tmp_path_factory.mktemp("toy_tiny")
    tok = toy.build_tokenizer(out_dir=d / "model")
    build_tiny_model("qwen3", d / "model", vocab_size=len(tok), tie_word_embeddings=True)
    tok.save_pretrained(d / "model")
    with open(d / "train.jsonl", "w") as f:
        for p in toy.make_problems(32, seed=0, split="train", difficulty=2):
            f.write(json.dumps(p) + "\n")
    return d
