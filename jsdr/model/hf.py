"""Hugging Face checkpoints <-> jsdr parameter trees.

Loading builds the parameter tree abstractly, then creates every leaf with
`jax.make_array_from_callback`: each device's shard is read straight from the memory-mapped
safetensors files (transposed and stacked over layers on the fly), so the host never holds a
second full copy of the model. Saving writes config.json + safetensors (sharded above
`max_shard_size`, with an index) that `transformers` loads as it is.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jsdr.errors import JsdrError

from jsdr.model.transformer import ModelConfig, Params, param_axes, param_shapes
from jsdr.sharding import logical_sharding

SUPPORTED_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(JsdrError, ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the tensor."""


# ---------------------------------------------------------------------------------------------
# config


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a HF config.json dict (transformers 4.x or 5.x spelling)."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_ARCHITECTURES:
        archs = hf.get("architectures") or [mt]
        raise CheckpointError(
            f"{source}: unsupported architecture {archs[0]!r} (model_type={mt!r}); supported: "
            + ", ".join(f"{v} ({k})" for k, v in SUPPORTED_ARCHITECTURES.items()))
    rope = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        rope.update(hf["rope_scaling"])
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{source}: rope scaling {kind!r} is not supported (default, linear, llama3)")
    rope_scaling = None if kind == "default" else tuple(sorted((k, v) for k, v in rope.items()
                                                                if not isinstance(v, (list, dict))))
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise CheckpointError(f"{source}: sliding-window attention is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf.get('hidden_act')!r} is not supported (silu)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    try:
        heads = hf["num_attention_heads"]
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
            o_bias=mt == "llama" and bool(hf.get("attention_bias", False)),
            qk_norm=mt == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            model_type=mt,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None


# ---------------------------------------------------------------------------------------------
# the name map: jsdr leaf path -> (HF name template, transform)
# A "{i}" in the template is the layer index; the leaf is the stack over layers.


def name_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """{jsdr path: (HF tensor name, transpose?)} for every parameter of `cfg`."""
    out: dict[tuple[str, ...], tuple[str, bool]] = {}
    for path, _ in _flat(param_axes(cfg)):
        if path[0] == "embed_tokens":
            out[path] = ("model.embed_tokens.weight", False)
        elif path[0] == "norm":
            out[path] = ("model.norm.weight", False)
        elif path[0] == "lm_head":
            out[path] = ("lm_head.weight", True)
        else:  # layers/<block>/<module>/<leaf> or layers/<norm>/scale
            mods, leaf = path[1:-1], path[-1]
            hf_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
            out[path] = ("model.layers.{i}." + ".".join(mods) + "." + hf_leaf, leaf == "kernel")
    return out


def _flat(tree, prefix=()) -> Iterable[tuple[tuple[str, ...], Any]]:
    is_leaf = lambda x: not isinstance(x, dict)
    for k, v in tree.items():
        if is_leaf(v):
            yield prefix + (k,), v
        else:
            yield from _flat(v, prefix + (k,))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# ---------------------------------------------------------------------------------------------
# safetensors, memory-mapped (no framework needed; bfloat16 through ml_dtypes)


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {})
        self.header = header
        self._offset = 8 + n
        self._mm: np.memmap | None = None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor `name` (nothing is read until it is used)."""
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        buf = self._mm[self._offset + start:self._offset + end]
        return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


class TensorIndex:
    """All tensors of a checkpoint directory: one model.safetensors or many with an index json."""

    def __init__(self, directory: str | Path, weights_name: str = "model.safetensors"):
        d = Path(directory)
        index = d / (weights_name + ".index.json")
        single = d / weights_name
        self.where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed safetensors index ({e})") from None
            files: dict[str, SafetensorsFile] = {}
            for name, fname in wmap.items():
                if fname not in files:
                    if not (d / fname).exists():
                        raise CheckpointError(f"{index}: lists {fname} for {name}, but {d / fname} does not exist")
                    files[fname] = SafetensorsFile(d / fname)
                self.where[name] = files[fname]
        elif single.exists():
            f = SafetensorsFile(single)
            self.where = {k: f for k in f.keys()}
        else:
            found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
            raise CheckpointError(f"{d}: no {weights_name} or {weights_name}.index.json "
                                  f"(found: {found[:10]})")

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].header[name]["shape"])


# ---------------------------------------------------------------------------------------------
# load


def resolve_model_dir(path_or_id: str, revision: str | None = None) -> Path:
    """A local directory as it is, or a hub id downloaded (config, tokenizer, safetensors) to the HF cache."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p}: no config.json in this directory")
        return p
    if p.exists() or str(path_or_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_id}: not a model directory")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path_or_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as e:  # no network, unknown id, gated repo
        raise CheckpointError(f"{path_or_id}: not a local directory and could not be fetched from the hub "
                              f"({type(e).__name__}: {e})") from None


