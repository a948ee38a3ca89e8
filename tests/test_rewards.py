"""Answer extraction and grading (jsdr.data.rewards) against math-verify called directly."""

import threading
import time

import math_verify
import pytest
from math_verify import parse, verify
from math_verify.errors import TimeoutException

from jsdr.data import rewards as R
from jsdr.data.rewards import grade, last_boxed, normalize_answer, reward_fn

# (reference answer, model's boxed answer, equivalent?) - the labels are ours (a human's
# judgement), and both math-verify called directly and our grade must reproduce them.
TRICKY_PAIRS = [
    # fractions and LaTeX forms
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("\\frac{3}{4}", "3/4", True),
    ("\\frac{14}{3}", "4\\frac{2}{3}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    # units, degrees, percentages, currency
    ("5", "5 \\text{ cm}", True),
    ("5\\text{ cm}", "5", True),
    ("5", "6\\text{ cm}", False),
    ("30^\\circ", "30", True),
    ("30", "30^{\\circ}", True),
    ("30^\\circ", "60^\\circ", False),
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("25\\%", "50\\%", False),
    ("\\$5", "5", True),
    # intervals and sets
    ("(1,2]", "(1, 2]", True),
    ("(1,2]", "[1,2]", False),
    ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("[0,\\infty)", "(0,\\infty)", False),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True),
    ("1,2,3", "3,2,1", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    # signs, roots, pi, powers, complex numbers, matrices
    ("-3", "-3", True),
    ("-3", "3", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\pi", "3.14159", False),
    ("2\\pi", "2\\pi", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("10^{10}", "10000000000", True),
    ("e^{2}", "e^2", True),
    ("\\ln 2", "\\log 2", False),
    ("3+2i", "2i+3", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    # equations and expressions
    ("x=2", "2", True),
    ("2x+1", "1+2x", True),
    ("y=2x+1", "2x+1", True),
    # integers as written in competitions
    ("1000", "1,000", True),
    ("1000", "1{,}000", True),
    ("70", "070", True),
    ("204", "240", False),
    # text answers
    ("\\text{Monday}", "Monday", True),
    ("\\text{(B)}", "B", True),
    ("\\text{(B)}", "C", False),
]


def _direct(reference: str, response: str) -> bool:
    """math-verify as its README uses it: parse both sides, verify(gold, prediction)."""
    return verify(parse("\\boxed{" + reference + "}"), parse(response))


@pytest.mark.parametrize("reference,answer,label", TRICKY_PAIRS)
def test_grade_agrees_with_math_verify(reference, answer, label):
    response = f"Some reasoning, $x^2 = 4$ on the way. So the final answer is \\boxed{{{answer}}}."
    assert _direct(reference, response) == label  # the shipped labels hold for math-verify itself
    r = grade(response, reference)
    assert (r.correct, r.extracted, r.error) == (label, answer, None)
    assert reward_fn(response, reference) == (1.0 if label else 0.0)


def test_pairs_cover_the_issue_categories():
    assert len(TRICKY_PAIRS) >= 25
    assert sum(label for *_, label in TRICKY_PAIRS) >= 10
    assert sum(not label for *_, label in TRICKY_PAIRS) >= 10


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"  # escaped braces
    assert last_boxed("x \\fbox{42} y") == "42"
    assert last_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert last_boxed("so \\boxed 5.") == "5"
    assert last_boxed("$\\boxed 7$") == "7"
    assert last_boxed("\\boxed { 3 }") == "3"
    assert last_boxed("\\boxed{a^{b^{c}}}") == "a^{b^{c}}"
    assert last_boxed("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}") == "\\begin{pmatrix}1\\\\2\\end{pmatrix}"
    assert last_boxed("no answer 5") is None
    assert last_boxed("") is None and last_boxed(None) is None
    assert last_boxed("\\boxed{1} ... \\boxed{2") is None  # the last box is cut off
    assert last_boxed("\\boxedx{3}") is None  # another command
    assert last_boxed("\\boxed{}") == ""


def test_only_the_last_box_counts():
    response = "First guess \\boxed{3}. Wait, that is wrong. The answer is \\boxed{5}."
    assert grade(response, "5").correct and grade(response, "5").extracted == "5"
    assert not grade(response, "3").correct
    # no box at all: incorrect, even though math-verify alone would pick up the bare number
    r = grade("The answer is 5.", "5")
    assert (r.correct, r.extracted, r.error) == (False, None, None)
    assert verify(parse("\\boxed{5}"), parse("The answer is 5."))
    # a rollout cut inside the last box is not answered
    assert grade("\\boxed{5} hmm, no: \\boxed{6", "5").extracted is None
    assert grade("\\boxed{}", "5") == R.GradeResult(False, "", None)


def test_reference_forms():
    # references may come boxed or in $...$ (e.g. AMO-Bench answers are boxed)
    assert grade("\\boxed{\\frac12}", "\\boxed{0.5}").correct
    assert grade("\\boxed{\\frac12}", "$\\frac{1}{2}$").correct
    assert grade("\\boxed{204}", 204).correct  # integer references from datasets
    assert not grade("\\boxed{204}", "").correct


STRING_CASES = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{1}{2}", "\\frac{1}{2}", True),
    ("$5$.", "5", True),
    ("\\text{Monday}", "Monday", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30\u00b0", True),
    ("1,000", "1000", True),
    ("070", "70", True),
    ("\\left( 1, 2 \\right]", "(1,2]", True),
    ("a\\!b\\,c", "abc", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("0.5", "\\frac{1}{2}", False),  # no arithmetic in string mode
    ("x", "X", False),  # case is kept
    ("1,2,3", "123", False),  # a list is not a thousands-separated number
    ("-3", "3", False),
]


@pytest.mark.parametrize("answer,reference,equal", STRING_CASES)
def test_string_mode(answer, reference, equal):
    assert (normalize_answer(answer) == normalize_answer(reference)) == equal
    r = grade(f"so \\boxed{{{answer}}}", reference, method="string")
    assert r.correct == equal and r.error is None


def test_normalize_answer_examples():
    assert normalize_answer("\\boxed{ \\dfrac{1}{2} }") == "\\frac{1}{2}"
    assert normalize_answer("\\text{5 cm}") == "5cm"
    assert normalize_answer(None) == ""
    assert normalize_answer(" -0012 ") == "-12"


def test_grader_errors_are_counted_not_raised(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(math_verify, "parse", boom)
    r = grade("\\boxed{7}", "8")
    assert (r.correct, r.extracted) == (False, "7") and "RuntimeError: parser exploded" in r.error
    # when math-verify cannot judge, an exact normalised match still counts (error reported)
    r = grade("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")
    assert r.correct and "parser exploded" in r.error
    r = grade("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", string_fallback=False)
    assert not r.correct and r.error
    monkeypatch.undo()

    def timeout(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(math_verify, "verify", timeout)
    r = grade("\\boxed{7}", "7.0")
    assert not r.correct and set(r.error.split("; ")) == {"verify: timeout"}
    monkeypatch.undo()
    # garbage input does not raise
    for bad in ["\\boxed{\\frac{}{}}", "\\boxed{\\sqrt[}", "\\boxed{" + "(" * 200 + "}", "\\boxed{)(][}"]:
        r = grade(bad, "1")
        assert r.correct is False
    assert grade(None, "1") == R.GradeResult(False, None, None)
    assert grade("\\boxed{1}", None).correct is False
    with pytest.raises(ValueError, match="grade method"):
        grade("\\boxed{1}", "1", method="exact")


def test_real_timeout_in_main_thread(monkeypatch):
    import math_verify.parser as mvp

    real = mvp.extract_target_from_pred
    calls = []

    def slow(pred, *args, **kwargs):
        calls.append(pred)
        if "SLOW" in pred:
            time.sleep(3)
        return real(pred, *args, **kwargs)

    monkeypatch.setattr(mvp, "extract_target_from_pred", slow)
    t = time.perf_counter()
    r = grade("\\boxed{SLOW}", "1", timeout_seconds=1)
    assert time.perf_counter() - t < 2.5
    assert not r.correct and r.error == "parse answer: timeout"


def test_grading_from_a_worker_thread(monkeypatch):
    seen = {}
    real_parse = math_verify.parse

    def spy(*args, **kwargs):
        seen.setdefault(threading.current_thread() is threading.main_thread(), set()).add(
            kwargs.get("parsing_timeout"))
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(math_verify, "parse", spy)
    results = {}

    def work():
        results["thread"] = [grade(f"\\boxed{{{a}}}", g).correct for g, a, _ in TRICKY_PAIRS[:8]]

    th = threading.Thread(target=work)
    th.start()
    th.join()
    main = [grade(f"\\boxed{{{a}}}", g).correct for g, a, _ in TRICKY_PAIRS[:8]]
    assert results["thread"] == main == [label for *_, label in TRICKY_PAIRS[:8]]
    assert seen == {False: {None}, True: {5}}  # no signal timeout off the main thread
