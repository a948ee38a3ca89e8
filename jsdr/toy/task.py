"""The toy task: mod-10 chains, their reference solutions, the splits and the held-out benchmark.

A list of labelled operations (+k, -k, *k) applied in order to 0, reducing modulo 10 after every
step. The reference solution writes one line per step (the labelled operation restated, the exact
arithmetic, its reduction), then the boxed answer::

    problem:  x = 0. Apply in order, mod 10:    solution:  A + 8: 0 + 8 = 8 -> 8
              A + 8                                        B + 4: 8 + 4 = 12 -> 2
              B + 4                                        C - 9: 2 - 9 = -7 -> 3
              C - 9                                        D * 7: 3 * 7 = 21 -> 1
              D * 7                                        The answer is \\boxed{1}.

Difficulty is the number of operations. Pure Python: nothing here needs JAX or a tokenizer.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from jsdr.data.prompts import PromptTemplates, fill

TOY_VERSION = "v2"  # v2: every chain starts at 0; the student habit (ToySettings.habit_fraction)
MOD = 10
OPS = ("+", "-", "*")
HELDOUT_EVERY = 5  # one problem in five (by hash of its canonical form) is held out from training ...
SPLITS = ("train", "validation", "test")  # ... and half of those are for tuning (validation), half for the test
START = 0  # every chain starts at 0: the tiny model cannot learn the long-range copy of a start digit
DEFAULT_DIFFICULTY = 4  # operations per problem of the held-out benchmark
TRAIN_DIFFICULTY = (1, 5)  # the warm start sees chains of 1..5 operations

# keyword arguments of make_problems for the training records of the toy runs
TRAIN_DEFAULTS = {"n": 4096, "difficulty": TRAIN_DIFFICULTY}

# ---------------------------------------------------------------------------------------------
# prompts (the structure of the paper's prompts, shorter texts so that the vocabulary stays tiny)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STUDENT_PROMPT = "Problem: {problem}\n\n" + INSTRUCTION
REFERENCE_HEADER = "Here is a reference solution to this problem:"
TRANSITION = "Now solve the problem yourself, step by step, and reach the same answer."
TEACHER_PROMPT = ("Problem: {problem}\n\n" + REFERENCE_HEADER + "\n{solution}\n\n" + TRANSITION + "\n\n"
                  + INSTRUCTION)
# the toy's prompt settings as the library takes them (student thinking off, teacher thinking on)
TEMPLATES = PromptTemplates(student=STUDENT_PROMPT, teacher=TEACHER_PROMPT)


def student_prompt(problem: str) -> str:
    """The student's user message: the problem and the instruction."""
    return fill(STUDENT_PROMPT, problem=problem)


def teacher_prompt(problem: str, solution: str) -> str:
    """The teacher's user message: problem, reference solution, transition, instruction."""
    return fill(TEACHER_PROMPT, problem=problem, solution=solution)


# ---------------------------------------------------------------------------------------------
# chains


def _reduce(v: int, habit: bool = False) -> int:
    """v mod 10; with the student's habit a negative v is reduced by dropping its sign (-6 -> 6)."""
    return -v % MOD if habit and v < 0 else v % MOD


def _apply(x: int, op: str, k: int) -> int:
    if op == "+":
        return x + k
    if op == "-":
        return x - k
    if op == "*":
        return x * k
    raise ValueError(f"unknown operation {op!r} (known: {OPS})")


def _label(i: int) -> str:
    return chr(ord("A") + i)


def render_problem(start: int, ops: Sequence[tuple[str, int]]) -> str:
    steps = "".join(f"\n{_label(i)} {op} {k}" for i, (op, k) in enumerate(ops))
    return f"x = {start}. Apply in order, mod {MOD}:{steps}"


def solve(start: int, ops: Sequence[tuple[str, int]], habit: bool = False) -> tuple[str, str]:
    """(step-by-step solution ending in \\boxed{answer}, answer) of one chain.

    Each line restates the labelled operation, then the exact result and its reduction."""
    x, lines = start, []
    for i, (op, k) in enumerate(ops):
        exact = _apply(x, op, k)
        lines.append(f"{_label(i)} {op} {k}: {x} {op} {k} = {exact} -> {_reduce(exact, habit)}")
        x = _reduce(exact, habit)
    lines.append(f"The answer is \\boxed{{{x}}}.")
    return "\n".join(lines), str(x)


