"""Property tests (hypothesis): command-line overrides and data rows fail only with JsdrErrors.

(a) any sequence of `--key=value` over TrainConfig's keys either loads or raises ConfigError; a
    loaded config round-trips through to_dict/from_dict (and JSON); a partial section override
    keeps the other keys of the defaults given with `base=`.
(b) a JSONL file of valid, malformed, empty, huge, non-UTF-8 and blank lines either loads as
    exactly its valid rows or raises a DataError naming the file and the 1-based line of the
    first bad row.
Each property runs ~60 examples; the file takes a few seconds.
"""

import dataclasses
import json
import re
import tempfile
import typing
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jsdr import config as C
from jsdr import methods
from jsdr.train import TrainConfig
from jsdr.data import datasets as D
from jsdr.data import prompts as P

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,  # the same examples on every run
                    suppress_health_check=[HealthCheck.too_slow])
LEAVES = C.leaf_paths(TrainConfig)
KEYS = [k for k, _, _ in LEAVES]
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})

# ---------------------------------------------------------------------------------------------
# (a) config overrides


_special = st.sampled_from(["inf", "-inf", "nan", "NaN", "Infinity", "1e-400", "-0", "0", "1", "-1", "2.5",
                            "1e3", "true", "false", "yes", "None", "null", "", " ", "1,2", "a,b", "q_proj,v_proj",
                            "all-linear", "{}", "[1]", "--", "=", "toy", "sft", "grpo", "opsd", "float32"])
_numbers = st.one_of(st.integers(-10 ** 30, 10 ** 30), st.floats(allow_nan=True, allow_infinity=True))
_values = st.one_of(_special, _numbers.map(str), st.booleans().map(str),
                    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
_keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[-1]),
                  st.sampled_from(SECTIONS), st.text("abcdefghijklmnopqrstuvwxyz._-", min_size=1, max_size=12))
_args = st.lists(st.tuples(_keys, _values).map(lambda kv: f"--{kv[0]}={kv[1]}"), max_size=6)


def _round_trips(cfg):
    d = C.to_dict(cfg)
    assert C.from_dict(TrainConfig, d) == cfg
    assert C.from_dict(TrainConfig, json.loads(json.dumps(d))) == cfg


@SETTINGS
@given(args=_args, method=st.sampled_from([None, *methods.METHODS]))
def test_overrides_load_or_raise_config_error(args, method):
    base = methods.get(method).defaults if method else None
    try:
        cfg = C.load(TrainConfig, None, args, base=base)
    except C.ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, TrainConfig)
    _round_trips(cfg)


def test_overflowing_integer_override_is_a_config_error():
    with pytest.raises(C.ConfigError):
        C.load(TrainConfig, None, ["--seed=1e999"])


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _valid_value(tp):
    """A strategy of command-line text that is usually valid for type `tp`."""
    inner, optional = C._strip_optional(tp)
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        s = st.sampled_from([str(a) for a in typing.get_args(inner)])
    elif inner is bool:
        s = st.sampled_from(["true", "false"])
    elif inner is int:
        s = st.integers(1, 64).map(str)
    elif inner is float:
        s = st.floats(0.01, 0.99).map(repr)
    else:
        s = st.text("abcxyz_", min_size=1, max_size=8)
    return st.one_of(s, st.just("None")) if optional else s


_SECTION_KEYS = [(k, tp) for k, _, tp in LEAVES if "." in k]


@st.composite
def _partial_override(draw):
    method = draw(st.sampled_from(sorted(methods.METHODS)))
    key, tp = draw(st.sampled_from(_SECTION_KEYS))
    return method, key, draw(_valid_value(tp))


@SETTINGS
@given(case=_partial_override())
def test_partial_section_override_keeps_base_defaults(case):
    method, key, value = case
    base = methods.get(method).defaults
    before = C.load(TrainConfig, None, [], base=base)
    try:
        after = C.load(TrainConfig, None, [f"--{key}={value}"], base=base)
    except C.ConfigError:
        return  # a value the section's own checks refuse (e.g. a range); nothing to compare
    # prompts.preset is the one key that sets others: the prompt fields the base leaves unset take the
    # preset's values
    driven = {f"prompts.{k}" for k in P.PRESETS[value]} if key == "prompts.preset" else set()
    for k in KEYS:
        if k != key and k not in driven:
            assert _get(after, k) == _get(before, k), (k, key, value)
    for k in driven:
        given = base.get("prompts", {}).get(k.split(".", 1)[1])
        assert _get(after, k) == (P.PRESETS[value][k.split(".", 1)[1]] if given is None else given), k
    # the base's keys of the overridden section survive
    section = key.split(".")[0]
    for k, v in base.get(section, {}).items():
        if f"{section}.{k}" != key:
            assert _get(after, f"{section}.{k}") == v
    _round_trips(after)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_preset_override_sets_the_prompt_fields_and_nothing_else(method):
    """The case hypothesis found: --prompts.preset=public_v1 over a method's defaults."""
    test_partial_section_override_keeps_base_defaults.hypothesis.inner_test((method, "prompts.preset", "public_v1"))


