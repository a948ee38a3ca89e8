"""The setup that `jsdr.train` and `jsdr.eval` share: the device mesh, the model (hub id, local
directory or the embedded toy) with its tokenizer and optional PEFT adapter, batch placement on the
mesh, and decoding of sampled tokens.

    mesh_cfg = MeshConfig(fsdp=-1, rules={"mlp": ["tensor"]})
    mesh, rules = make_mesh(mesh_cfg), effective_rules(mesh_cfg)          # jsdr.sharding
    model = open_model("Qwen/Qwen3-1.7B", mesh=mesh, rules=rules, dtype="bfloat16")
    batch = place_batch(host_batch, mesh)          # [rows, ...] split over the data-parallel axes
    texts = decode(model.tokenizer, out.tokens, out.lengths)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jsdr import sharding, toy
from jsdr.config import field
from jsdr.errors import JsdrError
from jsdr.model import hf
from jsdr.model.lora import AdapterError, load_peft, merge
from jsdr.model.transformer import ModelConfig, Params


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Which model to train and how its forward runs."""

    path: str = field("toy", "HF hub id or local directory (config.json + safetensors); 'toy' = the "
                             "embedded toy reasoner, shipped with the package")
    tokenizer: str | None = field(None, "tokenizer hub id or directory (default: the model's)")
    dtype: Literal["bfloat16", "float32"] = field("bfloat16", "compute and base-weight dtype; losses are float32")
    attn_impl: Literal["auto", "xla", "pallas", "cudnn"] = field(
        "auto", "attention for the training forward/backward: auto = the Pallas flash kernel on GPU (memory "
                "linear in the length), xla on CPU; xla builds the full score matrix")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = field("full", "per-layer rematerialization policy")


def model_dir_of(path: str, progress: bool = True) -> str:
    """The local directory of a model: the toy's (shipped, or built once into the cache), a local
    directory, or a hub snapshot (downloaded once)."""
    if path == "toy":
        return str(toy.ensure_toy_assets(progress=progress))
    return hf.resolve_model_dir(path)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id (its EOS when it has none)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


@dataclasses.dataclass
class OpenedModel:
    """Base weights laid out on the mesh, with everything needed to run and save them."""

    params: Params
    config: ModelConfig
    hf_config: dict
    tokenizer: Any
    directory: str
    mesh: Mesh
    rules: dict | None = None

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)


def open_model(path: str, *, mesh: Mesh, rules: dict | None = None, dtype: str = "bfloat16",
               tokenizer: str | None = None, directory: str | None = None, tokenizer_obj=None,
               progress: bool = True) -> OpenedModel:
    """Load a model's config, tokenizer and weights (each weight read straight into its sharding under
    `rules`, default sharding.DEFAULT_RULES). `directory` / `tokenizer_obj`: already resolved ones."""
    directory = directory or model_dir_of(path, progress)
    tok = tokenizer_obj if tokenizer_obj is not None else hf.load_tokenizer(tokenizer or directory)
    with sharding.use_mesh(mesh, rules):
        params, cfg, hf_config = hf.load_params(directory, mesh=mesh, dtype=jnp.dtype(dtype), progress=progress)
    return OpenedModel(params, cfg, hf_config, tok, str(directory), mesh, rules)


def merge_adapter(model: OpenedModel, adapter_dir: str) -> Params:
    """The base weights with a PEFT adapter merged in (W + scale * A B), on the model's mesh."""
    with sharding.use_mesh(model.mesh, model.rules):
        try:
            lora, lora_cfg = load_peft(adapter_dir, model.config, dtype=jnp.float32, mesh=model.mesh)
        except JsdrError:
            raise
        except ValueError as e:  # the LoRA tree's own checks
            raise AdapterError(f"{adapter_dir}: {e}") from e
        return jax.jit(merge, static_argnums=2)(model.params, lora, lora_cfg.scale)


def place_batch(batch: Any, mesh: Mesh, leading: int = 0, rules: dict | None = None) -> Any:
    """Host arrays -> device arrays, each split along axis `leading` (1 for [grad_accum, micro, ...]
    step batches) as the rules lay out "act_batch" (default: over the data-parallel axes data and
    fsdp) and replicated along the rest. None leaves stay None.

    Every process holds the same host batch (the host logic is replicated, SPMD) and places only the
    rows of its own devices (`make_array_from_callback`): nothing crosses processes here."""
    spec = sharding.logical_to_spec(("act_batch",), None, mesh, rules or sharding.DEFAULT_RULES)
    placed = NamedSharding(mesh, PartitionSpec(*((None,) * leading), *spec))

    def put(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, placed)
        return jax.make_array_from_callback(x.shape, placed, lambda index: x[index], dtype=x.dtype)
    return jax.tree.map(put, batch)


def decode(tokenizer, tokens: np.ndarray, lengths: Sequence[int]) -> list[str]:
    """The text of each row's first `lengths[i]` tokens (special tokens dropped)."""
    return [tokenizer.decode(list(t[:n]), skip_special_tokens=True) for t, n in zip(tokens, lengths)]
