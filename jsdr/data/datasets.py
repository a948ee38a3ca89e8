"""Problem records from the Hugging Face hub or from local files.

`load_records` returns plain dicts with canonical keys (`problem`, `solution`, `answer`, as asked
by `fields`) plus `index`, the row's position in the source. The source is

- a local `.jsonl`, `.json` or `.parquet` file, or a directory of them, or
- a hub dataset id (`owner/name`) loaded with `datasets.load_dataset` when a network (or the
  local hub cache) is available.

Every value must be present and non-empty; numbers (e.g. AIME answers stored as integers) are
turned into strings. Errors name the file and the row (`file.jsonl line 7`, `file.parquet
row 3`), the missing field and the fields that are there.

`BENCHMARKS` holds the evaluation benchmarks of the paper (table 5) and `TRAIN_DATASET` the OPSD
training set, each with its hub id, split and field names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from jsdr.config import check, field
from jsdr.errors import JsdrError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
# a longer JSON line, or a longer text field in any format, is an error (it is no problem record,
# and reading it whole could exhaust memory)
MAX_ROW_BYTES = 16 * 1024 ** 2
DEFAULT_FIELDS = {"problem": "problem", "solution": "solution", "answer": "answer"}


class DataError(JsdrError, ValueError):
    """A data source that cannot be read as asked; the message names the file/dataset and row."""

    kind = "data"


# ---------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives and which of its fields hold the canonical values.

    fields maps canonical name -> source field (only the canonical names listed are loaded).
    extra_fields are copied as they are when present (e.g. AMO-Bench's answer_type).
    """

    name: str
    hub_id: str
    split: str
    fields: Mapping[str, str]
    config: str | None = None
    extra_fields: tuple[str, ...] = ()
    notes: str = ""


BENCHMARKS: dict[str, DatasetSpec] = {
    "aime24": DatasetSpec(
        "aime24", "HuggingFaceH4/aime_2024", "train", {"problem": "problem", "answer": "answer"},
        notes="AIME 2024 I and II, 30 problems; integer answers 0-999."),
    "aime25": DatasetSpec(
        "aime25", "yentinglin/aime_2025", "train", {"problem": "problem", "answer": "answer"},
        notes="AIME 2025 I and II, 30 problems; answers may be stored as integers."),
    "hmmt25": DatasetSpec(
        "hmmt25", "MathArena/hmmt_feb_2025", "train", {"problem": "problem", "answer": "answer"},
        notes="HMMT February 2025, 30 problems; LaTeX answers."),
    "amo": DatasetSpec(
        "amo", "meituan-longcat/AMO-Bench", "test", {"problem": "prompt", "answer": "answer"},
        extra_fields=("question_id", "answer_type"),
        notes="AMO-Bench, 50 problems; answer_type 'description' answers (about a fifth) need a "
              "judge model in the original benchmark and are graded here by math-verify/string "
              "match only, which undercounts them."),
    "math500": DatasetSpec(
        "math500", "HuggingFaceH4/MATH-500", "test", {"problem": "problem", "answer": "answer"},
        extra_fields=("subject", "level", "unique_id"),
        notes="MATH-500, 500 problems."),
}

TRAIN_DATASET = DatasetSpec(
    "openthoughts_math_30k", "siyanzhao/Openthoughts_math_30k_opsd", "train",
    {"problem": "problem", "solution": "solution", "answer": "Answer"},
    notes="About 30k OpenThoughts math problems; 'Answer' holds the final answer (the reward "
          "reference for GRPO), 'solution' the worked reference solution (OPSD teacher, SFT "
          "target); 'Question' repeats the problem.")


