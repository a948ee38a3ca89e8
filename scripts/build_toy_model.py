"""Build the toy reasoner's warm start that ships in the package (jsdr/data/toy_model/).

    python scripts/build_toy_model.py            # ToySettings() defaults; ~10-15 min on 2 cores
    python scripts/build_toy_model.py --check    # only score the shipped model (validation split)

Trains the tokenizer and the warm start (jsdr.data.toy.build_assets), scores it greedily on the
validation split (student: problem only, thinking off; teacher: reference solution in the prompt,
thinking on), writes the scores into toy_meta.json and replaces jsdr/data/toy_model/. Commit the
result: every machine then starts from these exact weights. Refuses to replace the shipped model
with one whose teacher cannot read the reference (--min_teacher), since OPSD needs that teacher.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def calibration(model_dir: Path, n: int) -> dict:
    from jsdr.data import toy
    from jsdr.model import hf
    tok = hf.load_tokenizer(str(model_dir))
    params, cfg, _ = hf.load_params(str(model_dir))
    probs = toy.toy_benchmark(n, split="validation")
    out = {"split": "validation", "problems": n, "max_new_tokens": 160}
    for role in ("student", "teacher"):
        out[f"{role}_greedy"] = toy.accuracy(params, cfg, tok, probs, role=role, max_new_tokens=160)["accuracy"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="score the shipped model and exit")
    ap.add_argument("--n", type=int, default=512, help="validation problems for the calibration")
    ap.add_argument("--min_teacher", type=float, default=0.8, help="lowest teacher accuracy accepted")
    args = ap.parse_args(argv)
    from jsdr.data import toy
    if args.check:
        print(json.dumps(calibration(toy.SHIPPED_DIR, args.n), indent=2))
        return 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = toy.build_assets(Path(tmp) / "toy_model", toy.DEFAULT_SETTINGS, progress=True)
        cal = calibration(out, args.n)
        print(json.dumps(cal, indent=2))
        if cal["teacher_greedy"] < args.min_teacher:
            print(f"teacher accuracy {cal['teacher_greedy']:.3f} < --min_teacher={args.min_teacher}: the shipped "
                  f"model is left as it is", file=sys.stderr)
            return 1
        meta = json.loads((out / "toy_meta.json").read_text())
        meta["calibration"] = cal
        (out / "toy_meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(toy.SHIPPED_DIR, ignore_errors=True)
        shutil.copytree(out, toy.SHIPPED_DIR)
    print(f"wrote {toy.SHIPPED_DIR} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
