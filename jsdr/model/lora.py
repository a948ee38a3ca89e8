"""LoRA as a separate parameter tree, applied as a delta, interchangeable with PEFT adapters.

The adapter mirrors the targeted projections of the base tree (layers stacked on axis 0)::

    {"layers": {"self_attn": {"q_proj": {"lora_a": [L, in, r], "lora_b": [L, r, out]}, ...},
                "mlp":       {"gate_proj": {...}, "up_proj": {...}, "down_proj": {...}}}}

and the forward (`transformer.forward(params, ..., lora, lora_cfg.scale)`) computes
x W + scale * (x A) B for every targeted projection; the base tree is never modified. A is
PEFT's [r, in] `lora_A.weight` transposed, B is `lora_B.weight` [out, r] transposed.

`save_peft` / `load_peft` read and write PEFT's on-disk format (adapter_config.json +
adapter_model.safetensors) so an adapter trained here loads with `peft.PeftModel.from_pretrained`
(and in vLLM), and an adapter trained with `peft` loads here. `merge` folds the delta into a
new base tree for fast sampling or for export with `hf.save_params`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsdr.model.hf import (SUPPORTED_ARCHITECTURES, CheckpointError, SafetensorsFile, _one_line, _to_host,
                           write_safetensors)
from jsdr.model.transformer import ModelConfig, Params
from jsdr.sharding import tree_shardings

# module name -> (block, logical axis of the input, logical axis of the output)
TARGETS: dict[str, tuple[str, str, str]] = {
    "q_proj": ("self_attn", "embed", "q_heads"),
    "k_proj": ("self_attn", "embed", "kv_heads"),
    "v_proj": ("self_attn", "embed", "kv_heads"),
    "o_proj": ("self_attn", "q_heads", "embed"),
    "gate_proj": ("mlp", "embed", "mlp"),
    "up_proj": ("mlp", "embed", "mlp"),
    "down_proj": ("mlp", "mlp", "embed"),
}
ALL_TARGETS = tuple(TARGETS)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(CheckpointError):
    """A PEFT adapter that does not fit the model or uses a feature jsdr does not implement."""

    kind = "adapter"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, dropout on the LoRA input, PEFT/HF module names to adapt, rsLoRA scaling.

    target_modules: any subset of ALL_TARGETS (or the string "all-linear" for all seven).
    The delta is scale * (x A) B with scale = alpha / r, or alpha / sqrt(r) with use_rslora.
    """

    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ValueError(f"lora rank={self.rank!r} must be a positive integer")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"lora alpha={self.alpha!r} must be a finite number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout={self.dropout!r} must be in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                targets = (targets,)
            else:
                targets = ALL_TARGETS
        targets = tuple(targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"lora target_modules {unknown} unknown; supported: {list(ALL_TARGETS)} "
                             f"(or 'all-linear')")
        if not targets:
            raise ValueError("lora target_modules is empty; name at least one of " + ", ".join(ALL_TARGETS))
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", tuple(t for t in ALL_TARGETS if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


# ---------------------------------------------------------------------------------------------
# shapes, axes, init


def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {"embed": cfg.hidden_size, "mlp": cfg.intermediate_size,
            "q_heads": cfg.num_heads * cfg.head_dim, "kv_heads": cfg.num_kv_heads * cfg.head_dim}


def _tree(lora_cfg: LoraConfig, leaf) -> Params:
    out: dict = {"layers": {}}
    for name in lora_cfg.target_modules:
        block, a_in, a_out = TARGETS[name]
        out["layers"].setdefault(block, {})[name] = leaf(name, a_in, a_out)
    return out


