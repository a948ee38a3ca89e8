"""Evaluation scores (jsdr.metrics): pass@k, avg@k, maj@k and the per-benchmark summary."""

import itertools
import math
from fractions import Fraction

import pytest

from jsdr.metrics import avg_at_k, default_ks, majority_answer, majority_vote, pass_at_k, summarize


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 1, 0.25),
    (4, 1, 2, 0.5),            # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),          # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (10, 3, 4, 5 / 6),         # 1 - C(7,4)/C(10,4) = 1 - 35/210
    (16, 0, 8, 0.0),
    (16, 16, 1, 1.0),
    (5, 3, 3, 1.0),            # n - c < k: every 3-subset holds a correct sample
    (16, 4, 1, 0.25),          # pass@1 is the fraction correct
    (16, 1, 16, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(samples[i] for i in s) for s in subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hit / len(subsets), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_matches_exact_binomials():
    for n, c, k in [(200, 37, 64), (1000, 3, 500), (64, 1, 1), (512, 500, 8)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)


def test_avg_at_k():
    assert avg_at_k([[1, 0, 0, 0], [1, 1, 1, 1]]) == pytest.approx(0.625)
    assert avg_at_k([[True, False], [False, False], [True, True]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        avg_at_k([[1], []])


def test_majority_vote():
    # 1/2 written three ways is one group of 3 (normalised strings), beating "5" (2 votes)
    answers = ["5", "\\dfrac{1}{2}", "\\frac{1}{2}", "5", None, "\\frac{1}{2} "]
    correct = [False, True, True, False, False, True]
    assert majority_answer(answers) == ("\\frac{1}{2}", 1)
    assert majority_vote(answers, correct) is True
    assert majority_vote(answers, [not x for x in correct]) is False
    # a tie goes to the answer seen first
    assert majority_answer(["3", "4", "4", "3"]) == ("3", 0)
    assert majority_vote(["3", "4", "4", "3"], [True, False, False, True]) is True
    assert majority_vote(["4", "3", "3", "4"], [False, True, True, False]) is False
    # unanswered samples never win, even when they are the most common
    assert majority_vote([None, None, None, "7"], [False, False, False, True]) is True
    assert majority_vote([None, None, ""], [False, False, False]) is False
    with pytest.raises(ValueError, match="3 answers but 2"):
        majority_vote(["1", "2", "3"], [True, False])


def test_default_ks():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert default_ks(1) == [1]


def _problem(bench, correct, answers=None, lengths=None, errors=None):
    p = {"benchmark": bench, "correct": correct}
    if answers is not None:
        p["answers"] = answers
    if lengths is not None:
        p["lengths"] = lengths
    if errors is not None:
        p["errors"] = errors
    return p


def test_summarize_constructed_results():
    results = [
        _problem("a", [1, 0, 0, 0], ["1", "2", "2", "3"], [10, 20, 30, 40], [None, None, "boom", None]),
        _problem("a", [1, 1, 0, 1], ["7", "7", "8", "7"], [5, 5, 5, 5], [None] * 4),
        _problem("b", [0, 0, 0, 0], ["x", None, "y", "x"], [100, 100, 100, 100]),
    ]
    s = summarize(results)
    a, b = s["benchmarks"]["a"], s["benchmarks"]["b"]
    assert a["n_problems"] == 2 and a["n_samples"] == 4
    assert a["avg@4"] == pytest.approx((0.25 + 0.75) / 2)
    assert a["pass@1"] == pytest.approx(a["avg@4"])  # pass@1 equals the mean accuracy
    assert a["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 2)
    assert a["pass@4"] == pytest.approx(1.0)
    assert a["maj@4"] == pytest.approx(0.5)  # problem 1: "2" wins (wrong); problem 2: "7" (right)
    assert a["mean_length"] == pytest.approx((100 + 20) / 8)
    assert a["grader_errors"] == 1
    assert b["avg@4"] == 0.0 and b["pass@4"] == 0.0 and b["maj@4"] == 0.0 and b["mean_length"] == 100
    assert "grader_errors" not in b
    o = s["overall"]
    for key in ("avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "mean_length"):
        assert o[key] == pytest.approx((a[key] + b[key]) / 2), key
    assert o["n_problems"] == 3 and o["grader_errors"] == 1
    assert list(o)[:5] == ["avg@4", "pass@1", "pass@2", "pass@4", "maj@4"]


def test_summarize_ks_and_errors():
    res = [_problem("a", [1, 0, 1, 0, 1, 0, 0, 0])]
    s = summarize(res, ks=[1, 3, 8, 64])
    assert sorted(k for k in s["benchmarks"]["a"] if k.startswith("pass@")) == ["pass@1", "pass@3", "pass@8"]
    assert s["benchmarks"]["a"]["pass@3"] == pytest.approx(pass_at_k(8, 3, 3))
    assert "maj@8" not in s["benchmarks"]["a"]  # no answers given
    assert s["benchmarks"]["a"].keys() == {"n_problems", "n_samples", "avg@8", "pass@1", "pass@3", "pass@8"}
    # benchmarks with different n share only the scores both have
    s = summarize([_problem("a", [1, 0]), _problem("b", [1, 0, 0, 0])])
    assert "avg@2" not in s["overall"] and s["overall"]["pass@2"] == pytest.approx(
        (1.0 + pass_at_k(4, 1, 2)) / 2)
    with pytest.raises(ValueError, match="benchmark 'a' has problems with different sample counts"):
        summarize([_problem("a", [1, 0]), _problem("a", [1, 0, 1])])
    with pytest.raises(ValueError, match="no results"):
        summarize([])
    assert summarize([{"correct": [True]}])["benchmarks"]["default"]["avg@1"] == 1.0
