"""Configuration as data: nested frozen dataclasses, loaded from YAML and `--key=value` overrides.

Every setting of jsdr is a field of a dataclass with a default and a help text
(`dataclasses.field(metadata={"help": ...})`). This module knows nothing about the settings
themselves; it only converts plain data to dataclasses and back:

    cfg = load(TrainConfig, yaml_path="configs/paper/opsd-v1-qwen3-4b.yaml",
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
    """A bad configuration value; the message names the key.

    `key` (optional) is the field's name relative to the dataclass that raised it; the loader prefixes
    it with the section path (`beta` -> `opsd.beta`) so the message names the option a user types."""

    kind = "configuration"
    exit_code = 2

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key, self.detail = key, detail


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


def _yaml_scalar(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {text!r} is not a YAML value ({' '.join(str(e).split())})") from None


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
            if isinstance(value, str):  # from the command line: the mapping in YAML flow style
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{key}: {value!r} is not a YAML mapping ({e})") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            # entries given one by one on the command line (--mesh.rules.embed=null) arrive as text
            return {k: _yaml_scalar(v, f"{key}.{k}") if isinstance(v, str) else v for k, v in value.items()}
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
            # (a section whose defaults depend on another key, e.g. prompts.preset, gives its unresolved form)
            v = merge_dicts(d.as_partial() if hasattr(d, "as_partial") else to_dict(d), v)
        kwargs[k] = convert(v, hints[k], prefix + k)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.key is not None and prefix:
            raise ConfigError(f"{prefix}{e.key}: {e.detail}", key=prefix + e.key, detail=e.detail) from None
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
    leaves = leaf_paths(cls)
    paths = [p for p, _, _ in leaves]
    sections = {p.rsplit(".", 1)[0] for p in paths if "." in p}
    if key in paths or key in sections:
        return key
    for p, _, tp in leaves:  # an entry of a mapping field: --mesh.rules.act_seq=tensor
        inner, _ = _strip_optional(tp)
        if (inner is dict or get_origin(inner) is dict) and key.startswith(p + ".") and len(key) > len(p) + 1:
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


INHERIT = "inherit"


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The options of a YAML file. `inherit: OTHER.yaml` (a path relative to the file) starts from
    that file's options (itself possibly inheriting) and the file's own options replace them, section
    by section and key by key (a shared per-method file, per-size files that say only what differs)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist" + (f" (inherited by {_chain[-1]})" if _chain else ""))
    if p.resolve() in _chain:
        raise ConfigError(f"{p}: inherits itself ({' -> '.join(str(c) for c in _chain + (p,))})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of options")
    parent = data.pop(INHERIT, None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{p}: {INHERIT}: expected the path of another YAML file, got {parent!r}")
        data = merge_dicts(read_yaml(p.parent / parent, _chain + (p.resolve(),)), data)
    return data


def to_yaml(cfg) -> str:
    """A configuration as YAML that `load` reads back to the same configuration."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)


def split_config_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the file of `--config FILE` or `--config=FILE`, the other arguments). Both entry points parse
    their command line with this, so they accept the same forms."""
    path, rest, i = None, [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            if path is not None:
                raise ConfigError("--config is given twice; merge the files into one")
            if a == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError("--config needs a file: --config FILE or --config=FILE")
                path, i = argv[i + 1], i + 2
            else:
                path, i = a.split("=", 1)[1], i + 1
                if not path:
                    raise ConfigError("--config needs a file: --config FILE or --config=FILE")
            continue
        rest.append(a)
        i += 1
    return path, rest


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
        args = [a for a in get_args(inner) if a is not Ellipsis]
        item = _type_name(args[0]) if len(args) == 1 else ""
        s = f"list of {item}" if item and item not in ("str", "Any") else "list"
    else:
        s = getattr(inner, "__name__", str(inner))
    return s + ("|None" if optional else "")


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
        text = f.metadata.get("help")
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
    """Raise ConfigError(f"{key}: {message}") unless cond. `key` is the field name within its dataclass
    (the loader adds the section: `opsd.beta`)."""
    if not cond:
        raise ConfigError(f"{key}: {message}", key=key, detail=message)
