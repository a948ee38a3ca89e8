"""What a user gets from `pip install -e .`: every third-party module the library imports is a declared
runtime dependency (not only a test one), the toy's warm start ships inside the package, and the install
provides exactly the import names `jsdr` and `jsdr_kernels` (the kernels/ folder), never a top-level
`kernels`, which is the Hugging Face hub package that `transformers` probes for."""

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OWN = {"jsdr", "jsdr_kernels"}  # the import names this distribution provides


def _deps(extra: str | None = None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imports(*folders: str, optional: bool = False) -> set[str]:
    """Third-party top-level modules imported by the sources: the required ones, or (optional=True)
    those imported only inside a `try:` that handles ImportError (an optional feature)."""
    required, guarded = set(), set()
    for folder in folders:
        for f in (REPO / folder).rglob("*.py"):
            tree = ast.parse(f.read_text())
            inside_try = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(
                        h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers):
                    inside_try |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
            for node in ast.walk(tree):
                names = set()
                if isinstance(node, ast.Import):
                    names = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = {node.module.split(".")[0]}
                (guarded if id(node) in inside_try else required).update(names)
    mods = guarded - required if optional else required
    return mods - set(sys.stdlib_module_names) - OWN - {"__future__"}


def test_every_runtime_import_is_a_declared_dependency():
    declared = _deps()
    dists = md.packages_distributions()
    missing = {}
    for mod in sorted(_imports("jsdr", "kernels")):
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not names & declared:
            missing[mod] = sorted(names)
    assert not missing, f"imported by jsdr but not in [project] dependencies: {missing}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = set().union(*(_deps(e) for e in project["optional-dependencies"]))
    optional = {m for m in _imports("jsdr", "kernels", optional=True)
                if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & (declared | extras)}
    assert not optional, f"optional imports (guarded by ImportError) in no extra: {optional}"
    # needed at run time by what jsdr calls, though jsdr does not import it itself
    assert "jinja2" in declared  # transformers' apply_chat_template; transformers 5 no longer pulls it
    assert "torch" not in declared  # a test-time reference only


def test_the_toy_warm_start_ships_in_the_package():
    from jsdr import toy
    assert toy.shipped_assets() == toy.SHIPPED_DIR, "jsdr/toy/toy_model is missing or built with other settings"
    assert toy.ensure_toy_assets(progress=False) == toy.SHIPPED_DIR  # no build, no cache
    meta = json.loads((toy.SHIPPED_DIR / "toy_meta.json").read_text())
    assert meta["weights_sha256"] == toy.weights_sha256(toy.SHIPPED_DIR)  # not mangled (LFS, line endings)
    cal = meta["calibration"]
    assert cal["teacher_greedy"] >= 0.8 and cal["teacher_greedy"] - cal["student_greedy"] >= 0.3  # the gap to close
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "toy_model/*" in project["tool"]["setuptools"]["package-data"]["jsdr.toy"]


# ---------------------------------------------------------------------------------------------
# import names: jsdr and jsdr_kernels, never `kernels`


def test_the_install_provides_jsdr_and_jsdr_kernels_and_no_kernels():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "kernels" in find["where"], "the kernel package's source root kernels/ is not a packages.find root"
    for pattern in find["include"]:
        assert pattern.split(".")[0] in OWN, f"packages.find includes {pattern!r}: only {sorted(OWN)} are ours"
    assert (REPO / "kernels" / "jsdr_kernels" / "__init__.py").is_file()
    # a regular package kernels/ would shadow the hub `kernels` wherever the repository root is on sys.path
    # (tests, `python -m ...` from a checkout); a bare folder is at most a namespace portion, which loses to it
    assert not (REPO / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the folder a `kernels` package"
    # the installed metadata (stale after a layout change: rerun `pip install -e .`)
    top = md.distribution("jsdr").read_text("top_level.txt")
    if top is not None:
        assert set(top.split()) == OWN, f"the installed jsdr provides {top.split()}: reinstall (pip install -e .)"
    assert "jsdr" not in md.packages_distributions().get("kernels", []), \
        "some jsdr metadata on sys.path claims the import name `kernels` (a stale jsdr.egg-info? reinstall)"
    import jsdr_kernels.flash_attention
    where = Path(jsdr_kernels.__file__).resolve().parent
    assert where == REPO / "kernels" / "jsdr_kernels" or not where.is_relative_to(REPO), where  # editable | wheel


_PROBE = textwrap.dedent("""
    import importlib.metadata as md, importlib.util, json, sys
    out = {}
    spec = importlib.util.find_spec("kernels")
    out["origin"] = None if spec is None else spec.origin
    out["locations"] = [] if spec is None else list(spec.submodule_search_locations or [])
    try:
        out["real_version"] = md.version("kernels")  # a real distribution named kernels, if any
    except md.PackageNotFoundError:
        out["real_version"] = None
    out["owners"] = md.packages_distributions().get("kernels", [])
    import jsdr.model.attention, jsdr_kernels.flash_attention  # our package in use alongside transformers
    import transformers
    from transformers.utils import import_utils
    probe = getattr(import_utils, "_is_package_available", None)  # private: compared only where it exists
    out["probe"] = None if probe is None else list(probe("kernels", return_version=True))
    out["available"] = import_utils.is_kernels_available()
    if len(sys.argv) > 1:  # load and run the tiny model
        import torch
        model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        with torch.no_grad():
            out["logits"] = model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits.float().tolist()
    print("PROBE" + json.dumps(out))
""")


def _probe(cwd: Path, *args: str, extra_path: Path | None = None) -> dict:
    """Run _PROBE with `python -c` (so `cwd` is sys.path[0], as in `python -m` runs from a checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("XLA_FLAGS", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"probe from {cwd} failed:\n{res.stderr[-3000:]}"
    line = [x for x in res.stdout.splitlines() if x.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE"):])


def _not_ours(out: dict, where: str):
    ours = REPO / "kernels"
    assert out["origin"] is None or not Path(out["origin"]).resolve().is_relative_to(ours), \
        f"from {where}: find_spec('kernels') resolves to our folder: {out['origin']}"
    if out["origin"] is not None:  # a regular package or module: the namespace portion is not consulted
        return
    # a namespace spec (origin None): only possible where the repository root is on sys.path; it can
    # never win against a real package, and transformers treats it as absent (checked by the probes)
    for loc in out["locations"]:
        assert Path(loc).resolve() != ours or where == "the repository root", \
            f"from {where}: find_spec('kernels') lists our folder {loc}"


def test_transformers_and_a_model_are_unaffected_by_our_package(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "tiny")
    with torch.no_grad():
        ref = model(input_ids=torch.arange(12).reshape(2, 6) % 64).logits.float().numpy()
    neutral = tmp_path / "cwd"
    neutral.mkdir()

    import numpy as np
    runs = {"a neutral directory": _probe(neutral, str(tmp_path / "tiny")),
            "the repository root": _probe(REPO, str(tmp_path / "tiny"))}
    for where, out in runs.items():
        _not_ours(out, where)
        assert "jsdr" not in out["owners"], f"from {where}: jsdr metadata claims the import name `kernels`"
        # transformers' probe answers what the installed distributions say, wherever it runs from
        expected = [out["real_version"] is not None, out["real_version"] or "N/A"]
        assert out["probe"] in (None, expected), \
            f"from {where}: transformers' kernels probe {out['probe']} != {expected}"
        np.testing.assert_allclose(np.asarray(out["logits"]), ref, rtol=1e-5, atol=1e-5,
                                   err_msg=f"the tiny model's logits differ when run from {where}")
    neutral_run, root_run = runs.values()
    assert neutral_run["probe"] == root_run["probe"] and neutral_run["available"] == root_run["available"]


def test_a_real_kernels_package_is_not_shadowed(tmp_path):
    """A stand-in for the hub `kernels` (a regular package with its dist-info; a version transformers
    will not use, so it does not import it): found, and reported by transformers, from anywhere,
    although the repository root, first on sys.path, holds a folder named kernels/."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    info = site / "kernels-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n")
    (info / "top_level.txt").write_text("kernels\n")
    neutral = tmp_path / "cwd"
    neutral.mkdir()
    for where, cwd in (("a neutral directory", neutral), ("the repository root", REPO)):
        out = _probe(cwd, extra_path=site)
        assert out["origin"] == str(site / "kernels" / "__init__.py"), \
            f"from {where}: find_spec('kernels') -> {out['origin']}, not the installed package"
        assert out["probe"] in (None, [True, "0.0.1"]), f"from {where}: transformers' probe says {out['probe']}"


def test_the_wheel_holds_what_an_installed_run_needs(tmp_path):
    """A non-editable install runs the default command: the wheel carries the toy's configs and warm
    start, every jsdr package and jsdr_kernels, and nothing named `kernels`. Built from a copy of the
    sources so the checkout gets no build/ or egg-info."""
    import shutil
    import zipfile
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "runs"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True)
    if out.returncode and "No module named setuptools" in out.stderr + out.stdout:
        pytest.skip("setuptools is not installed in this environment")
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "whl").glob("*.whl"))).namelist())
    for method in ("sft", "grpo", "opsd"):
        assert f"jsdr/toy/configs/{method}.yaml" in names and f"jsdr/methods/{method}.py" in names
    for f in ("jsdr/toy/toy_model/model.safetensors", "jsdr/toy/toy_model/tokenizer.json", "jsdr/run.py",
              "jsdr/data/batches.py", "jsdr/model/params.py", "jsdr_kernels/flash_attention.py"):
        assert f in names, f
    assert not any(n.startswith("kernels/") or n == "kernels.py" for n in names)
