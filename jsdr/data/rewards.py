"""Final-answer extraction and grading: the last \\boxed{...} against a reference answer.

Three graders:

- "math_verify" (default, what evaluation uses): the extracted answer and the reference are
  parsed by `math_verify.parse` and compared by `math_verify.verify` (symbolic and numeric
  equality, sets, intervals, units and percentages handled by math-verify). When math-verify
  cannot judge (a parse error, a timeout, or nothing parseable on a side) the normalised string
  match below decides instead, and the failure is reported in `GradeResult.error`.
- "string": `normalize_answer(extracted) == normalize_answer(reference)` (the public GRPO code's
  exact match after normalisation).
- "string_first": the public GRPO code's v1 reward: the FIRST \\boxed{...} of the response,
  `.strip().lower()`, equal to the reference's `.strip().lower()` (no other normalisation).

Only the last \\boxed{...} (or \\fbox{...}) of a response counts (the first \\boxed{...} for
"string_first"); a response without one, or whose box is never closed (a rollout cut at the token
limit), is graded incorrect with `extracted=None`.

Timeouts: math-verify bounds each parse/compare with `signal.alarm`, which only works in the
main thread of the main interpreter. `grade(..., timeout_seconds=5)` uses that alarm in the
main thread and runs without a time bound elsewhere (math-verify's `parsing_timeout=None` /
`timeout_seconds=None`), so grading from a worker thread is safe; bound such threads yourself
if needed. `grade` never raises for a bad answer: every grader exception is caught and
reported in `error`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Literal

logger = logging.getLogger(__name__)

GradeMethod = Literal["math_verify", "string", "string_first"]
GRADE_METHODS = ("math_verify", "string", "string_first")

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """correct: the answer matches; extracted: the content of the box graded (None: no box);
    error: a grader failure (caught, never raised), else None."""

    correct: bool
    extracted: str | None
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# extraction


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == '{' and the index after its '}'.

    A backslash escapes the next character, so `\\{` and `\\}` are not structural.
    """
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (nested braces kept),
    or of `\\boxed 5` (the token after a space). None when there is no box or the last one is
    not closed."""
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    i = m.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        group = _braced(text, i)
        return None if group is None else group[0].strip()
    if i > m.end():  # "\boxed 5": up to the next whitespace or math delimiter
        token = re.match(r"[^\s$]+", text[i:])
        if token:
            return token.group(0).rstrip(".")
    return None


def first_boxed(text: str) -> str | None:
    """The content of the first `\\boxed{...}` in `text` (nested braces kept, not stripped), or None
    when there is none or it is not closed."""
    start = (text or "").find("\\boxed{")
    if start < 0:
        return None
    group = _braced(text, start + len("\\boxed"))
    return None if group is None else group[0]


# ---------------------------------------------------------------------------------------------
# string normalisation


def _unwrap_command(s: str, command: str) -> str:
    """Replace every `\\command{X}` by `X` (braces balanced)."""
    out, i = [], 0
    pattern = re.compile(re.escape(command) + r"\s*\{")
    while True:
        m = pattern.search(s, i)
        if not m:
            out.append(s[i:])
            return "".join(out)
        group = _braced(s, m.end() - 1)
        if group is None:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:m.start()])
        out.append(group[0])
        i = group[1]


_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")


def normalize_answer(s: str | None) -> str:
    """A plain string normal form of an answer for the exact-match grader and for grouping
    equal answers (majority vote). It is deliberately conservative: it removes presentation
    only (math delimiters, spacing, \\left/\\right, \\text{...} wrappers, \\dfrac/\\tfrac,
    degree marks, a trailing period, `\\!`-style spacing, thousands separators, leading zeros
    of integers) and keeps case, units inside \\text and the values themselves."""
    if s is None:
        return ""
    s = str(s).strip()
    inner = last_boxed(s)
    if inner is not None and s.lstrip().startswith(_BOX_COMMANDS):
        s = inner
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for cmd in _TEXT_COMMANDS:
        s = _unwrap_command(s, cmd)
    s = re.sub(r"(?<!\\)\\[!,;: ]|~", "", s)  # spacing commands, not the row break \\\\
    s = s.replace("{,}", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\u00b0", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 -> 1000 (not the list 1,2,3)
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+", s):  # 070 -> 70
        s = str(int(s))
    return s


# ---------------------------------------------------------------------------------------------
# grading


def _math_verify_timeout(timeout_seconds: int | None) -> int | None:
    """math-verify's signal-based timeouts only work in the main thread; elsewhere: none."""
    if timeout_seconds is None or timeout_seconds <= 0:
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    return int(timeout_seconds)