def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of render_problem (raises ValueError on text that is not a toy problem)."""
    try:
        head, *rest = problem.split("\n")
        start = int(head.removeprefix("x = ").split(".", 1)[0])
        ops = []
        for line in rest:
            _, op, k = line.split(" ")
            ops.append((op, int(k)))
    except (ValueError, IndexError):
        raise ValueError(f"not a toy problem: {problem!r}") from None
    if not ops or render_problem(start, ops) != problem:
        raise ValueError(f"not a toy problem: {problem!r}")
    return start, ops


def verify(example: dict) -> bool:
    """Recompute the chain from the problem text and check solution and answer (and the
    arithmetic of every line of the solution)."""
    start, ops = parse_problem(example["problem"])
    solution, answer = solve(start, ops)
    if example["solution"] != solution or example["answer"] != answer:
        return False
    x = start
    for (op, k), line in zip(ops, solution.splitlines()[:-1]):  # independent check of each written step
        head, rest = line.split(": ")
        lhs, rhs = rest.split(" = ")
        exact, red = rhs.split(" -> ")
        a, op2, k2 = lhs.split(" ")
        if (head.split(" ")[1:] != [op, str(k)] or [int(a), op2, int(k2)] != [x, op, k]
                or _apply(x, op, k) != int(exact) or int(exact) % MOD != int(red)):
            return False
        x = int(red)
    return True


# ---------------------------------------------------------------------------------------------
# splits and problem sets


def split_of(problem: str) -> str:
    """By a stable hash of the text: one problem in HELDOUT_EVERY is held out, and the held-out ones
    are split in two halves, 'validation' (for choosing settings) and 'test' (for reporting only);
    the rest is 'train'."""
    h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little")
    if h % HELDOUT_EVERY:
        return "train"
    return "validation" if (h // HELDOUT_EVERY) % 2 == 0 else "test"


def _operand(rng: random.Random, op: str) -> int:
    return rng.randint(2, 9) if op == "*" else rng.randint(1, 9)


def num_distinct(difficulty: int) -> int:
    """How many distinct problems (both splits) have `difficulty` operations."""
    per_op = 9 + 9 + 8
    return per_op ** difficulty


def make_problems(n: int, seed: int = 0, difficulty: int | tuple[int, int] = DEFAULT_DIFFICULTY,
                  split: str = "train", unique: bool | None = None) -> list[dict]:
    """`n` problems of one split, deterministic in (seed, difficulty, split).

    difficulty: the number of operations, or an inclusive (lo, hi) range drawn uniformly per
    problem. unique (default: True for 'validation'/'test', False for 'train'): no problem twice.
    Each item: {"problem", "solution", "answer", "difficulty"}; the solution ends in \\boxed{answer}
    and is verified by recomputation.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else tuple(difficulty)
    if not (1 <= lo <= hi <= 26):
        raise ValueError(f"difficulty={difficulty!r}: need 1 <= operations <= 26 (or 1 <= lo <= hi <= 26)")
    unique = split != "train" if unique is None else unique
    if unique:
        space = sum(num_distinct(d) for d in range(lo, hi + 1))
        share = 1 - 1 / HELDOUT_EVERY if split == "train" else 1 / (2 * HELDOUT_EVERY)
        if n > 0.8 * space * share:
            raise ValueError(f"make_problems: {n} unique {split} problems requested, but difficulty "
                             f"{difficulty} has only about {int(space * share)} in that split")
    rng = random.Random(f"toy-{TOY_VERSION}-{seed}-{lo}-{hi}-{split}")
    out, seen = [], set()
    while len(out) < n:
        d = rng.randint(lo, hi)
        start = START
        ops = []
        for _ in range(d):
            op = rng.choice(OPS)
            ops.append((op, _operand(rng, op)))
        problem = render_problem(start, ops)
        if split_of(problem) != split or (unique and problem in seen):
            continue
        seen.add(problem)
        solution, answer = solve(start, ops)
        out.append({"problem": problem, "solution": solution, "answer": answer, "difficulty": d})
    return out


BENCHMARK_SEED = {"validation": 10_000, "test": 20_000}


def toy_benchmark(n: int = 128, seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY, split: str = "test") -> list[dict]:
    """Held-out evaluation problems, no repeats: split 'test' (the default; reported, never used to
    choose a setting) or 'validation' (for tuning)."""
    if split not in BENCHMARK_SEED:
        raise ValueError(f"toy_benchmark: split={split!r}; choose 'validation' or 'test'")
    return make_problems(n, seed=BENCHMARK_SEED[split] + seed, difficulty=difficulty, split=split, unique=True)


# ---------------------------------------------------------------------------------------------
# the warm start's two kinds of altered examples


def habit_example(ex: dict) -> dict:
    """The example as the student's habit writes it: negative results reduced by dropping the sign
    (-6 -> 6 instead of 4), the chain continued from there (a wrong answer after any negative
    result other than -5)."""
    start, ops = parse_problem(ex["problem"])
    solution, answer = solve(start, ops, habit=True)
    return dict(ex, solution=solution, answer=answer)


def recovery_example(ex: dict) -> tuple[str, dict] | None:
    """(wrong prefix, continuation) for a teacher-role example that starts from the student's habit,
    or None when the habit makes no mistake on this problem.

    The prefix is the habit's solution up to and including its first wrong line; the continuation
    applies the remaining operations, correctly, to the value that line reached, and boxes the
    result. Trained on the continuation only, the teacher learns to continue from what has been
    written, so that on a student's rollout it disagrees with the student where the student made
    its mistake, not on every later line."""
    start, ops = parse_problem(ex["problem"])
    good = ex["solution"].split("\n")
    bad = solve(start, ops, habit=True)[0].split("\n")
    wrong = [i for i in range(len(ops)) if bad[i] != good[i]]
    if not wrong:
        return None
    j = wrong[0]
    x = int(bad[j].rsplit(" -> ", 1)[1])
    rest = solve(x, ops[j + 1:])[0].split("\n")
    cont = [f"{_label(j + 1 + i)}{line[1:]}" for i, line in enumerate(rest[:-1])] + [rest[-1]]
    return "\n".join(bad[:j + 1]) + "\n", dict(ex, solution="\n".join(cont), reference=ex["solution"])