def test_partial_section_override_example():
    cfg = C.load(TrainConfig, None, ["--rollout.seed=7"], base=methods.get("opsd").defaults)
    assert cfg.rollout.seed == 7
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens) == \
        (1.1, 0.95, 20, 2048)


# ---------------------------------------------------------------------------------------------
# (b) data rows

LIMIT = 600  # MAX_ROW_BYTES while these tests run
FIELDS = ("problem", "solution", "answer")
_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(lambda s: s.strip())


def _is_record(line: str) -> bool:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(row, dict) and all(isinstance(row.get(f), str) and row[f].strip() for f in FIELDS)


@st.composite
def _row(draw):
    """(kind, bytes of one line without its newline, record or None)."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "blank", "malformed", "empty", "huge", "non_utf8"]))
    rec = {f: draw(_text) for f in FIELDS}
    if kind == "valid":
        return kind, json.dumps(rec, ensure_ascii=False).encode(), rec
    if kind == "blank":
        return kind, draw(st.sampled_from([b"", b" ", b"\t  ", b"\r"])), None
    if kind == "malformed":
        text = draw(st.one_of(
            st.sampled_from(['{"problem": "x", ', "{oops", "nul", '{"problem": "p"}}', "[1, 2", "'single'",
                             '{"problem": "p", "solution": "s", "answer": "a",}', "[" * 5000]),
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), min_size=1,
                    max_size=30)).filter(lambda s: s.strip() and not _is_record(s)))
        return kind, text.encode(), None
    if kind == "empty":
        field = draw(st.sampled_from(FIELDS))
        how = draw(st.sampled_from(["", "   ", None, "NaN", "missing", "all"]))
        if how == "all":
            return kind, b"{}", None
        if how == "missing":
            del rec[field]
            return kind, json.dumps(rec, ensure_ascii=False).encode(), None
        if how == "NaN":
            rec[field] = float("nan")
        else:
            rec[field] = how
        return kind, json.dumps(rec, ensure_ascii=False).encode(), None
    if kind == "huge":
        rec["problem"] = "x" * (LIMIT + draw(st.integers(1, 500)))
        return kind, json.dumps(rec).encode(), None
    # non_utf8: an invalid byte inside the problem text of an otherwise valid row
    bad = draw(st.sampled_from([b"\x80", b"\xbf", b"\xc0", b"\xc1", b"\xe9", b"\xf5", b"\xff", b"\xed\xa0\x80"]))
    head = b'{"problem": "'
    body = json.dumps(rec, ensure_ascii=False).encode()
    return kind, head + bad + body[len(head):], None


@SETTINGS
@given(rows=st.lists(_row(), min_size=0, max_size=12))
def test_jsonl_rows_load_exactly_or_name_the_first_bad_line(rows):
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(D, "MAX_ROW_BYTES", LIMIT):
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes(b"".join(line + b"\n" for _, line, _ in rows))
        bad = [i for i, (kind, _, _) in enumerate(rows, start=1) if kind not in ("valid", "blank")]
        valid = [rec for kind, _, rec in rows if kind == "valid"]
        if not bad and valid:
            got = D.load_records(str(path))
            assert got == [{**rec, "index": i} for i, rec in enumerate(valid)]
            return
        with pytest.raises(D.DataError) as info:
            D.load_records(str(path))
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg, msg
        if bad:
            assert re.search(rf"\bline {bad[0]}\b", msg), (bad, msg)
        else:
            assert "no records" in msg


@SETTINGS
@given(rows=st.lists(_row(), min_size=1, max_size=8), limit=st.integers(1, 4))
def test_limit_stops_before_later_bad_rows(rows, limit):
    """With `limit`, rows after the limit-th record are not read (a bad row there is no error)."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(D, "MAX_ROW_BYTES", LIMIT):
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes(b"".join(line + b"\n" for _, line, _ in rows))
        first_bad = next((i for i, (k, _, _) in enumerate(rows) if k not in ("valid", "blank")), len(rows))
        valid_before = [rec for k, _, rec in rows[:first_bad] if k == "valid"]
        if len(valid_before) >= limit or (first_bad == len(rows) and valid_before):
            got = D.load_records(str(path), limit=limit)
            assert got == [{**rec, "index": i} for i, rec in enumerate(valid_before[:limit])]
        else:  # a bad row before the limit-th record, or no record at all
            with pytest.raises(D.DataError):
                D.load_records(str(path), limit=limit)


def test_dataclass_leaves_are_all_covered():
    # the strategies above draw from every leaf of TrainConfig
    assert len(KEYS) == len(set(KEYS)) > 50
    assert all(dataclasses.is_dataclass(getattr(TrainConfig(), s)) for s in SECTIONS)
