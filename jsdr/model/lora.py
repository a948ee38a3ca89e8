"""LoRA as a separate parameter tree, applied as a delta, interchangeable with PEFT adapters.

The adapter mirrors the targeted projections of the base tree (layers stacked on axis 0)::

    {"layers": {"self_attn": {"q_proj": {"lora_a": [L, in, r], "lora_b": [L, r, out]}, ...},
                "mlp":       {"gate_proj": {...}, "up_proj": {...}, "down_proj": {...}}}}

and the forward (`transformer.forward(params, ..., lora, lora_cfg.scale)`) computes
x W + scale * (x A) B for every targeted projection; the base tree is never modified. A is
PEFT's [r, in] `lora_A.weight` transposed, B is `lora_B.weight` [out, r] transposed.

The targets, their in/out dims and logical axes and their HF/PEFT module names come from the kernel
declarations of params.py (`LORA_TARGETS`). In the Flax model the adapter is the variable
collection "lora" (`Decoder.apply({"params": params, "lora": lora}, ...)`).

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
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsdr import distributed as dist
from jsdr.config import check, field
from jsdr.model.hf import (SUPPORTED_ARCHITECTURES, CheckpointError, SafetensorsFile, _one_line,
                           write_safetensors)
from jsdr.model.params import LORA_TARGETS, PARAMS, ModelConfig, Param, axis_sizes
from jsdr.model.transformer import Params
from jsdr.sharding import tree_shardings

# module (= PEFT target) name -> the declaration of the kernel it adapts (params.py): its block, its
# in/out axes and dims, its HF module name
TARGETS: dict[str, Param] = LORA_TARGETS
ALL_TARGETS = tuple(TARGETS)
# the accepted target_modules entries (a Literal, so that --help lists them)
TargetModule = Literal[("all-linear",) + ALL_TARGETS]  # type: ignore[valid-type]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(CheckpointError):
    """A PEFT adapter that does not fit the model or uses a feature jsdr does not implement."""

    kind = "adapter"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, dropout on the LoRA input, PEFT/HF module names to adapt, rsLoRA scaling.

    The delta is scale * (x A) B with scale = alpha / r, or alpha / sqrt(r) with use_rslora.
    """

    rank: int = field(64, "LoRA rank r")
    alpha: float = field(128.0, "LoRA alpha; the delta is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)")
    dropout: float = field(0.0, "dropout on the input of every LoRA path (training only)")
    target_modules: tuple[TargetModule, ...] = field(ALL_TARGETS, "projections with an adapter (PEFT names), or "
                                                                  "all-linear for all seven")
    use_rslora: bool = field(False, "rank-stabilised scaling alpha / sqrt(r)")

    def __post_init__(self):
        check(not isinstance(self.rank, bool) and isinstance(self.rank, (int, np.integer)) and self.rank > 0,
              "rank", f"must be a positive integer (got {self.rank!r})")
        check(not isinstance(self.alpha, bool) and isinstance(self.alpha, (int, float))
              and math.isfinite(self.alpha), "alpha", f"must be a finite number (got {self.alpha!r})")
        check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout",
              f"must be in [0, 1) (got {self.dropout!r})")
        targets = self.target_modules
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        if "all-linear" in targets:
            check(targets == ("all-linear",), "target_modules",
                  f"all-linear stands for all seven projections; do not list others with it (got {list(targets)})")
            targets = ALL_TARGETS
        unknown = [t for t in targets if t not in TARGETS]
        check(not unknown, "target_modules", f"{unknown} unknown; supported: {list(ALL_TARGETS)} (or all-linear)")
        check(bool(targets), "target_modules", "is empty; name at least one of " + ", ".join(ALL_TARGETS))
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", tuple(t for t in ALL_TARGETS if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


# ---------------------------------------------------------------------------------------------
# shapes, axes, init: from the kernel declarations (an adapter of kernel [L, in, out] is A [L, in, r],
# B [L, r, out], with the kernel's in/out axes and the rank replicated)


def _tree(lora_cfg: LoraConfig, leaf) -> Params:
    out: dict = {"layers": {}}
    for name in lora_cfg.target_modules:
        decl = TARGETS[name]
        out["layers"].setdefault(decl.block, {})[name] = leaf(decl)
    return out