# ---------------------------------------------------------------------------------------------
# readers: each yields (location, row) where location names the file and the row


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training and held-out problems come from, and the length policy of the examples."""

    train: str = field("toy", "hub id, local .jsonl/.json/.parquet file or directory, or 'toy'")
    split: str = field("train", "dataset split of a hub dataset")
    problem_field: str = field("problem", "field holding the problem text")
    solution_field: str = field("solution", "field holding the reference solution (SFT target, OPSD teacher)")
    answer_field: str = field("answer", "field holding the final answer (GRPO reward)")
    limit: int | None = field(None, "use only the first N records")
    max_prompt_tokens: int = field(1024, "longest student / GRPO prompt (the problem in the chat template); a longer "
                                         "one is dropped (never cut: the problem would be mangled)")
    max_teacher_prompt_tokens: int = field(20000, "OPSD: longest teacher prompt (problem + reference solution; the "
                                                  "public code allows 20,000 tokens); see data.overlong")
    max_length: int = field(16000, "SFT: longest prompt + solution in tokens; see data.overlong")
    overlong: Literal["drop", "truncate"] = field(
        "drop", "a longer SFT example or OPSD teacher prompt: dropped, or its solution cut to fit; every drop and "
                "cut is counted per reason in the log and at step 0 of metrics.jsonl")
    shuffle: bool = field(True, "shuffle every epoch (seeded)")
    eval: str | None = field(None, "held-out problems scored before and after training: a file/hub id, or 'toy' "
                                   "(the toy's test split; 'toy:validation' for tuning)")
    eval_split: str = field("test", "split of the held-out set")
    eval_limit: int = field(64, "number of held-out problems")
    eval_max_new_tokens: int = field(512, "max new tokens when scoring held-out problems")
    eval_temperature: float = field(0.0, "sampling temperature of the held-out score (0 = greedy)")

    def __post_init__(self):
        check(self.max_prompt_tokens > 0, "max_prompt_tokens", "must be > 0")
        check(self.max_teacher_prompt_tokens > 0, "max_teacher_prompt_tokens", "must be > 0")
        check(self.max_length > 0, "max_length", "must be > 0")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 or None")

    def fields(self) -> dict[str, str]:
        """The record fields to read: canonical name -> field name in the source."""
        return {"problem": self.problem_field, "solution": self.solution_field, "answer": self.answer_field}


def _json_error(e: ValueError | RecursionError) -> str:
    """What is wrong with a JSON text, on one line."""
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON ({e.msg} at column {e.colno})"
    if isinstance(e, RecursionError):
        return "malformed JSON (nested too deeply)"
    return f"malformed JSON ({' '.join(str(e).split())[:200]})"  # e.g. an integer of over 4300 digits


def _not_utf8(path: Path, line: int, column: int, byte: int) -> DataError:
    return DataError(f"{path}: cannot read (UnicodeDecodeError at line {line} column {column}: byte 0x{byte:02x} "
                     f"is not UTF-8); re-encode the file as UTF-8")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_ROW_BYTES + 1)
            if not raw:
                return
            lineno += 1
            where = f"{path} line {lineno}"
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{where}: row longer than the limit of {MAX_ROW_BYTES} bytes; "
                                f"is this a JSON lines file?")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8", "replace")) + 1
                raise _not_utf8(path, lineno, column, raw[e.start]) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise DataError(f"{where}: {_json_error(e)}") from None
            yield where, row


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line_start = raw.rfind(b"\n", 0, start) + 1
        column = len(raw[line_start:start].decode("utf-8", "replace")) + 1
        raise _not_utf8(path, raw[:start].count(b"\n") + 1, column, raw[start]) from None
    if not text.strip():
        raise DataError(f"{path}: no records in this file (it is empty)")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        # a .json file holding JSON lines is common; read it as such if every line parses
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{"):
            yield from _read_jsonl(path)
            return
        if isinstance(e, json.JSONDecodeError):
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        raise DataError(f"{path}: {_json_error(e)}") from None
    if isinstance(data, Mapping):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            data = data[lists[0]]
        else:
            raise DataError(f"{path}: expected a JSON array of objects (or an object holding exactly "
                            f"one array), got an object with keys {sorted(data)[:10]}")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} item {i}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise DataError(f"{path}: cannot read parquet file ({type(e).__name__}: {e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _files_of(path: Path, split: str | None) -> list[Path]:
    """Data files of a directory (recursive, sorted); those named after `split` when any is."""
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no {'/'.join(SUPPORTED_SUFFIXES)} files in this directory")
    if split:
        named = [p for p in files
                 if p.stem == split or p.name.startswith((split + "-", split + "_", split + "."))
                 or split in p.relative_to(path).parts[:-1]]
        if named:
            return named
    return files


def _looks_local(source: str) -> bool:
    """A path rather than a hub id (`owner/name`): a data-file suffix, ./ / ~ prefixes, or more
    than one slash."""
    return (source.endswith(SUPPORTED_SUFFIXES) or source.startswith((".", "/", "~"))
            or source.count("/") > 1 or "\\" in source)


def _local_rows(source: str, split: str | None) -> Iterator[tuple[str, Any]]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    files = _files_of(path, split) if path.is_dir() else [path]
    for f in files:
        reader = _READERS.get(f.suffix)
        if reader is None:
            raise DataError(f"{f}: unsupported file type {f.suffix!r}; use one of "
                            + ", ".join(SUPPORTED_SUFFIXES))
        try:
            yield from reader(f)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: cannot read ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _hub_rows(source: str, split: str, config: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{source}: loading a hub dataset needs the `datasets` package ({e})") from None
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all reported the same way
        raise DataError(
            f"cannot load hub dataset {source!r} (split {split!r}"
            + (f", config {config!r}" if config else "") + f"): {type(e).__name__}: {' '.join(str(e).split())[:300]}. "
            "Without a network, download it elsewhere (e.g. `hf download --repo-type dataset "
            f"{source} --local-dir DIR`) and pass the local .jsonl/.json/.parquet file or "
            "directory instead (set HF_HUB_OFFLINE=1 to skip the network retries)."
        ) from None
    for i, row in enumerate(ds):
        yield f"{source} [{split}] row {i}", row


# ---------------------------------------------------------------------------------------------
# records


def _value(row: Mapping[str, Any], key: str, canonical: str, where: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r} (for {canonical}); the row has fields "
                        f"{sorted(row)}")
    v = row[key]
    if isinstance(v, bool):
        raise DataError(f"{where}: field {key!r} is a boolean ({v}), expected text")
    if isinstance(v, int):
        try:
            return str(v)
        except ValueError:  # over Python's 4300-digit limit
            raise DataError(f"{where}: field {key!r} is an integer too long to turn into text") from None
    if isinstance(v, float):
        if math.isnan(v):
            raise DataError(f"{where}: field {key!r} is empty (NaN)")
        if math.isinf(v):
            raise DataError(f"{where}: field {key!r} is not a finite number ({v})")
        return str(int(v)) if v.is_integer() else repr(v)
    if v is None:
        raise DataError(f"{where}: field {key!r} is empty (null)")
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be text, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    if len(v) > MAX_ROW_BYTES:
        raise DataError(f"{where}: field {key!r} has {len(v)} characters, over the limit of {MAX_ROW_BYTES}")
    return v


def _iter_records(rows: Iterable[tuple[str, Any]], fields: Mapping[str, str],
                  extra_fields: Sequence[str], limit: int | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if limit == 0:
        return out
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object with fields {sorted(fields.values())}, "
                            f"got {type(row).__name__}")
        rec: dict[str, Any] = {c: _value(row, k, c, where) for c, k in fields.items()}
        for k in extra_fields:
            if k in row and k not in rec:
                rec[k] = row[k]
        rec["index"] = index
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break  # before reading further rows
    return out


def load_records(source: str, split: str = "train", fields: Mapping[str, str] | None = None,
                 limit: int | None = None, *, config: str | None = None,
                 extra_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records `{canonical: text, ..., "index": i}` from a hub id or local file(s).

    source: a `.jsonl` / `.json` (array of objects) / `.parquet` file, a directory of them
        (recursive; files named after `split`, like `train-00000-of-00002.parquet` or
        `train/…`, are taken when there are any, else all files), or a hub dataset id.
    split: the hub split (and the file filter for directories).
    fields: canonical name -> source field; default problem/solution/answer of the same names.
    limit: keep the first `limit` records.
    config: the hub dataset configuration, if it has several.
    extra_fields: source fields copied as they are when present (not required).
    """
    fields = dict(DEFAULT_FIELDS if fields is None else fields)
    if not fields:
        raise DataError("fields: at least one field (e.g. problem) is needed")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if os.path.exists(os.path.expanduser(source)) or _looks_local(source):
        rows = _local_rows(source, split)
    else:
        rows = _hub_rows(source, split, config)
    records = _iter_records(rows, fields, extra_fields, limit)
    if not records and limit != 0:
        if os.path.isfile(os.path.expanduser(source)):
            raise DataError(f"{source}: no records in this file (it is empty or holds no rows)")
        raise DataError(f"{source}: no records" + (f" in split {split!r}" if split else ""))
    return records


def load_spec(spec: DatasetSpec | str, path: str | None = None, limit: int | None = None,
              fields: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Records of a registered data set (a `BENCHMARKS` name or a DatasetSpec), from its hub id
    or from `path` (a local copy; `fields` overrides the spec's field names)."""
    if isinstance(spec, str):
        if spec not in BENCHMARKS:
            raise DataError(f"unknown benchmark {spec!r}; known: {', '.join(BENCHMARKS)} "
                            "(or pass a local file with its field names)")
        spec = BENCHMARKS[spec]
    return load_records(path or spec.hub_id, spec.split, fields or spec.fields, limit,
                        config=spec.config, extra_fields=spec.extra_fields)
