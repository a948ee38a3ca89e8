"""Build the toy reasoner's warm start that ships in the package (jsdr/toy/toy_model/).

    python scripts/build_toy_model.py            # ToySettings() defaults; ~10-15 min on 2 cores
    python scripts/build_toy_model.py --check    # only score the shipped model (validation split)
    python scripts/build_toy_model.py --set steps=5 --set hidden_size=32 --out /tmp/toy --min_teacher 0 --n 16
                                                 # a quick try of the build on other settings

Trains the tokenizer and the warm start (jsdr.toy.build_assets: the library's packer and SFT loss),
scores it greedily on the validation split (jsdr.toy.accuracy: the library's sampler and grader;
student: problem only, thinking off; teacher: reference solution in the prompt, thinking on),
writes the scores into toy_meta.json and replaces jsdr/toy/toy_model/. Commit the result: every
machine then starts from these exact weights. Refuses to replace the shipped model with one whose
teacher cannot read the reference (--min_teacher), since OPSD needs that teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jsdr import toy
from jsdr.model import hf


def calibration(model_dir: Path, n: int) -> dict:
    tok = hf.load_tokenizer(str(model_dir))
    params, cfg, _ = hf.load_params(str(model_dir))
    probs = toy.toy_benchmark(n, split="validation")
    sampler = toy.toy_sampler(cfg, tok)
    out = {"split": "validation", "problems": n, "max_new_tokens": 160}
    for role in ("student", "teacher"):
        out[f"{role}_greedy"] = toy.accuracy(params, cfg, tok, probs, role=role, max_new_tokens=160,
                                             sampler=sampler)["accuracy"]
    return out


def settings_from(overrides: list[str]) -> toy.ToySettings:
    """ToySettings with KEY=VALUE overrides (values as JSON; lists become tuples)."""
    kw = {}
    names = {f.name for f in dataclasses.fields(toy.ToySettings)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        try:
            v = json.loads(value)
        except ValueError:
            v = value
        kw[key] = tuple(v) if isinstance(v, list) else v
    return dataclasses.replace(toy.DEFAULT_SETTINGS, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="score the shipped model and exit")
    ap.add_argument("--n", type=int, default=512, help="validation problems for the calibration")
    ap.add_argument("--min_teacher", type=float, default=0.8, help="lowest teacher accuracy accepted")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a ToySettings field for a trial build (needs --out)")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of the shipped directory")
    args = ap.parse_args(argv)
    if args.check:
        print(json.dumps(calibration(toy.SHIPPED_DIR, args.n), indent=2))
        return 0
    settings = settings_from(args.set)
    target = args.out or toy.SHIPPED_DIR
    if target.resolve() == toy.SHIPPED_DIR.resolve() and settings != toy.DEFAULT_SETTINGS:
        raise SystemExit("the shipped model is built with ToySettings() only; pass --out for other settings")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = toy.build_assets(Path(tmp) / "toy_model", settings, progress=True)
        cal = calibration(out, args.n)
        print(json.dumps(cal, indent=2))
        if cal["teacher_greedy"] < args.min_teacher:
            print(f"teacher accuracy {cal['teacher_greedy']:.3f} < --min_teacher={args.min_teacher}: "
                  f"{target} is left as it is", file=sys.stderr)
            return 1
        meta = json.loads((out / "toy_meta.json").read_text())
        meta["calibration"] = cal
        (out / "toy_meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out, target)
    print(f"wrote {target} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
