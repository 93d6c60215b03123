"""The package's own rules, checked on its source: no import cycles between engine modules, none over 400 lines."""
import ast
from pathlib import Path

from helpers import REPO

ENGINE = REPO / "engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_imports(path: Path, modules: set[str]) -> set[str]:
    """The engine modules a file imports, at the top or inside functions (`from engine.x import y` counts
    engine.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names} & modules
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("engine.")}
    return found & modules


def test_no_import_cycles():
    files = {module_name(p): p for p in ENGINE.rglob("*.py")}
    graph = {name: engine_imports(path, set(files)) - {name} for name, path in files.items()}
    graph["engine"] = set()  # the package's lazy API (__getattr__) imports on first use, not at import
    state, cycles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_engine_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in ENGINE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_subpackage_shadows_the_public_api():
    """`engine.distill` must stay the function: a subpackage of that name would replace it once imported."""
    import engine

    subpackages = {p.parent.name for p in ENGINE.glob("*/__init__.py")}
    assert not subpackages & set(engine.__all__)
