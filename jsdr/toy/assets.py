"""The toy model on disk: the warm start shipped in the package, the cache of other settings, and the
build that writes either (tokenizer + warm start + Hugging Face files).

`ensure_toy_assets()` returns a directory in Hugging Face format - config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a Qwen3-style chat template, generation_config.json,
toy_meta.json - holding a ~0.8M-parameter Qwen3-architecture model warm-started on the task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from jsdr.model.hf import save_params
from jsdr.toy.task import TOY_VERSION
from jsdr.toy.tokenizer import EOS_TOKEN, PAD_TOKEN, build_tokenizer
from jsdr.toy.warm_start import DEFAULT_SETTINGS, ToySettings, warm_start

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "toy_meta.json")

# The warm start of DEFAULT_SETTINGS ships inside the package (3.4 MB), built once by
# scripts/build_toy_model.py: every machine then starts from the same weights (a build's result
# depends on the CPU's floating-point details, and the copy ability forms abruptly during training).
SHIPPED_DIR = Path(__file__).resolve().parent / "toy_model"


def default_cache_root() -> Path:
    return Path(os.environ.get("JSDR_CACHE") or Path.home() / ".cache" / "jsdr").expanduser()


def assets_dir(cache_dir: str | Path | None = None, settings: ToySettings = DEFAULT_SETTINGS) -> Path:
    """Where the assets of `settings` live: <root>/toy-<version>-<hash of the settings>, so that a
    cache built by another version or with other settings is never reused."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    blob = json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()
    return root / f"toy-{TOY_VERSION}-{hashlib.sha256(blob).hexdigest()[:10]}"


def shipped_assets(settings: ToySettings = DEFAULT_SETTINGS) -> Path | None:
    """The packaged warm start when it exists, is complete and was built with `settings`."""
    meta = SHIPPED_DIR / "toy_meta.json"
    if not all((SHIPPED_DIR / f).exists() for f in _REQUIRED):
        return None
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    same = m.get("version") == TOY_VERSION and m.get("settings") == json.loads(json.dumps(dataclasses.asdict(settings)))
    return SHIPPED_DIR if same else None


def weights_sha256(directory: str | Path) -> str:
    return hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()


def ensure_toy_assets(cache_dir: str | Path | None = None, progress: bool = True,
                      settings: ToySettings | None = None, **overrides: Any) -> Path:
    """The directory of the warm-started toy model (HF format, tokenizer included): the one shipped in
    the package for the default settings, else built on first use and cached.

    cache_dir: the cache root (default $JSDR_CACHE or ~/.cache/jsdr); the assets go to
    <root>/toy-<version>-<settings hash>. `overrides` replace fields of ToySettings (tests use a
    few steps). Written to a temporary directory and renamed into place, so a half-built cache is
    never used.
    """
    settings = dataclasses.replace(settings or DEFAULT_SETTINGS, **overrides)
    if cache_dir is None and (shipped := shipped_assets(settings)) is not None:
        return shipped
    final = assets_dir(cache_dir, settings)
    if all((final / f).exists() for f in _REQUIRED):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build_assets(tmp, settings, progress)
        if final.exists():  # incomplete leftover (or a concurrent build that just finished)
            if all((final / f).exists() for f in _REQUIRED):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not all((final / f).exists() for f in _REQUIRED):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_assets(out_dir: str | Path, settings: ToySettings = DEFAULT_SETTINGS, progress: bool = True) -> Path:
    """Tokenizer + warm start + save into out_dir (no caching logic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = build_tokenizer(settings.vocab_size)
    params, cfg, hf, log = warm_start(settings, tokenizer, progress)
    save_params(params, cfg, hf, out)
    tokenizer.save_pretrained(str(out))
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [eos, tokenizer.convert_tokens_to_ids(PAD_TOKEN)],
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN), "do_sample": True, "temperature": 1.0}, indent=2))
    meta = {"version": TOY_VERSION, "settings": dataclasses.asdict(settings), "num_params": cfg.num_params(),
            "build_seconds": round(time.time() - t0, 1), "weights_sha256": weights_sha256(out), "train_log": log}
    (out / "toy_meta.json").write_text(json.dumps(meta, indent=2))
    return out