def lora_axes(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> Params:
    """Logical axis names of every LoRA leaf: the in/out axes of the base kernel, rank replicated."""
    return _tree(lora_cfg, lambda n, i, o: {"lora_a": ("layers", i, "lora_rank"),
                                            "lora_b": ("layers", "lora_rank", o)})


def lora_shapes(model_cfg: ModelConfig, lora_cfg: LoraConfig, dtype=jnp.float32) -> Params:
    """jax.ShapeDtypeStruct of every LoRA leaf."""
    d, L, r = _dims(model_cfg), model_cfg.num_layers, lora_cfg.rank
    return _tree(lora_cfg, lambda n, i, o: {"lora_a": jax.ShapeDtypeStruct((L, d[i], r), dtype),
                                            "lora_b": jax.ShapeDtypeStruct((L, r, d[o]), dtype)})


def lora_shardings(model_cfg: ModelConfig, lora_cfg: LoraConfig, mesh: Mesh, rules: dict | None = None) -> Params:
    """NamedShardings of the LoRA tree under the (same) logical rules as the base parameters."""
    return tree_shardings(lora_axes(model_cfg, lora_cfg), lora_shapes(model_cfg, lora_cfg), mesh, rules)


def init_lora(model_cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array, dtype=jnp.float32,
              mesh: Mesh | None = None, rules: dict | None = None) -> Params:
    """A fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0.

    The initial delta is exactly zero. With a mesh every leaf is created in its sharding.
    """
    shapes = lora_shapes(model_cfg, lora_cfg, dtype)

    def build(key):
        out: dict = {"layers": {}}
        for j, name in enumerate(lora_cfg.target_modules):
            block = TARGETS[name][0]
            s_a, s_b = shapes["layers"][block][name]["lora_a"], shapes["layers"][block][name]["lora_b"]
            bound = 1.0 / math.sqrt(s_a.shape[1])
            a = jax.random.uniform(jax.random.fold_in(key, j), s_a.shape, jnp.float32, -bound, bound)
            out["layers"].setdefault(block, {})[name] = {"lora_a": a.astype(dtype), "lora_b": jnp.zeros(s_b.shape, dtype)}
        return out

    if mesh is None:
        return jax.jit(build)(key)
    return jax.jit(build, out_shardings=lora_shardings(model_cfg, lora_cfg, mesh, rules))(key)


def count_params(lora: Params) -> int:
    """Number of trainable LoRA parameters (equals PEFT's get_nb_trainable_parameters()[0])."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(lora)))


def _modules(lora: Params):
    """Yield (module name, block, {"lora_a", "lora_b"}) in canonical order."""
    layers = lora.get("layers", {}) if isinstance(lora, dict) else {}
    for block in ("self_attn", "mlp"):
        for name, leaves in (layers.get(block) or {}).items():
            if name not in TARGETS or TARGETS[name][0] != block:
                raise ValueError(f"LoRA tree has layers/{block}/{name}, which is not a LoRA target; "
                                 f"supported: {list(ALL_TARGETS)}")
            yield name, block, leaves
    extra = set(layers) - {"self_attn", "mlp"}
    if extra or set(lora) - {"layers"}:
        raise ValueError(f"LoRA tree has unexpected entries {sorted(extra | (set(lora) - {'layers'}))}")


def check_lora(lora: Params, model_cfg: ModelConfig) -> int:
    """Validate a LoRA tree against the model; returns the rank."""
    d, L = _dims(model_cfg), model_cfg.num_layers
    ranks = set()
    for name, block, leaves in _modules(lora):
        _, a_in, a_out = TARGETS[name]
        a, b = leaves["lora_a"], leaves["lora_b"]
        r = a.shape[-1]
        want_a, want_b = (L, d[a_in], r), (L, r, d[a_out])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"LoRA layers/{block}/{name}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} "
                             f"do not fit the model (expected {want_a} / {want_b})")
        ranks.add(r)
    if len(ranks) > 1:
        raise ValueError(f"LoRA tree mixes ranks {sorted(ranks)}")
    if not ranks:
        raise ValueError("LoRA tree has no targeted modules")
    return ranks.pop()


# ---------------------------------------------------------------------------------------------
# merge


def merge(params: Params, lora: Params, scale: float) -> Params:
    """A new base tree with W + scale * A B folded into every targeted kernel (computed in float32).

    `params` is not modified; untouched leaves are shared with it. Use for fast sampling and
    export (`hf.save_params(merge(params, lora, cfg.scale), ...)`).
    """
    new_layers = dict(params["layers"])
    for name, block, leaves in _modules(lora):
        if new_layers[block] is params["layers"][block]:
            new_layers[block] = dict(params["layers"][block])
        w = params["layers"][block][name]["kernel"]
        delta = jnp.einsum("lir,lro->lio", leaves["lora_a"].astype(jnp.float32),
                           leaves["lora_b"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        if delta.shape != w.shape:
            raise ValueError(f"LoRA {block}/{name} delta {delta.shape} does not fit the kernel {w.shape}")
        new_layers[block][name] = dict(params["layers"][block][name],
                                       kernel=(w.astype(jnp.float32) + scale * delta).astype(w.dtype))
    out = dict(params)
    out["layers"] = new_layers
    return out


# ---------------------------------------------------------------------------------------------
# PEFT export


def _hf_module(block: str, name: str) -> str:
    return "base_model.model.model.layers.{i}." + block + "." + name


def peft_tensors(lora: Params, dtype=None):
    """Yield (PEFT key, host array) for every LoRA matrix of every layer (A as [r, in], B as [out, r])."""
    for name, block, leaves in _modules(lora):
        a, b = _to_host(leaves["lora_a"]), _to_host(leaves["lora_b"])
        if dtype is not None:
            a, b = a.astype(np.dtype(jnp.dtype(dtype))), b.astype(np.dtype(jnp.dtype(dtype)))
        for i in range(a.shape[0]):
            key = _hf_module(block, name).format(i=i)
            yield key + ".lora_A.weight", np.ascontiguousarray(a[i].T)
            yield key + ".lora_B.weight", np.ascontiguousarray(b[i].T)


def save_peft(out_dir: str | Path, lora: Params, lora_cfg: LoraConfig, model_cfg: ModelConfig,
              base_model_name_or_path: str = "", dtype=None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format (loads with
    `peft.PeftModel.from_pretrained(hf_model, out_dir)`). Only process 0 writes."""
    rank = check_lora(lora, model_cfg)
    if rank != lora_cfg.rank:
        raise ValueError(f"LoRA tree has rank {rank} but lora_cfg.rank={lora_cfg.rank}")
    present = tuple(n for n, _, _ in _modules(lora))
    if set(present) != set(lora_cfg.target_modules):
        raise ValueError(f"LoRA tree targets {sorted(present)} but lora_cfg.target_modules="
                         f"{sorted(lora_cfg.target_modules)}")
    tensors = dict(peft_tensors(lora, dtype))
    out = Path(out_dir)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "auto_mapping": {"base_model_class": SUPPORTED_ARCHITECTURES[model_cfg.model_type]},
        "r": lora_cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.use_rslora,
        "target_modules": list(lora_cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# PEFT import

# adapter_config fields whose non-default values change the math; (field, neutral test, what it is)
_UNSUPPORTED = (
    ("use_dora", lambda v: not v, "DoRA (weight-decomposed LoRA)"),
    ("bias", lambda v: v in (None, "none"), "trained biases"),
    ("lora_bias", lambda v: not v, "a bias on lora_B"),
    ("modules_to_save", lambda v: not v, "fully trained extra modules"),
    ("layers_to_transform", lambda v: v is None or v == [], "LoRA on a subset of layers"),
    ("rank_pattern", lambda v: not v, "per-module ranks"),
    ("alpha_pattern", lambda v: not v, "per-module alphas"),
    ("exclude_modules", lambda v: not v, "excluded modules"),
    ("layer_replication", lambda v: not v, "layer replication"),
    ("trainable_token_indices", lambda v: not v, "trainable token embeddings"),
    ("target_parameters", lambda v: not v, "LoRA on raw parameters"),
    ("fan_in_fan_out", lambda v: not v, "Conv1D-style transposed weights"),
    ("use_qalora", lambda v: not v, "QA-LoRA"),
    ("use_bdlora", lambda v: not v, "block-diagonal LoRA"),
    ("alora_invocation_tokens", lambda v: not v, "activated LoRA"),
    ("arrow_config", lambda v: not v, "Arrow routing"),
    ("init_lora_weights", lambda v: not (isinstance(v, str) and v.lower().startswith(("pissa", "olora", "corda",
                                                                                        "loftq"))),
     "an initialisation that rewrites the base weights (convert the adapter to plain LoRA first)"),
)

_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"lora_(A|B)(?:\.[A-Za-z0-9_\-]+)?\.weight$")


def _resolve_targets(targets: Any, source: str, num_layers: int) -> tuple[str, ...]:
    """PEFT's target_modules -> our names. PEFT semantics: a list matches a module whose full name
    equals an entry or ends with "." + entry (peft itself saves "all-linear" as the list of full
    module paths); a string is a regex that must match the full name; "all-linear" is every linear
    layer except the lm head. Every layer must get the same set of targets."""
    modules = {f"model.layers.{i}.{blk}.{n}": (i, n) for i in range(num_layers) for n, (blk, _, _) in TARGETS.items()}
    others = ["model.embed_tokens", "lm_head", "model.norm"] + [
        f"model.layers.{i}.{m}" for i in range(num_layers)
        for m in ("self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm")]
    if targets == "all-linear" or targets == ["all-linear"]:
        return ALL_TARGETS
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterError(f"{source}: target_modules {targets!r} is not a valid regex ({e})") from None
        hit = {v for m, v in modules.items() if re.fullmatch(targets, m)}
        bad = [m for m in others if re.fullmatch(targets, m)]
        if bad:
            raise AdapterError(f"{source}: target_modules regex {targets!r} also adapts {bad[:5]}, which jsdr does "
                               f"not support (only {list(ALL_TARGETS)})")
        if not hit:
            raise AdapterError(f"{source}: target_modules regex {targets!r} matches none of {list(ALL_TARGETS)}")
    else:
        if not isinstance(targets, (list, tuple, set)) or not targets or not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{source}: target_modules={targets!r} is not a list of module names")
        hit, unknown = set(), []
        for t in targets:
            found = {v for m, v in modules.items() if m == t or m.endswith("." + t)}
            if not found:
                unknown.append(t)
            hit |= found
        if unknown:
            raise AdapterError(f"{source}: target_modules {unknown[:10]} are not supported LoRA targets of this "
                               f"{num_layers}-layer model (supported: {list(ALL_TARGETS)}, in every layer)")
    names = tuple(n for n in ALL_TARGETS if any(hn == n for _, hn in hit))
    partial = {n: sorted(i for i, hn in hit if hn == n) for n in names}
    partial = {n: ls for n, ls in partial.items() if len(ls) != num_layers}
    if partial:
        raise AdapterError(f"{source}: target_modules adapt only some layers ({partial}); LoRA on a subset of "
                           f"layers is not supported")
    return names


def read_peft_config(adapter_dir: str | Path, model_cfg: ModelConfig,
                     base_model_name_or_path: str | None = None) -> LoraConfig:
    """LoraConfig from a PEFT adapter_config.json; unsupported PEFT features raise AdapterError."""
    d = Path(adapter_dir).expanduser()
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        why = ("not a PEFT adapter directory" if d.is_dir() else "a file, not an adapter directory" if d.exists()
               else "no such directory")
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG} ({why})")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{path}: invalid JSON ({_one_line(e)})") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read ({_one_line(e)})") from None
    if not isinstance(c, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(c).__name__}")
    if c.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type={c.get('peft_type')!r} is not supported (only LORA)")
    bad = [f"{k}={c[k]!r} ({what})" for k, ok, what in _UNSUPPORTED if k in c and not ok(c[k])]
    if bad:
        raise AdapterError(f"{path}: unsupported PEFT features: " + "; ".join(bad))
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in c:
            raise AdapterError(f"{path}: missing field {k!r}")
    for k in ("lora_alpha", "lora_dropout"):
        v = c.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise AdapterError(f"{path}: {k}={v!r} must be a number")
    want = SUPPORTED_ARCHITECTURES[model_cfg.model_type]
    mapping = c.get("auto_mapping") or {}
    base_cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if base_cls and base_cls != want:
        raise AdapterError(f"{path}: adapter was made for a {base_cls}, the model is a {want}")
    if base_model_name_or_path and c.get("base_model_name_or_path"):
        a = str(c["base_model_name_or_path"]).rstrip("/").split("/")[-1]
        b = str(base_model_name_or_path).rstrip("/").split("/")[-1]
        if a != b:
            raise AdapterError(f"{path}: adapter base model {c['base_model_name_or_path']!r} does not match "
                               f"{base_model_name_or_path!r}")
    try:
        return LoraConfig(rank=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout") or 0.0,
                          target_modules=_resolve_targets(c["target_modules"], str(path), model_cfg.num_layers),
                          use_rslora=bool(c.get("use_rslora", False)))
    except AdapterError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: {' '.join(str(e).split())}") from None


