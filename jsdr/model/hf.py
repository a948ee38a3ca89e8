"""Hugging Face checkpoints <-> jsdr parameter trees.

Every tensor's HF name, per-layer shape and transpose rule come from its declaration in params.py.
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
from jax.sharding import Mesh

from jsdr import distributed as dist
from jsdr.errors import JsdrError

from jsdr.model.params import ModelConfig, declarations
from jsdr.model.transformer import Params, param_axes
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

    kind = "model"


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
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim"):
        v = hf.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise CheckpointError(f"{source}: {k}={v!r} must be a positive integer")
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
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: invalid model sizes ({_one_line(e)})") from None


# ---------------------------------------------------------------------------------------------
# the name map: every parameter's HF name and transpose rule come from its declaration (params.py)


def name_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """{jsdr path: (HF tensor name, transpose?)} for every parameter of `cfg`; an "{i}" in the name is
    the layer index of a parameter stacked over layers."""
    return {p.path: (p.hf_name, p.transpose) for p in declarations(cfg)}


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
    """The header of a safetensors file, checked against the file size when opened; tensors are
    memory-mapped on `get`. A bad header or a file cut short is a CheckpointError naming the file
    (and the tensor and the byte counts)."""

    MAX_HEADER = 100 * 1024 ** 2  # the safetensors format's own limit

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes, "
                                          f"shorter than the 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, self.MAX_HEADER):
                    raise CheckpointError(f"{self.path}: not a safetensors file or truncated (header length "
                                          f"{n} bytes, but the file has {size} bytes)")
                header = json.loads(f.read(n).decode("utf-8"))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({_one_line(e)})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {_one_line(e)})") \
                from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is a JSON "
                                  f"{type(header).__name__}, not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._offset = 8 + n
        self._mm: np.memmap | None = None
        data_bytes = size - self._offset
        for name, info in header.items():
            self._check(name, info)
        if header:
            need = max(info["data_offsets"][1] for info in header.values())
            if need > data_bytes:
                name, info = min(((k, v) for k, v in header.items() if v["data_offsets"][1] > data_bytes),
                                 key=lambda kv: kv[1]["data_offsets"][0])
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name} needs data bytes {info['data_offsets'][0]}-"
                    f"{info['data_offsets'][1]}, but the file holds only {data_bytes} data bytes after its "
                    f"{n}-byte header ({need} expected, {need - data_bytes} missing)")

    def _check(self, name: str, info: Any) -> None:
        def bad(what):
            return CheckpointError(f"{self.path}: tensor {name}: {what}")
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad(f"malformed header entry {str(info)[:200]!r} (needs dtype, shape, data_offsets)")
        shape, offs = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"malformed shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise bad(f"malformed data_offsets {offs!r}")
        start, end = offs
        if info["dtype"] in _ST_DTYPES:
            want = math.prod(shape) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            if end - start != want:
                raise bad(f"data_offsets {offs} hold {end - start} bytes, but {info['dtype']} {shape} needs {want}")

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
                wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed safetensors index ({_one_line(e)})") from None
            except OSError as e:
                raise CheckpointError(f"{index}: cannot read ({_one_line(e)})") from None
            if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                raise CheckpointError(f"{index}: malformed safetensors index (weight_map must map tensor "
                                      f"names to file names)")
            files: dict[str, SafetensorsFile] = {}
            for name, fname in wmap.items():
                if fname not in files:
                    if not (d / fname).exists():
                        raise CheckpointError(f"{index}: lists {fname} for {name}, but {d / fname} does not exist")
                    files[fname] = SafetensorsFile(d / fname)
                if name not in files[fname].header:
                    raise CheckpointError(f"{index}: lists {fname} for {name}, but {d / fname} has no such tensor")
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


# files a tokenizer can be built from (any one of these sets), and the ones fetched from the hub
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
_TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def _one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` of an exception from another library, squeezed onto one line."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _looks_like_path(path_or_id: str) -> bool:
    """A local path rather than a hub id (`owner/name`): absolute, starting with . or ~, more than
    one separator, or something that exists."""
    s = str(path_or_id)
    return (os.path.isabs(s) or s.startswith((".", "~")) or s.count(os.sep) > 1
            or (os.altsep is not None and s.count(os.altsep) > 1) or os.path.exists(os.path.expanduser(s)))


def _hub_error(path_or_id: str, what: str, e: BaseException) -> CheckpointError:
    """The one-line error for a hub id that could not be fetched: no network, unknown id, bad id."""
    from huggingface_hub import errors as hub_errors
    if isinstance(e, hub_errors.HFValidationError):
        why = "it is not a valid hub id (owner/name) either"
    elif isinstance(e, (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError)):
        why = "the hub has no such repository, or it is private/gated (log in with `hf auth login`)"
    elif isinstance(e, hub_errors.RevisionNotFoundError):
        why = "the hub repository has no such revision"
    elif isinstance(e, hub_errors.HfHubHTTPError) and not isinstance(e, hub_errors.LocalEntryNotFoundError):
        why = "the hub download failed"
    elif isinstance(e, OSError):  # LocalEntryNotFoundError, connection errors
        why = ("no network (or HF_HUB_OFFLINE=1) and it is not in the local hub cache; download it elsewhere "
               "and pass the local directory")
    else:
        why = "the hub download failed"
    return CheckpointError(f"{what} {path_or_id}: not a local directory and could not be fetched from the hub: "
                           f"{why} ({_one_line(e)})")


def _local_dir(path_or_id: str, what: str) -> Path | None:
    """The local directory `path_or_id` (None if it is a hub id); a path that is missing or not a
    directory is a CheckpointError."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{what} {path_or_id}: is a file, not a directory")
    if _looks_like_path(path_or_id):
        note = " (not a model directory)" if what == "model path" else ""
        raise CheckpointError(f"{what} {path_or_id}: no such directory{note}")
    return None


