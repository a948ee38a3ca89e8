"""Configuration as data: nested frozen dataclasses, loaded from YAML and `--key=value` overrides.

Every setting of jsdr is a field of a dataclass with a default and a help text
(`dataclasses.field(metadata={"help": ...})`). This module knows nothing about the settings
themselves; it only converts plain data to dataclasses and back:

    cfg = load(TrainConfig, yaml_path="configs/paper/opsd-qwen3-4b-v1.yaml",
               overrides=["--optim.learning_rate=5e-6", "--opsd.beta=0"])

- Keys are dotted paths (`optim.learning_rate`); a leaf name that is unique in the whole tree may be
  given alone (`--learning_rate=5e-6`).
- Values from the command line are strings and are converted by the field's type; YAML values are
  checked the same way. Tuples accept YAML lists or comma-separated strings, booleans accept
  true/false/1/0/yes/no, `None`/`null` clears an Optional field.
- Unknown keys and values of the wrong type or outside a `Literal` are errors that name the key, the
  value and what is allowed. Each dataclass validates its own ranges in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, get_args, get_origin

import yaml

from jsdr.errors import JsdrError


class ConfigError(JsdrError, ValueError):
    """A bad configuration value; the message names the key."""

    kind = "configuration"
    exit_code = 2


def _is_dc(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    """(inner type, optional?) for `X | None` / Optional[X]."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def convert(value: Any, tp, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp`, or raise ConfigError naming `key`."""
    inner, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got None)")
    tp = inner
    origin = get_origin(tp)
    try:
        if origin is Literal:
            allowed = get_args(tp)
            for a in allowed:  # compare after converting to the allowed value's type
                try:
                    if convert(value, type(a), key) == a:
                        return a
                except ConfigError:
                    pass
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")
        if _is_dc(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return from_dict(tp, value, prefix=key + ".")
        if origin in (tuple, list, Sequence) or tp in (tuple, list):
            args = get_args(tp)
            item_tp = args[0] if args else str
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return dict(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return out
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if tp is Any:
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys are errors listing the allowed ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + str(k) for k in unknown)}; "
                          f"{prefix.rstrip('.') or cls.__name__} accepts: {', '.join(names)}")
    defaults = {f.name: _field_default(f) for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        d = defaults.get(k)
        if isinstance(v, dict) and dataclasses.is_dataclass(d) and not isinstance(d, type):
            # a partial section keeps the enclosing default's other keys (not the section class's)
            v = merge_dicts(to_dict(d), v)
        kwargs[k] = convert(v, hints[k], prefix + k)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def to_dict(cfg) -> dict:
    """Plain data (tuples as lists) suitable for YAML/JSON."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def leaf_paths(cls, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) for every non-dataclass field of `cls`, depth first."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        if _is_dc(tp):
            out.extend(leaf_paths(tp, prefix + f.name + "."))
        else:
            out.append((prefix + f.name, f, hints[f.name]))
    return out


def resolve_key(cls, key: str) -> str:
    """A dotted key as given, or the full path of a unique leaf name."""
    paths = [p for p, _, _ in leaf_paths(cls)]
    sections = {p.rsplit(".", 1)[0] for p in paths if "." in p}
    if key in paths or key in sections:
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"--{key} is ambiguous; use one of: {', '.join('--' + m for m in matches)}")
    import difflib
    close = difflib.get_close_matches(key, paths, n=3, cutoff=0.6) or [p for p in paths if key.split(".")[-1] in p]
    hint = f" (did you mean {', '.join('--' + c for c in close[:5])}?)" if close else ""
    raise ConfigError(f"unknown option --{key}{hint}; `--help` lists every option")


def parse_overrides(cls, args: Sequence[str]) -> dict:
    """['--a.b=1', '--c', '2', '--flag'] -> nested dict {'a': {'b': '1'}, ...} (values stay strings)."""
    out: dict = {}
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: options look like --key=value")
        body = a[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            key, value = body, "true"
        key = resolve_key(cls, key.replace("-", "_"))
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: conflicts with another option")
        node[parts[-1]] = value
        i += 1
    return out


def merge_dicts(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of options")
    return data


def load(cls, yaml_path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None):
    """defaults <- base dict <- YAML file <- command-line overrides, validated into `cls`."""
    data = dict(base or {})
    if yaml_path is not None:
        try:
            data = merge_dicts(data, read_yaml(yaml_path))
            from_dict(cls, data)  # errors in the file name the file
        except ConfigError as e:
            if str(yaml_path) in str(e):
                raise
            raise ConfigError(f"{yaml_path}: {e}") from None
    data = merge_dicts(data, parse_overrides(cls, overrides))
    return from_dict(cls, data)


def _type_name(tp) -> str:
    inner, optional = _strip_optional(tp)
    if get_origin(inner) is Literal:
        s = "|".join(str(a) for a in get_args(inner))
    elif get_origin(inner) in (tuple, list):
        s = "list"
    else:
        s = getattr(inner, "__name__", str(inner))
    return s + ("|None" if optional else "")


def type_name_of(cls, key: str) -> str:
    """Name of the dataclass that holds the field at dotted `key`."""
    for part in key.split(".")[:-1]:
        cls, _ = _strip_optional(_hints(cls)[part])
    return cls.__name__


# Help of fields whose dataclasses live beside their code (they carry docstrings, not metadata).
FIELD_HELP = {
    "LoraConfig.rank": "LoRA rank r",
    "LoraConfig.alpha": "LoRA alpha; the delta is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)",
    "LoraConfig.dropout": "dropout on the input of every LoRA path (training only)",
    "LoraConfig.target_modules": "projections with an adapter (PEFT names) or all-linear",
    "LoraConfig.use_rslora": "rank-stabilised scaling alpha / sqrt(r)",
    "SamplingConfig.temperature": "rollout temperature (0 = greedy)",
    "SamplingConfig.top_p": "nucleus filter on probabilities (1 = off)",
    "SamplingConfig.top_k": "keep the k most likely tokens (-1 = off)",
    "SamplingConfig.min_p": "drop tokens below min_p x the top probability (0 = off)",
    "SamplingConfig.presence_penalty": "subtracted from the logits of tokens already generated (0 = off)",
    "SamplingConfig.n": "samples per prompt (GRPO: the group size)",
    "SamplingConfig.max_new_tokens": "rollouts are cut at this length",
    "SamplingConfig.stop_token_ids": "extra stop ids (EOS and chat end markers are always added)",
    "SamplingConfig.seed": "sampling seed",
    "PromptTemplates.student": "student user message; {problem} is filled in",
    "PromptTemplates.teacher": "teacher user message; {problem} and {solution} are filled in",
    "PromptTemplates.student_thinking": "Qwen3 thinking mode in the student prompt (and GRPO/SFT/eval prompts)",
    "PromptTemplates.teacher_thinking": "Qwen3 thinking mode in the OPSD teacher prompt",
    "PromptTemplates.system": "optional system message for both roles",
    "SFTConfig.reduction": "token: mean over all response tokens | sequence: per example, then over examples",
    "SFTConfig.chunk_size": "positions per lm-head chunk (None = one chunk)",
    "GRPOConfig.epsilon_low": "ratio clip below: 1 - epsilon_low",
    "GRPOConfig.epsilon_high": "ratio clip above: 1 + epsilon_high (DAPO uses a larger value)",
    "GRPOConfig.beta": "weight of the k3 KL to the base model (0 = no reference forward)",
    "GRPOConfig.std_normalization": "divide group-centred rewards by the group std (+ adv_eps)",
    "GRPOConfig.adv_eps": "added to the group std",
    "GRPOConfig.aggregation": "grpo: per sequence then batch | dapo: all tokens | dr_grpo: sum / (B x max_len)",
    "GRPOConfig.num_generations": "group size; must equal rollout.n",
    "GRPOConfig.temperature": "logits / temperature in the loss; must equal rollout.temperature",
    "GRPOConfig.max_completion_length": "dr_grpo normaliser (None = the batch's row length)",
    "GRPOConfig.chunk_size": "positions per lm-head chunk (None = one chunk)",
    "OPSDConfig.beta": "generalized JSD weight, TRL convention: 0 = forward KL(teacher||student), 1 = reverse KL",
    "OPSDConfig.temperature": "teacher and student logits are divided by it",
    "OPSDConfig.clip_tau": "cap of the per-token divergence (v3 of the paper; None = off)",
    "OPSDConfig.clip_mode": "token: clip each position's divergence | vocab: clip each vocabulary term",
    "OPSDConfig.reduction": "sequence: mean per rollout, then over rollouts (paper) | token: over all tokens",
    "OPSDConfig.variant": "full: whole vocabulary | sampled_token: advantage on the sampled token | top_k",
    "OPSDConfig.top_k": "teacher top-k support of the top_k variant",
    "OPSDConfig.teacher": "fixed: base weights (LoRA off) | live: current weights | ema: moving average",
    "OPSDConfig.ema_decay": "decay of the ema teacher",
    "OPSDConfig.chunk_size": "rollout positions per lm-head chunk (None = one chunk)",
}


def help_text(cls, defaults=None) -> str:
    """Every option with its type, default and help, grouped by section."""
    defaults = defaults if defaults is not None else cls()
    lines, section = [], None
    for key, f, tp in leaf_paths(cls):
        sec = key.rsplit(".", 1)[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append(f"\n[{sec or 'general'}]")
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        lines.append(f"  --{key}={value}  ({_type_name(tp)})")
        text = f.metadata.get("help") or FIELD_HELP.get(f"{type_name_of(cls, key)}.{f.name}")
        if text:
            lines.append(f"      {text}")
    return "\n".join(lines)


def field(default=dataclasses.MISSING, help: str = "", **kw):
    """dataclasses.field with a help text; mutable defaults go through default_factory."""
    if default is not dataclasses.MISSING and (dataclasses.is_dataclass(default) or isinstance(default, (list, dict))):
        d = default
        return dataclasses.field(default_factory=lambda: d, metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def check(cond: bool, key: str, message: str) -> None:
    """Raise ConfigError(f"{key}: {message}") unless cond."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


# ---------------------------------------------------------------------------------------------
# The settings of `python -m jsdr.train`. Method, LoRA and sampling settings live beside their code
# (jsdr/losses, jsdr/model/lora.py, jsdr/sampling.py) and are nested here.

from jsdr.data.prompts import PromptTemplates  # noqa: E402
from jsdr.losses import GRPOConfig, OPSDConfig, SFTConfig  # noqa: E402
from jsdr.model.lora import LoraConfig  # noqa: E402
from jsdr.sampling import SamplingConfig  # noqa: E402

DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = field("toy", "HF hub id or local directory (config.json + safetensors); 'toy' = the "
                             "embedded toy reasoner, built on first use")
    tokenizer: str | None = field(None, "tokenizer hub id or directory (default: the model's)")
    dtype: Literal["bfloat16", "float32"] = field("bfloat16", "compute and base-weight dtype; losses are float32")
    attn_impl: Literal["xla", "pallas", "cudnn"] = field("xla", "attention implementation for training forward/backward")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = field("full", "per-layer rematerialization policy")


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = field("toy", "hub id, local .jsonl/.json/.parquet file or directory, or 'toy'")
    split: str = field("train", "dataset split of a hub dataset")
    problem_field: str = field("problem", "field holding the problem text")
    solution_field: str = field("solution", "field holding the reference solution (SFT target, OPSD teacher)")
    answer_field: str = field("answer", "field holding the final answer (GRPO reward)")
    limit: int | None = field(None, "use only the first N records")
    max_prompt_tokens: int = field(1024, "longest prompt (teacher prompts include the solution)")
    max_length: int = field(16000, "SFT: longest prompt + solution in tokens")
    overlong: Literal["drop", "truncate"] = field("drop", "what to do with a longer example (always counted)")
    shuffle: bool = field(True, "shuffle every epoch (seeded)")
    eval: str | None = field(None, "held-out problems scored before and after training: a file/hub id, or 'toy' "
                                   "(the toy's test split; 'toy:validation' for tuning)")
    eval_split: str = field("test", "split of the held-out set")
    eval_limit: int = field(64, "number of held-out problems")
    eval_max_new_tokens: int = field(512, "max new tokens when scoring held-out problems")
    eval_temperature: float = field(0.0, "sampling temperature of the held-out score (0 = greedy)")

    def __post_init__(self):
        check(self.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0")
        check(self.max_length > 0, "data.max_length", "must be > 0")
        check(self.limit is None or self.limit > 0, "data.limit", "must be > 0 or None")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    learning_rate: float = field(2e-5, "peak learning rate of AdamW")
    schedule: Literal["constant", "cosine", "linear"] = field("constant", "decay after warmup")
    warmup_steps: int = field(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = field(0.0, "warmup as a fraction of train.steps")
    weight_decay: float = field(0.0, "decoupled weight decay")
    b1: float = field(0.9, "Adam beta1")
    b2: float = field(0.999, "Adam beta2")
    eps: float = field(1e-8, "Adam epsilon")
    max_grad_norm: float = field(1.0, "global gradient-norm clip (0 = off)")

    def __post_init__(self):
        check(self.learning_rate > 0, "optim.learning_rate", "must be > 0")
        check(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class LoopSection:
    steps: int = field(100, "optimizer steps")
    per_device_batch: int = field(1, "sequences per data-parallel device per micro-batch (GRPO: completions)")
    grad_accum: int = field(4, "micro-batches accumulated per optimizer step")
    effective_batch: int | None = field(None, "if set, must equal per_device_batch x data-parallel devices x grad_accum")
    log_every: int = field(1, "log metrics every N steps")
    save_every: int = field(50, "checkpoint every N steps (and always at the end)")
    eval_every: int = field(0, "score the held-out set every N steps (0 = only before and after)")
    keep_checkpoints: int = field(3, "checkpoints kept on disk")
    output_dir: str = field("runs/{method}", "run directory ({method} is replaced)")
    resume: bool = field(False, "continue from the latest checkpoint in output_dir")
    overwrite: bool = field(False, "replace what an earlier run left in output_dir (metrics, checkpoints, "
                                   "adapter); without it a non-empty run directory is refused")
    resume_override: bool = field(False, "resume even though settings that change the run (lr, schedule, "
                                         "steps, clip, method options, data) differ from the saved ones")
    max_nonfinite_steps: int = field(5, "stop after this many consecutive steps whose loss or gradient is "
                                        "not finite (each such step is skipped: weights unchanged)")
    seq_bucket: int = field(64, "sequence lengths are padded to a multiple of this (one compile per bucket)")

    def __post_init__(self):
        for k in ("steps", "per_device_batch", "grad_accum", "log_every", "save_every", "keep_checkpoints",
                  "seq_bucket", "max_nonfinite_steps"):
            check(getattr(self, k) > 0, f"train.{k}", "must be > 0")
        check(self.eval_every >= 0, "train.eval_every", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = field(1, "data-parallel axis size (base weights replicated along it)")
    fsdp: int = field(-1, "fully-sharded data-parallel axis size (-1 = all remaining devices)")
    tensor: int = field(1, "tensor-parallel axis size")
    num_devices: int | None = field(None, "use only the first N devices (None = all)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: Literal["sft", "grpo", "opsd"] = field("opsd", "training method")
    seed: int = field(0, "seed of LoRA init, data order and sampling")
    reward: Literal["math_verify", "string"] = field("math_verify", "grader of \\boxed{} answers (GRPO reward, "
                                                                    "held-out accuracy)")
    model: ModelSection = field(ModelSection(), "")
    lora: LoraConfig = field(LoraConfig(), "")
    data: DataSection = field(DataSection(), "")
    prompts: PromptTemplates = field(PromptTemplates(), "")
    optim: OptimSection = field(OptimSection(), "")
    train: LoopSection = field(LoopSection(), "")
    mesh: MeshSection = field(MeshSection(), "")
    rollout: SamplingConfig = field(SamplingConfig(), "")
    sft: SFTConfig = field(SFTConfig(), "")
    grpo: GRPOConfig = field(GRPOConfig(), "")
    opsd: OPSDConfig = field(OPSDConfig(), "")


# Per-method defaults that differ from the dataclass defaults (paper table 4/6); YAML and the command
# line override them.
METHOD_DEFAULTS: dict[str, dict] = {
    "sft": {"train": {"per_device_batch": 2, "grad_accum": 4}},
    "grpo": {"rollout": {"temperature": 1.2, "top_p": 1.0, "n": 8, "max_new_tokens": 16000},
             "grpo": {"temperature": 1.2, "num_generations": 8}},
    "opsd": {"rollout": {"temperature": 1.1, "top_p": 0.95, "top_k": 20, "n": 1, "max_new_tokens": 2048}},
}