def load_peft(adapter_dir: str | Path, model_cfg: ModelConfig, dtype=jnp.float32, mesh: Mesh | None = None,
              rules: dict | None = None, base_model_name_or_path: str | None = None) -> tuple[Params, LoraConfig]:
    """Read a PEFT LoRA adapter (as written by peft's save_pretrained or by save_peft) -> (lora, lora_cfg).

    Keys are accepted with or without the adapter name (".default") and the "base_model.model."
    prefix. Ranks, targets, layer indices and shapes are checked against `model_cfg`; every
    mismatch raises an AdapterError naming the file and tensor.
    """
    d = Path(adapter_dir)
    lora_cfg = read_peft_config(d, model_cfg, base_model_name_or_path)
    wpath = d / ADAPTER_WEIGHTS
    if not wpath.exists():
        alt = " (found adapter_model.bin: re-save it with safe_serialization=True)" if (d / "adapter_model.bin").exists() \
            else ""
        raise AdapterError(f"{d}: no {ADAPTER_WEIGHTS}{alt}")
    try:
        f = SafetensorsFile(wpath)
    except CheckpointError as e:  # truncated or corrupt: the same message, as an adapter error
        raise AdapterError(str(e)) from None
    L, r, dims = model_cfg.num_layers, lora_cfg.rank, _dims(model_cfg)
    found: dict[tuple[str, str], dict[int, str]] = {}
    unknown = []
    for k in f.keys():
        m = _KEY.match(k)
        if not m or m.group(3) not in TARGETS or TARGETS[m.group(3)][0] != m.group(2):
            unknown.append(k)
            continue
        i, name, ab = int(m.group(1)), m.group(3), m.group(4)
        if i >= L:
            raise AdapterError(f"{wpath}: tensor {k} is for layer {i}, but the model has {L} layers")
        slot = found.setdefault((name, ab), {})
        if i in slot:
            raise AdapterError(f"{wpath}: layer {i} {name}.lora_{ab} appears twice ({slot[i]} and {k}); "
                               f"adapters with several adapter names are not supported")
        slot[i] = k
    if unknown:
        raise AdapterError(f"{wpath}: unsupported tensors ({len(unknown)}; e.g. DoRA magnitudes, biases, "
                           f"modules_to_save or non-LoRA-target modules): {sorted(unknown)[:10]}")
    in_file = sorted({n for n, _ in found}, key=ALL_TARGETS.index)
    if set(in_file) != set(lora_cfg.target_modules):
        raise AdapterError(f"{d}: {ADAPTER_CONFIG} targets {list(lora_cfg.target_modules)} but "
                           f"{ADAPTER_WEIGHTS} has LoRA tensors for {in_file}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    shardings = None if mesh is None else lora_shardings(model_cfg, lora_cfg, mesh, rules)
    lora: dict = {"layers": {}}
    for name in lora_cfg.target_modules:
        block, a_in, a_out = TARGETS[name]
        leaves = {}
        for ab, leaf, want in (("A", "lora_a", (r, dims[a_in])), ("B", "lora_b", (dims[a_out], r))):
            slot = found.get((name, ab), {})
            missing = [i for i in range(L) if i not in slot]
            if missing:
                raise AdapterError(f"{wpath}: no {name}.lora_{ab} for layers {missing} (LoRA on a subset of "
                                   f"layers is not supported)")
            per = []
            for i in range(L):
                try:
                    t = f.get(slot[i])
                except CheckpointError as e:
                    raise AdapterError(str(e)) from None
                if tuple(t.shape) != want:
                    what = "rank" if (ab == "A" and t.shape[1:] == want[1:]) or (ab == "B" and t.shape[:1] == want[:1]) \
                        else "shape"
                    raise AdapterError(f"{wpath}: tensor {slot[i]} has shape {tuple(t.shape)}, expected {want} "
                                       f"(wrong {what}: config r={r}, model hidden={model_cfg.hidden_size}, "
                                       f"intermediate={model_cfg.intermediate_size}, heads={model_cfg.num_heads}x"
                                       f"{model_cfg.head_dim}, kv heads={model_cfg.num_kv_heads})")
                per.append(np.asarray(t, np.float32).T)
            arr = np.stack(per).astype(np_dtype)
            leaves[leaf] = jnp.asarray(arr) if shardings is None else \
                jax.device_put(arr, shardings["layers"][block][name][leaf])
        lora["layers"].setdefault(block, {})[name] = leaves
    return lora, lora_cfg