def _snapshot(path_or_id: str, what: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - no network, unknown id, gated repo, bad id: all one error
        raise _hub_error(path_or_id, what, e) from None


def resolve_model_dir(path_or_id: str, revision: str | None = None) -> str:
    """A local model directory (it must exist and hold config.json), or a hub id downloaded (config,
    tokenizer, safetensors) to the HF cache; the directory as a string.

    A path that is missing, a file, or a directory without config.json, and a hub id that cannot
    be fetched (no network, unknown id) raise a one-line CheckpointError.
    """
    d = _local_dir(path_or_id, "model path")
    if d is None:
        d = _snapshot(path_or_id, "model", revision, _HUB_PATTERNS)
    if not (d / "config.json").is_file():
        found = sorted(p.name for p in d.iterdir())
        raise CheckpointError(f"model path {d}: no config.json in this directory (found: {found[:10]})")
    return str(d)


def load_tokenizer(path_or_id: str, revision: str | None = None, **kwargs):
    """`transformers.AutoTokenizer.from_pretrained` with the errors of `resolve_model_dir`.

    A local directory must hold tokenizer files (tokenizer.json, tokenizer.model, vocab.json +
    merges.txt or vocab.txt; transformers would otherwise build an empty tokenizer); a hub id is
    fetched like a model. Every failure is a one-line CheckpointError naming the directory.
    """
    d = _local_dir(path_or_id, "tokenizer path")
    if d is None:
        d = _snapshot(path_or_id, "tokenizer", revision,
                      list(TOKENIZER_FILES) + ["config.json", "generation_config.json"])
    if not any(all((d / n).is_file() for n in names) for names in _TOKENIZER_SETS):
        looked = ", ".join(" + ".join(names) for names in _TOKENIZER_SETS)
        found = sorted(p.name for p in d.iterdir())
        raise CheckpointError(f"tokenizer path {d}: no tokenizer files (looked for {looked}; found: {found[:10]})")
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(d), **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise many types for bad files
        raise CheckpointError(f"tokenizer path {d}: cannot load the tokenizer ({_one_line(e)})") from None


def load_config(path_or_id: str) -> tuple[ModelConfig, dict]:
    path = Path(resolve_model_dir(path_or_id)) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({_one_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({_one_line(e)})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return config_from_hf(hf, str(path)), hf


def load_params(path_or_id: str, mesh: Mesh | None = None, dtype=jnp.float32, rules: dict | None = None,
                progress: bool = False) -> tuple[Params, ModelConfig, dict]:
    """Load (params, cfg, hf_config) from a HF checkpoint, each leaf placed in its sharding.

    mesh None = a single device (the default device). Missing, unexpected or wrongly shaped
    tensors raise a CheckpointError that lists them.
    """
    d = Path(resolve_model_dir(path_or_id))
    cfg, hf = load_config(str(d))
    index = TensorIndex(d)
    decls = declarations(cfg)
    axes = param_axes(cfg)  # as the Flax module declares them

    expected = {name: p.hf_shape(cfg) for p in decls for name in p.hf_names(cfg)}
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
    it = decls
    if progress:
        from tqdm import tqdm
        it = tqdm(decls, desc=f"loading {d.name}", unit="tensor")
    for decl in it:
        shape = decl.shape(cfg)
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = logical_sharding(_get(axes, decl.path), shape, mesh, rules)

        def read(idx, decl=decl, shape=shape):
            idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
            if decl.stacked:
                layers = range(*idx[0].indices(shape[0]))
                parts = [_read_one(index, decl.hf_name.format(i=i), decl.transpose, idx[1:]) for i in layers]
                return np.stack(parts).astype(np_dtype, copy=False)
            return _read_one(index, decl.hf_name, decl.transpose, idx).astype(np_dtype, copy=False)

        # read() runs only for this process's devices: a host reads the slices of its own shards
        _set(params, decl.path, jax.make_array_from_callback(shape, sharding, read, dtype=np_dtype))
    return params, cfg, hf


def _read_one(index: TensorIndex, name: str, transpose: bool, idx: tuple) -> np.ndarray:
    t = index.get(name)
    if transpose:
        t = t.T
    return np.array(t[idx])  # copies only this slice out of the memory map


# ---------------------------------------------------------------------------------------------
# save



def hf_tensors(params: Params, cfg: ModelConfig, dtype=None) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (HF name, host array) for every tensor, one leaf at a time."""
    for decl in declarations(cfg):
        arr = np.asarray(dist.fetch(_get(params, decl.path)))
        if dtype is not None:
            arr = arr.astype(np.dtype(jnp.dtype(dtype)))
        if decl.stacked:
            for i, name in enumerate(decl.hf_names(cfg)):
                yield name, np.ascontiguousarray(arr[i].T if decl.transpose else arr[i])
        else:
            yield decl.hf_name, np.ascontiguousarray(arr.T if decl.transpose else arr)


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

