"""Scores of sampled evaluation: Avg@n, unbiased pass@k, majority vote, response length.

All scores are fractions in [0, 1]; tables multiply by 100.

- avg@n: the mean correctness over the n samples of a problem, averaged over problems (the
  paper's Avg@16).
- pass@k: the unbiased estimator of Chen et al. (2021) from n samples with c correct,
  1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the
  huge binomials.
- maj@n: the most common extracted answer among the n samples is taken as the answer; the
  problem counts as solved when that answer is correct. Answers are grouped by
  `normalize_answer`; samples without an answer do not vote. Ties go to the group whose first
  sample comes first (a deterministic rule). The group's correctness is that of its first
  sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jsdr.data.rewards import normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k)/C(n, k): the chance that k of the n samples, drawn without
    replacement, include a correct one."""
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct_matrix: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the mean correctness of each problem's samples."""
    if len(correct_matrix) == 0:
        raise ValueError("avg_at_k: no problems")
    total = 0.0
    for i, row in enumerate(correct_matrix):
        if len(row) == 0:
            raise ValueError(f"avg_at_k: problem {i} has no samples")
        total += sum(bool(x) for x in row) / len(row)
    return total / len(correct_matrix)


def majority_answer(answers: Sequence[str | None]) -> tuple[str | None, int | None]:
    """(normalised majority answer, index of its first sample); (None, None) if nobody answered."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        key = normalize_answer(a)
        if not key:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None, None
    best = min(counts, key=lambda key: (-counts[key], first[key]))
    return best, first[best]


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k of one problem: is the most common extracted answer correct? (see module doc)"""
    if len(answers) != len(correct):
        raise ValueError(f"majority_vote: {len(answers)} answers but {len(correct)} correctness flags")
    _, idx = majority_answer(answers)
    return False if idx is None else bool(correct[idx])


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def _score(problems: Sequence[Mapping[str, Any]], ks: Sequence[int] | None, name: str) -> dict[str, Any]:
    ns = {len(p["correct"]) for p in problems}
    if len(ns) != 1:
        raise ValueError(f"summarize: benchmark {name!r} has problems with different sample counts "
                         f"{sorted(ns)}; every problem needs the same n")
    n = ns.pop()
    if n == 0:
        raise ValueError(f"summarize: benchmark {name!r} has problems without samples")
    kk = default_ks(n) if ks is None else sorted({k for k in ks if 1 <= k <= n})
    out: dict[str, Any] = {"n_problems": len(problems), "n_samples": n}
    out[f"avg@{n}"] = avg_at_k([p["correct"] for p in problems])
    for k in kk:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(bool(x) for x in p["correct"]), k)
                               for p in problems) / len(problems)
    if all("answers" in p for p in problems):
        out[f"maj@{n}"] = sum(majority_vote(p["answers"], p["correct"]) for p in problems) / len(problems)
    if all("lengths" in p for p in problems):
        lengths = [x for p in problems for x in p["lengths"]]
        out["mean_length"] = sum(lengths) / len(lengths) if lengths else 0.0
    if any("errors" in p for p in problems):
        out["grader_errors"] = sum(sum(bool(e) for e in p.get("errors", ())) for p in problems)
    return out


def summarize(results_per_problem: Sequence[Mapping[str, Any]],
              ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Scores per benchmark and overall.

    results_per_problem: one mapping per problem with
        "benchmark": name (default "default"),
        "correct": list[bool], one per sample,
        "answers": list[str | None] (extracted answers; for maj@n, optional),
        "lengths": list[int] (response lengths in tokens; optional),
        "errors": list[str | None] (grader errors; optional, counted).
    ks: the k of pass@k (default 1, 2, 4, ..., n); k > n is skipped.

    Returns {"benchmarks": {name: {"n_problems", "n_samples", "avg@n", "pass@k"...,
    "maj@n", "mean_length", "grader_errors"}}, "overall": {...}} where "overall" is the
    unweighted mean over benchmarks of every score that all benchmarks have (the paper's
    "average" column), plus the total number of problems.
    """
    if not results_per_problem:
        raise ValueError("summarize: no results")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in results_per_problem:
        groups.setdefault(str(p.get("benchmark", "default")), []).append(p)
    per = {name: _score(probs, ks, name) for name, probs in groups.items()}
    shared = set.intersection(*(set(s) for s in per.values())) - {"n_problems", "n_samples",
                                                                  "grader_errors"}
    overall: dict[str, Any] = {
        key: sum(s[key] for s in per.values()) / len(per)
        for key in sorted(shared, key=_metric_order)
    }
    overall["n_problems"] = sum(s["n_problems"] for s in per.values())
    if any("grader_errors" in s for s in per.values()):
        overall["grader_errors"] = sum(s.get("grader_errors", 0) for s in per.values())
    return {"benchmarks": per, "overall": overall}


def _metric_order(key: str) -> tuple[int, int, str]:
    order = {"avg": 0, "pass": 1, "maj": 2}
    head, _, k = key.partition("@")
    return (order.get(head, 3), int(k) if k.isdigit() else 0, key)