def load_config(path_or_id: str) -> tuple[ModelConfig, dict]:
    d = resolve_model_dir(path_or_id)
    try:
        hf = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / 'config.json'}: invalid JSON ({e})") from None
    return config_from_hf(hf, str(d / "config.json")), hf


def load_params(path_or_id: str, mesh: Mesh | None = None, dtype=jnp.float32, rules: dict | None = None,
                progress: bool = False) -> tuple[Params, ModelConfig, dict]:
    """Load (params, cfg, hf_config) from a HF checkpoint, each leaf placed in its sharding.

    mesh None = a single device (the default device). Missing, unexpected or wrongly shaped
    tensors raise a CheckpointError that lists them.
    """
    d = resolve_model_dir(path_or_id)
    cfg, hf = load_config(str(d))
    index = TensorIndex(d)
    nmap = name_map(cfg)
    shapes = param_shapes(cfg, dtype)
    axes = param_axes(cfg)

    expected: dict[str, tuple[int, ...]] = {}
    for path, (tmpl, transpose) in nmap.items():
        leaf_shape = _get(shapes, path).shape
        per = leaf_shape[1:] if "{i}" in tmpl else leaf_shape
        hf_shape = tuple(reversed(per)) if transpose else tuple(per)
        names = [tmpl.format(i=i) for i in range(cfg.num_layers)] if "{i}" in tmpl else [tmpl]
        for n in names:
            expected[n] = hf_shape
    have = set(index.where)
    ignorable = {n for n in have if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected) - ignorable)
    if missing or unexpected:
        msg = [f"{d}: checkpoint does not match the {cfg.model_type} config"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        raise CheckpointError("; ".join(msg))
    bad = [f"{n}: file {index.shape(n)} vs config {s}" for n, s in expected.items() if index.shape(n) != s]
    if bad:
        raise CheckpointError(f"{d}: tensors with the wrong shape: " + "; ".join(bad[:20]))

    np_dtype = np.dtype(jnp.dtype(dtype))
    params: dict = {}
    items = list(nmap.items())
    it = items
    if progress:
        from tqdm import tqdm
        it = tqdm(items, desc=f"loading {d.name}", unit="tensor")
    for path, (tmpl, transpose) in it:
        shape = _get(shapes, path).shape
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = logical_sharding(_get(axes, path), shape, mesh, rules)
        stacked = "{i}" in tmpl

        def read(idx, tmpl=tmpl, transpose=transpose, stacked=stacked, shape=shape):
            idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
            if stacked:
                layers = range(*idx[0].indices(shape[0]))
                parts = [_read_one(index, tmpl.format(i=i), transpose, idx[1:]) for i in layers]
                return np.stack(parts).astype(np_dtype, copy=False)
            return _read_one(index, tmpl, transpose, idx).astype(np_dtype, copy=False)

        _set(params, path, jax.make_array_from_callback(shape, sharding, read))
    return params, cfg, hf


def _read_one(index: TensorIndex, name: str, transpose: bool, idx: tuple) -> np.ndarray:
    t = index.get(name)
    if transpose:
        t = t.T
    return np.array(t[idx])  # copies only this slice out of the memory map


# ---------------------------------------------------------------------------------------------
# save


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def hf_tensors(params: Params, cfg: ModelConfig, dtype=None) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (HF name, host array) for every tensor, one leaf at a time."""
    for path, (tmpl, transpose) in name_map(cfg).items():
        arr = _to_host(_get(params, path))
        if dtype is not None:
            arr = arr.astype(np.dtype(jnp.dtype(dtype)))
        if "{i}" in tmpl:
            for i in range(cfg.num_layers):
                yield tmpl.format(i=i), np.ascontiguousarray(arr[i].T if transpose else arr[i])
        else:
            yield tmpl, np.ascontiguousarray(arr.T if transpose else arr)


def save_params(params: Params, cfg: ModelConfig, hf_config: dict, out_dir: str | Path, dtype=None,
                max_shard_size: int = 5 * 1024 ** 3, extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_size bytes) loadable by transformers.

    Only process 0 writes (all processes must call it: gathering is collective).
    """
    out = Path(out_dir)
    write = jax.process_index() == 0
    if write:
        out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    for name, arr in hf_tensors(params, cfg, dtype):
        if size and size + arr.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if not write:
        return out
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fname, shard)
            weight_map.update({n: fname for n in shard})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = dict(hf_config)
    if dtype is not None:
        hf["torch_dtype"] = hf["dtype"] = str(np.dtype(jnp.dtype(dtype)))
    hf.setdefault("architectures", [SUPPORTED_ARCHITECTURES[cfg.model_type]])
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if extra_files is not None:
        extra_files(out)
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy tokenizer and generation-config files next to a saved model."""
    import shutil
    src, dst = Path(src), Path(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
