"""The toy version of the paper's comparison: SFT, GRPO and OPSD from the same warm start, the same
number of optimizer steps, several seeds.

    python scripts/toy_paper.py                       # seeds 0-4 on the test split: the README table
    python scripts/toy_paper.py --seeds 0 --steps 10  # a quick look
    python scripts/toy_paper.py --split validation --methods opsd --set optim.learning_rate=1e-3   # tuning

Settings are chosen on the validation split only (`--split validation`); the test split (the default)
is for reporting and was never used to choose anything.

Writes to --out (default runs/toy_paper):
  table.md      held-out accuracy before/after, the gain with its 95% interval over seeds (Student t),
                per-seed gains, rollout tokens, wall time
  results.json  every run's curve (step, cumulative rollout tokens, held-out accuracy)
  accuracy.png  held-out accuracy against optimizer steps and against cumulative rollout tokens
                (the toy version of the paper's token-efficiency figure)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

METHODS = ("sft", "grpo", "opsd")


def run_one(method: str, seed: int, out: Path, steps: int | None, eval_every: int, extra: list[str],
            split: str = "test") -> dict:
    from jsdr import train
    run_dir = out / f"{method}-seed{seed}"
    args = [f"--method={method}", f"--seed={seed}", f"--train.output_dir={run_dir}", "--train.overwrite=true",
            f"--train.eval_every={eval_every}", f"--data.eval=toy:{split}"]
    if steps is not None:
        args.append(f"--train.steps={steps}")
    cfg, _ = train.build_config(args + [f"--{e}" for e in extra])
    t0 = time.time()
    trainer = train.Trainer(cfg, progress=True, log=lambda *a: print(*a, file=sys.stderr))
    summary = trainer.run()
    wall = time.time() - t0
    curve = [(0, 0, summary["eval/accuracy_before"])]
    for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval/accuracy" in r and r["step"] > 0:
            curve.append((r["step"], r.get("rollout_tokens", trainer.rollout_tokens), r["eval/accuracy"]))
    # the final score replaces a periodic one logged at the same (last) step
    curve = [c for c in curve if c[0] != summary["step"]] + [(summary["step"], trainer.rollout_tokens,
                                                              summary["eval/accuracy_after"])]
    return {"method": method, "seed": seed, "split": split, "problems": len(trainer.eval_records),
            "before": summary["eval/accuracy_before"],
            "after": summary["eval/accuracy_after"], "rollout_tokens": trainer.rollout_tokens,
            "wall_s": wall, "curve": curve}


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# two-sided 95% quantiles of Student's t by degrees of freedom (1..30)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval95(xs) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean over seeds."""
    m, sd = mean_std(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    h = _T975[min(len(xs) - 1, 30) - 1] * sd / len(xs) ** 0.5
    return m, m - h, m + h


def table(results: list[dict]) -> str:
    lines = ["| method | held-out acc. before | after | gain (95% interval) | gain per seed | rollout tokens "
             "| wall time / run |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        b, a = mean_std([r["before"] for r in rs]), mean_std([r["after"] for r in rs])
        gains = [r["after"] - r["before"] for r in rs]
        g, lo, hi = interval95(gains)
        per = " / ".join(f"{100 * x:+.1f}" for x in gains)
        tok = statistics.mean(r["rollout_tokens"] for r in rs)
        wall = statistics.mean(r["wall_s"] for r in rs)
        lines.append(f"| {m} | {100 * b[0]:.1f} | {100 * a[0]:.1f} ± {100 * a[1]:.1f} | "
                     f"**{100 * g:+.1f}** [{100 * lo:+.1f}, {100 * hi:+.1f}] | {per} | {tok:,.0f} | {wall:.0f} s |")
    seeds = sorted({r["seed"] for r in results})
    split = results[0].get("split", "test")
    n = results[0].get("problems")
    lines.append(f"\nSeeds {', '.join(map(str, seeds))}; accuracy in %, greedy decoding on {n} problems of the toy's "
                 f"{split} split; after: mean ± standard deviation; gain: mean over seeds with its 95% Student-t "
                 f"interval.")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"sft": "tab:gray", "grpo": "tab:blue", "opsd": "tab:red"}
    for r in results:
        by_step = {c[0]: c for c in r["curve"]}  # one point per step (the last one logged)
        steps, toks, acc = zip(*sorted(by_step.values()))
        label = r["method"] if r["seed"] == min(x["seed"] for x in results) else None
        ax1.plot(steps, [100 * a for a in acc], color=colors[r["method"]], alpha=0.8, label=label, marker=".")
        if r["method"] != "sft":
            ax2.plot(toks, [100 * a for a in acc], color=colors[r["method"]], alpha=0.8, label=label, marker=".")
    ax1.set_xlabel("optimizer steps")
    ax2.set_xlabel("cumulative rollout tokens generated")
    for ax in (ax1, ax2):
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("toy task: SFT vs GRPO vs OPSD from the same warm start (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--split", default="test", choices=("validation", "test"),
                    help="held-out split scored (choose settings on validation only)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: configs/toy/*.yaml)")
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--out", default="runs/toy_paper")
    ap.add_argument("--set", action="append", default=[], help="extra option, e.g. --set opsd.beta=0")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for m in a.methods.split(","):
            print(f"== {m} seed {seed}", file=sys.stderr)
            results.append(run_one(m, seed, out, a.steps, a.eval_every, a.set, a.split))
            (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    try:
        plot(results, out / "accuracy.png")
        print(f"plot: {out / 'accuracy.png'}")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): no plot written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