def _leaf_shapes(model_cfg: ModelConfig, decl: Param, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape of lora_a, shape of lora_b) of the adapter of `decl`."""
    sizes, (a_in, a_out) = axis_sizes(model_cfg), decl.lora_axes
    return (model_cfg.num_layers, sizes[a_in], rank), (model_cfg.num_layers, rank, sizes[a_out])


def lora_axes(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> Params:
    """Logical axis names of every LoRA leaf: the in/out axes of the base kernel, rank replicated."""
    return _tree(lora_cfg, lambda d: {"lora_a": ("layers", d.lora_axes[0], "lora_rank"),
                                      "lora_b": ("layers", "lora_rank", d.lora_axes[1])})


def lora_shapes(model_cfg: ModelConfig, lora_cfg: LoraConfig, dtype=jnp.float32) -> Params:
    """jax.ShapeDtypeStruct of every LoRA leaf."""
    def leaf(decl):
        a, b = _leaf_shapes(model_cfg, decl, lora_cfg.rank)
        return {"lora_a": jax.ShapeDtypeStruct(a, dtype), "lora_b": jax.ShapeDtypeStruct(b, dtype)}
    return _tree(lora_cfg, leaf)


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
            block = TARGETS[name].block
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
    blocks = tuple(dict.fromkeys(d.block for d in TARGETS.values()))
    for block in blocks:
        for name, leaves in (layers.get(block) or {}).items():
            if name not in TARGETS or TARGETS[name].block != block:
                raise ValueError(f"LoRA tree has layers/{block}/{name}, which is not a LoRA target; "
                                 f"supported: {list(ALL_TARGETS)}")
            yield name, block, leaves
    extra = set(layers) - set(blocks)
    if extra or set(lora) - {"layers"}:
        raise ValueError(f"LoRA tree has unexpected entries {sorted(extra | (set(lora) - {'layers'}))}")


def check_lora(lora: Params, model_cfg: ModelConfig) -> int:
    """Validate a LoRA tree against the model; returns the rank."""
    ranks = set()
    for name, block, leaves in _modules(lora):
        a, b = leaves["lora_a"], leaves["lora_b"]
        r = a.shape[-1]
        want_a, want_b = _leaf_shapes(model_cfg, TARGETS[name], r)
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


_PEFT_PREFIX = "base_model.model."  # PEFT's prefix of the base model's module names


def peft_tensors(lora: Params, dtype=None):
    """Yield (PEFT key, host array) for every LoRA matrix of every layer (A as [r, in], B as [out, r])."""
    for name, block, leaves in _modules(lora):
        a, b = np.asarray(dist.fetch(leaves["lora_a"])), np.asarray(dist.fetch(leaves["lora_b"]))
        if dtype is not None:
            a, b = a.astype(np.dtype(jnp.dtype(dtype))), b.astype(np.dtype(jnp.dtype(dtype)))
        for i in range(a.shape[0]):
            key = _PEFT_PREFIX + TARGETS[name].peft_module.format(i=i)
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

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[A-Za-z0-9_\-]+)?\.weight$")


def _module_pattern(decl: Param) -> re.Pattern:
    """The HF module name of a declaration as a regex; the layer index is its group."""
    return re.compile(re.escape(decl.peft_module).replace(re.escape("{i}"), r"(\d+)"))


_MODULE_PATTERNS = {name: _module_pattern(decl) for name, decl in TARGETS.items()}


def _parse_lora_key(key: str) -> tuple[int, str, str] | None:
    """(layer, target, "A" | "B") of a PEFT tensor name, with or without "base_model.model." and the
    adapter name; a module name that lacks the base model's leading "model." is accepted too."""
    m = _LORA_KEY.match(key)
    if not m:
        return None
    module = m.group("module")
    for candidate in (module, "model." + module):
        for name, pattern in _MODULE_PATTERNS.items():
            hit = pattern.fullmatch(candidate)
            if hit:
                return int(hit.group(1)), name, m.group("ab")
    return None


def _resolve_targets(targets: Any, source: str, num_layers: int) -> tuple[str, ...]:
    """PEFT's target_modules -> our names. PEFT semantics: a list matches a module whose full name
    equals an entry or ends with "." + entry (peft itself saves "all-linear" as the list of full
    module paths); a string is a regex that must match the full name; "all-linear" is every linear
    layer except the lm head. Every layer must get the same set of targets."""
    def each_layer(template):
        return [template.format(i=i) for i in range(num_layers)] if "{i}" in template else [template]
    modules = {m: (i, n) for n, d in TARGETS.items() for i, m in enumerate(each_layer(d.peft_module))}
    lora_modules = {d.peft_module for d in TARGETS.values()}
    others = [m for t in dict.fromkeys(p.peft_module for p in PARAMS if not p.lora) if t not in lora_modules
              for m in each_layer(t)]
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
    L, r = model_cfg.num_layers, lora_cfg.rank
    found: dict[tuple[str, str], dict[int, str]] = {}
    unknown = []
    for k in f.keys():
        parsed = _parse_lora_key(k)
        if parsed is None:
            unknown.append(k)
            continue
        i, name, ab = parsed
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
        block = TARGETS[name].block
        shape_a, shape_b = _leaf_shapes(model_cfg, TARGETS[name], r)
        leaves = {}
        # PEFT stores A as [r, in] and B as [out, r]: one layer of ours, transposed
        for ab, leaf, want in (("A", "lora_a", shape_a[:0:-1]), ("B", "lora_b", shape_b[:0:-1])):
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