def _wrap_reference(reference: str) -> str:
    """The reference as math-verify expects it: a boxed LaTeX answer."""
    ref = reference.strip()
    if ref.startswith("$") and ref.endswith("$") and len(ref) >= 2:
        ref = ref.strip("$").strip()
    if last_boxed(ref) is not None:
        return ref
    return "\\boxed{" + ref + "}"


def _math_verify(extracted: str, reference: str, timeout: int | None) -> tuple[bool, str | None]:
    """(equal?, error) via math_verify.parse/verify; errors and timeouts are returned, not raised.

    verify is called per (gold, prediction) candidate pair, like math_verify.verify does over
    the product, so one failing candidate does not hide a matching one.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    errors: list[str] = []

    def safe(fn, what):
        try:
            return fn()
        except TimeoutException:
            errors.append(f"{what}: timeout")
        except Exception as e:  # noqa: BLE001 - the grader must never crash a run
            errors.append(f"{what}: {type(e).__name__}: {e}")
        return None

    gold = safe(lambda: parse(_wrap_reference(reference), parsing_timeout=timeout,
                              raise_on_error=True), "parse reference")
    pred = safe(lambda: parse("\\boxed{" + extracted + "}", parsing_timeout=timeout,
                              raise_on_error=True), "parse answer")
    if gold is None or pred is None:
        return False, "; ".join(errors)
    if not gold or not pred:
        return False, "math-verify parsed nothing from the " + ("reference" if not gold else "answer")
    for g in gold:
        for p in pred:
            ok = safe(lambda: verify(g, p, timeout_seconds=timeout, raise_on_error=True), "verify")
            if ok:
                return True, None
    return False, "; ".join(errors) or None


def grade(response_text: str, reference_answer: str, method: GradeMethod = "math_verify", *,
          timeout_seconds: int | None = 5, string_fallback: bool = True) -> GradeResult:
    """Grade the last \\boxed{} answer of `response_text` against `reference_answer` (the first one
    for "string_first").

    method: "math_verify", "string" or "string_first" (see the module doc). string_fallback: with
    math_verify, accept a normalised string match when math-verify failed (error) or parsed nothing.
    Never raises on bad inputs: failures are caught and reported in `error`.
    """
    if method not in GRADE_METHODS:
        raise ValueError(f"grade method must be one of {list(GRADE_METHODS)}, got {method!r}")
    reference = "" if reference_answer is None else str(reference_answer)
    if method == "string_first":
        extracted = first_boxed(str(response_text or ""))
        want = reference.strip().lower()
        return GradeResult(extracted is not None and bool(want) and extracted.strip().lower() == want, extracted)
    try:
        extracted = last_boxed(response_text or "")
    except Exception as e:  # noqa: BLE001
        return GradeResult(False, None, f"extract: {type(e).__name__}: {e}")
    if extracted is None:
        return GradeResult(False, None, None)
    try:
        string_equal = bool(reference.strip()) and normalize_answer(extracted) == normalize_answer(reference)
    except Exception as e:  # noqa: BLE001
        return GradeResult(False, extracted, f"normalize: {type(e).__name__}: {e}")
    if method == "string":
        return GradeResult(string_equal, extracted, None)
    if not extracted.strip():
        return GradeResult(False, extracted, None)
    try:
        ok, error = _math_verify(extracted, reference, _math_verify_timeout(timeout_seconds))
    except Exception as e:  # noqa: BLE001 - e.g. math-verify not importable
        ok, error = False, f"math_verify: {type(e).__name__}: {e}"
    if not ok and error is not None and string_fallback and string_equal:
        ok = True
    return GradeResult(bool(ok), extracted, error)


def reward_fn(response_text: str, reference_answer: str, method: GradeMethod = "math_verify",
              **kwargs) -> float:
    """GRPO reward: 1.0 when `grade` says correct, else 0.0."""
    return 1.0 if grade(response_text, reference_answer, method, **kwargs).correct else 0.0
