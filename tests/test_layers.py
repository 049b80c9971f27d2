"""The package's structure, checked so it cannot rot: imports between dd_dist modules point down the
layers written in dd_dist/__init__.py, form no cycle, and sit at the top of their module; an import
inside a function is only a late import of a heavy optional dependency, with a comment saying why."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dd_dist"
# Bottom to top: a module may import its own layer (without a cycle) and the layers below it.
LAYERS = [
    ("", "errors", "files", "schemes"),
    ("config",),
    ("layout",),
    ("data",),
    ("core",),
    ("infra",),
    ("labels", "train"),
    ("stages",),
    ("pipeline",),
    ("cli", "__main__"),
]
LATE = ("ray", "deepspeed", "mlflow", "datasets", "PIL")  # heavy or optional: may be imported where used


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix("__init__").rstrip("."): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    head = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if head in names)


def target(name: str, known: dict) -> str | None:
    """The dd_dist module that `dd_dist.a.b.c` names: the longest known prefix."""
    parts = name.split(".")[1:]
    while parts and ".".join(parts) not in known:
        parts = parts[:-1]
    return ".".join(parts) if name == "dd_dist" or parts else ("" if name.split(".")[0] == "dd_dist" else None)


def imports(path: Path):
    """(line, imported dotted names, inside a function) of every import statement of a module."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names], id(node) in local
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path.name}:{node.lineno}: use absolute imports"
            yield node.lineno, [f"{node.module}.{a.name}" for a in node.names], id(node) in local


def edges() -> dict[str, set[str]]:
    known, out = modules(), {}
    for module, path in known.items():
        for _, names, _ in imports(path):
            for name in names:
                found = target(name, known) if name.split(".")[0] == "dd_dist" else None
                if found is not None and found != module:
                    out.setdefault(module, set()).add(found)
    return out


def test_the_cli_runs_modules_that_exist():
    """cli.py imports a subcommand's module by name once the config is valid (cli.stage): those names too."""
    named = re.findall(r"""stage\(["']([\w.]+)["']\)""", (PACKAGE / "cli.py").read_text())
    assert len(named) == 7 and set(named) <= set(modules()), named


def test_every_module_has_a_layer():
    for module in modules():
        assert layer(module) is not None, module


def test_imports_point_down():
    upward = [f"{m} imports {t}" for m, ts in edges().items() for t in ts if layer(t) > layer(m)]
    assert not upward, "imports that point up a layer: " + "; ".join(sorted(upward))


def test_no_import_cycle():
    graph, state, cycles = edges(), {}, []

    def visit(module, trail):
        state[module] = "open"
        for t in sorted(graph.get(module, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(trail[trail.index(t):] + [t]))
            elif t not in state:
                visit(t, trail + [t])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_inside_functions_are_late_heavy_ones_with_a_reason(module):
    path = modules()[module]
    lines = path.read_text().splitlines()
    for lineno, names, inside in imports(path):
        if not inside:
            continue
        where = f"{path.relative_to(PACKAGE.parent)}:{lineno}"
        assert all(n.split(".")[0] in LATE for n in names), f"{where}: {names} imported inside a function"
        first = lineno - 1  # a group of late imports, one under the other, shares the comment of its first
        while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
            first -= 1
        assert any("#" in line for line in lines[first:lineno]), f"{where}: a late import needs a comment saying why"
