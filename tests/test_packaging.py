"""What a user gets from `pip install -e .`: every third-party module the library imports is a declared
runtime dependency (not only a test one), and the toy's warm start ships inside the package."""

import ast
import importlib.metadata as md
import json
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _deps(extra: str | None = None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imports(*folders: str) -> set[str]:
    mods = set()
    for folder in folders:
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"jsdr", "kernels", "__future__"}


def test_every_runtime_import_is_a_declared_dependency():
    declared = _deps()
    dists = md.packages_distributions()
    missing = {}
    for mod in sorted(_imports("jsdr", "kernels")):
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not names & declared:
            missing[mod] = sorted(names)
    assert not missing, f"imported by jsdr but not in [project] dependencies: {missing}"
    # needed at run time by what jsdr calls, though jsdr does not import it itself
    assert "jinja2" in declared  # transformers' apply_chat_template; transformers 5 no longer pulls it
    assert "torch" not in declared  # a test-time reference only


def test_the_toy_warm_start_ships_in_the_package():
    from jsdr.data import toy
    assert toy.shipped_assets() == toy.SHIPPED_DIR, "jsdr/data/toy_model is missing or built with other settings"
    assert toy.ensure_toy_assets(progress=False) == toy.SHIPPED_DIR  # no build, no cache
    meta = json.loads((toy.SHIPPED_DIR / "toy_meta.json").read_text())
    assert meta["weights_sha256"] == toy.weights_sha256(toy.SHIPPED_DIR)  # not mangled (LFS, line endings)
    cal = meta["calibration"]
    assert cal["teacher_greedy"] >= 0.8 and cal["teacher_greedy"] - cal["student_greedy"] >= 0.3  # the gap to close
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "toy_model/*" in project["tool"]["setuptools"]["package-data"]["jsdr.data"]
