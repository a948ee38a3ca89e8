"""Plan every config in configs/paper/ with `python -m jsdr.plan` (its own layout) and print one
markdown table: does it fit, GiB per device of each program (the rollout's under both sampler
engines), estimated step time, planner wall time.

    python scripts/plan_paper.py --target a100-80gb --devices 8 --out plans/     # runs the planner
    python scripts/plan_paper.py --out plans/ --table-only                       # formats earlier runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3


def run(config: Path, out: Path, target: str, devices: int) -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", "jsdr.plan", "--config", str(config), "--devices", str(devices), "--target", target,
           "--json", str(out / f"{config.stem}.json")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{config.name}: jsdr.plan failed:\n{done.stderr[-2000:]}")
    wall = time.time() - t0
    (out / f"{config.stem}.txt").write_text(done.stdout)
    return wall


def table(out: Path, walls: dict[str, float]) -> str:
    """One line per config. Sampling methods: the rollout is sampled by the paged engine (the default
    `rollout.engine`) in its decode layout, whose rows decide "fits" and the estimate; the dense
    engine's decode in the training layout is shown beside it."""
    lines = ["| config | layout | attention | compiler | train step GiB | rollout decode GiB dense / paged "
             "| fits (>=10% headroom) | est. step s | planner wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(p for p in out.glob("*.json") if p.name != "walls.json"):
        rows: dict[tuple, dict] = {}
        for r in json.loads(path.read_text()):  # the first of each: the automatic decode layout
            rows.setdefault((r.get("engine", ""), r["program"]), r)
        step = rows[("", "train_step")]
        dense, paged = rows.get(("dense", "rollout_decode")), rows.get(("paged", "rollout_decode"))
        used = [r for (engine, _), r in rows.items() if engine == ("paged" if paged else "dense")]
        hbm = step["hbm_bytes"]
        totals = [step["bytes_per_device"]["total"]] + [r["bytes_per_device"]["total"] for r in used]
        fits = all(t <= 0.9 * hbm for t in totals)
        layout = ",".join(f"{k}={v}" for k, v in step["mesh"].items() if v > 1)
        est = step["est_step_s"] + sum(r["est_step_s"] for r in used)
        wall = "" if walls.get(path.stem) is None else f"{walls[path.stem]:.0f}"
        dec = " / ".join("" if r is None else f"{r['bytes_per_device']['total'] / GIB:.1f}" for r in (dense, paged))
        lines.append(f"| {path.stem} | {layout} | {step['attn_impl']} | {step['compiler']} | "
                     f"{step['bytes_per_device']['total'] / GIB:.1f} | {dec if dense or paged else ''} | "
                     f"{'yes' if fits else 'NO'} ({max(totals) / hbm:.0%} of HBM) | {est:.1f} | {wall} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="a100-80gb")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--out", default="plans")
    ap.add_argument("--table-only", action="store_true", help="format the JSON files already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    walls = {}
    if not args.table_only:
        for config in sorted((REPO / "configs" / "paper").glob("*.yaml")):
            walls[config.stem] = run(config, out, args.target, args.devices)
            print(f"{config.stem}: {walls[config.stem]:.0f} s", file=sys.stderr)
        (out / "walls.json").write_text(json.dumps(walls))
    elif (out / "walls.json").exists():
        walls = json.loads((out / "walls.json").read_text())
    print(table(out, walls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
