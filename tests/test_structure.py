"""The shape of the source tree, read with `ast` (nothing is imported):

(a) no import cycles among the modules of the installed packages (module-level imports; `from __future__`
    and `if TYPE_CHECKING:` blocks excluded);
(b) jsdr/data/ imports nothing from jsdr.model;
(c) the kernel package (kernels/jsdr_kernels) imports nothing from jsdr;
(d) no function-local `import jsdr...` / `from jsdr... import` unless a `# cycle:` comment (on the import or
    a comment line right above it) explains the cycle it breaks, and the cycle is real: the imported
    module imports the importing one back at module level;
(e) jsdr/train.py holds no method-specific code: no "sft"/"grpo"/"opsd" in string literals (docstrings and
    help texts excepted) or names, no import of a method's module (jsdr.losses.* / jsdr.methods.* for sft,
    grpo, opsd).

An import names its deepest internal module: `import jsdr.a.b` and `from jsdr.a import b` (b a module) are
edges to jsdr.a.b, `from jsdr.a import name` to jsdr.a; the parent packages that Python initialises on the
way are not counted (a package __init__ re-exporting its submodules is not a cycle).
Every failure lists file:line so that it can be acted on.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import re
import tokenize
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("sft", "grpo", "opsd")


@dataclass(frozen=True)
class Imp:
    """One import statement's reference to an internal module."""

    src: str          # importing module
    dst: str          # imported internal module (the deepest one that exists)
    line: int
    local: bool       # inside a function (or lambda) body
    type_only: bool   # inside `if TYPE_CHECKING:`


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module the install ships (pyproject's packages.find)."""
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    out = {}
    for root in find.get("where", ["."]):
        base = REPO / root
        for f in sorted(base.rglob("*.py")):
            parts = f.relative_to(base).with_suffix("").parts
            pkg = ".".join(parts[:-1])
            if not pkg or not any(fnmatch.fnmatchcase(pkg, p) for p in find["include"]):
                continue
            out[pkg if parts[-1] == "__init__" else ".".join(parts)] = f
    return out


def _rel(f: Path) -> str:
    return str(f.relative_to(REPO))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    """The absolute module name of a (possibly relative) `from X import ...` in module `mod`."""
    if node.level == 0:
        return node.module or ""
    is_pkg = modules()[mod].name == "__init__.py"
    base = mod.split(".")
    base = base if is_pkg else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _deepest(name: str) -> str | None:
    """The deepest internal module that `name` (or a prefix of it) names."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules():
            return ".".join(parts[:n])
    return None


@cache
def imports_of(mod: str) -> tuple[tuple[str, int, bool, bool, ast.stmt], ...]:
    """(absolute target name, line, local, type_only, node) for every import statement in `mod`;
    `from X import a` yields X.a (when it is a module) else X; `from __future__` is skipped."""
    tree = ast.parse(modules()[mod].read_text())
    out = []

    def visit(node: ast.AST, local: bool, type_only: bool):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, local, type_only, node) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = _resolve(mod, node)
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                out.append((sub if sub in modules() else base, node.lineno, local, type_only, node))
        inner_local = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, inner_local, True)
            for child in node.orelse:
                visit(child, inner_local, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, inner_local, type_only)

    visit(tree, False, False)
    return tuple(out)


def internal_imports(mod: str) -> list[Imp]:
    out = []
    for name, line, local, type_only, _ in imports_of(mod):
        dst = _deepest(name)
        if dst is not None and dst != mod:
            out.append(Imp(mod, dst, line, local, type_only))
    return out


def module_graph() -> dict[str, dict[str, int]]:
    """mod -> {imported mod: first line}, module-level imports outside TYPE_CHECKING only."""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules()}
    for m in modules():
        for imp in internal_imports(m):
            if not imp.local and not imp.type_only:
                graph[m].setdefault(imp.dst, imp.line)
    return graph


def _reaches(graph, start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal in `graph` (list of modules), or None."""
    seen, stack = {start}, [(start, [start])]
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == goal:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def _describe(graph, path: list[str]) -> str:
    return " -> ".join(f"{a} ({_rel(modules()[a])}:{graph[a][b]})" for a, b in zip(path, path[1:])) + \
        f" -> {path[-1]}"


def _sccs(graph) -> list[list[str]]:
    """Strongly connected components (Tarjan), iteratively."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                out.append(sorted(comp))
    return out


# ---------------------------------------------------------------------------------------------


def test_the_module_list_covers_both_packages():
    mods = modules()
    assert "jsdr" in mods and "jsdr.model.attention" in mods and "jsdr_kernels.flash_attention" in mods, \
        sorted(mods)


def test_a_no_import_cycles():
    graph = module_graph()
    cycles = []
    for comp in _sccs(graph):
        if len(comp) > 1:
            path = _reaches(graph, comp[0], comp[0])
            cycles.append(f"{' <-> '.join(comp)}\n      e.g. {_describe(graph, path)}")
    assert not cycles, "module-level import cycles:\n  " + "\n  ".join(cycles)


def _violations(prefix: str, forbidden) -> list[str]:
    """file:line of every import (anywhere, TYPE_CHECKING included) in modules under `prefix` whose
    target's top-level name or dotted name matches `forbidden(name)`."""
    out = []
    for m, f in modules().items():
        if m != prefix and not m.startswith(prefix + "."):
            continue
        for name, line, *_ in imports_of(m):
            if forbidden(name):
                out.append(f"{_rel(f)}:{line}: imports {name}")
    return out


def test_b_data_imports_nothing_from_model():
    bad = _violations("jsdr.data", lambda n: n == "jsdr.model" or n.startswith("jsdr.model."))
    assert not bad, "jsdr/data/ must not depend on jsdr.model:\n  " + "\n  ".join(bad)


def test_c_kernels_import_nothing_from_jsdr():
    bad = _violations("jsdr_kernels", lambda n: n.split(".")[0] == "jsdr")
    assert not bad, "the kernels (kernels/jsdr_kernels) must be leaves, importing nothing from jsdr:\n  " + \
        "\n  ".join(bad)


def _comments(path: Path) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def test_d_no_function_local_jsdr_imports_without_a_real_cycle():
    graph = module_graph()
    bad = []
    for m, f in modules().items():
        comments = None
        seen = set()
        for name, line, local, _, node in imports_of(m):
            if not local or name.split(".")[0] != "jsdr" or (line, name) in seen:
                continue
            seen.add((line, name))
            if comments is None:
                comments, lines = _comments(f), f.read_text().splitlines()
            span = list(range(node.lineno, (node.end_lineno or node.lineno) + 1))
            if lines[node.lineno - 2].lstrip().startswith("#"):  # a comment line right above it
                span.insert(0, node.lineno - 1)
            note = next((comments[i] for i in span if "# cycle:" in comments.get(i, "")), None)
            where = f"{_rel(f)}:{line}: function-local import of {name}"
            if note is None:
                bad.append(f"{where} (move it to the top of the module, or say `# cycle: ...` why not)")
                continue
            dst = _deepest(name)
            if dst is None or dst == m or _reaches(graph, dst, m) is None:
                bad.append(f"{where} says {note.strip()!r}, but {dst} does not import {m} back")
    assert not bad, f"{len(bad)} function-local jsdr imports:\n  " + "\n  ".join(bad)


def _prose_nodes(tree: ast.AST) -> set[int]:
    """ids of the string constants that document rather than decide: docstrings and help texts (the
    arguments after the default of `field(default, help)`, and any `help=` keyword)."""
    ids = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        texts = list(node.args[1:]) if fn == "field" else []
        texts += [k.value for k in node.keywords if k.arg == "help"]
        for t in texts:
            ids |= {id(c) for c in ast.walk(t) if isinstance(c, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


_METHOD_WORD = re.compile(r"(?<![a-z0-9])(" + "|".join(METHODS) + r")(?![a-z0-9])", re.IGNORECASE)


def test_e_the_trainer_holds_no_method_specific_code():
    f = REPO / "jsdr" / "train.py"
    tree = ast.parse(f.read_text())
    docs = _prose_nodes(tree)
    bad = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if _METHOD_WORD.search(node.value):
                bad.append(f"{_rel(f)}:{line}: string {node.value!r}")
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.keyword) and node.arg:
            names = [node.arg]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            base = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
            names = [f"{base}.{a.name}".strip(".") for a in node.names] + \
                [a.asname for a in node.names if a.asname]
        for n in names:
            words = re.sub(r"([A-Z]+)([A-Z][a-z])|([a-z0-9])([A-Z])", r"\1\3 \2\4", n)  # GRPOConfig, optOPSD
            if _METHOD_WORD.search(words.replace("_", " ").replace(".", " ")):
                bad.append(f"{_rel(f)}:{line}: name {n}")
    bad = list(dict.fromkeys(bad))
    assert not bad, f"jsdr/train.py holds {len(bad)} method-specific references (they belong in " \
        "jsdr/methods/, reached through the registry):\n  " + "\n  ".join(bad)
