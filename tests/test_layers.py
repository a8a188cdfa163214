"""The architecture as a test: every module of homerun/, offload/ and profiles/ belongs to one layer, imports only
go down (or stay inside a layer), and no modules import each other in a cycle. Function-level (lazy) imports count;
imports under `if TYPE_CHECKING:` do not (they never run). The one exemption is the public facade: `homerun.load`
in homerun/__init__.py's `__getattr__`, which reaches up to the engine on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from homerun.layers import LAYERS, layer_of

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("homerun", "offload", "profiles")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _facade_nodes(name: str, tree: ast.AST) -> set[int]:
    if name != "homerun":
        return set()
    return {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)}


def _resolve(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str) -> set[str]:
    """Project modules that `name` imports, eagerly or lazily."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree) | _facade_nodes(name, tree)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                r = _resolve(t)
                if r and r != name:
                    out.add(r)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"modules outside every layer (add them to homerun/layers.py): {missing}"


def test_imports_only_go_down():
    bad = []
    for mod, deps in GRAPH.items():
        for dep in deps:
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) -> {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_finder_finds_a_planted_cycle():
    g = {k: set(v) for k, v in GRAPH.items()}
    g["homerun.errors"] = g["homerun.errors"] | {"homerun.cli.app"}
    assert find_cycles(g), "a planted errors -> cli -> errors cycle went unnoticed"


def test_layer_rule_catches_a_planted_upward_import():
    g = {k: set(v) for k, v in GRAPH.items()}
    g["homerun.models.deepseek_v4"].add("homerun.engine.runtime")
    bad = [(m, d) for m, ds in g.items() for d in ds if layer_of(d) > layer_of(m)]
    assert ("homerun.models.deepseek_v4", "homerun.engine.runtime") in bad


LAYER_PACKAGES = sorted(p for _, prefixes in LAYERS for p in prefixes if p in MODULES and MODULES[p].name == "__init__.py"
                        and p != "homerun")


@pytest.mark.parametrize("pkg", LAYER_PACKAGES)
def test_each_layer_package_says_what_it_owns_and_may_import(pkg):
    doc = ast.get_docstring(ast.parse(MODULES[pkg].read_text())) or ""
    assert "May import" in doc, f"{pkg}: the package docstring should say what it owns and what it may import"


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert not big, f"modules over 600 lines (split by responsibility): {big}"


def test_the_cli_starts_without_torch():
    """`homerun --help`, `plan` and `profiles` stay fast: registering the commands imports no torch (it costs ~3 s)."""
    import subprocess
    import sys

    code = "import sys, homerun.cli.app; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, "importing the CLI imports torch"
