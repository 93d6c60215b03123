"""The package's own rules, checked on its source: each folder imports only the folders before it in LAYERS, no
import cycles between engine modules, none over 400 lines."""
import ast
from pathlib import Path

from helpers import REPO

ENGINE = REPO / "engine"
# Bottom to top. A module may import its own layer and those before it; `engine/__init__.py` (the public API,
# imported lazily) sits above all of them. README's "Layout" table describes each.
LAYERS = ["core", "data", "config", "models", "distillation", "training", "pruning", "report", "schedule", "cli"]


def module_name(path: Path, root: Path = ENGINE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
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


def layer(module: str) -> str:
    return module.split(".")[1]


def upward_imports(root: Path = ENGINE) -> list[str]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return [f"{name} imports {target}" for name, path in sorted(files.items()) if name != "engine"
            for target in sorted(engine_imports(path, set(files)))
            if target != "engine" and LAYERS.index(layer(target)) > LAYERS.index(layer(name))]


def test_every_engine_folder_has_a_layer():
    tops = {p.stem for p in ENGINE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()} - {"__init__"}
    assert tops == set(LAYERS), tops ^ set(LAYERS)


def test_each_folder_imports_only_the_folders_before_it(tmp_path):
    assert not upward_imports(), upward_imports()
    # the check itself: a copy of the package with one import pointing up is caught
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(ENGINE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "core" / "errors.py").open("a") as f:
        f.write("\nfrom engine.schedule import pipelines  # noqa\n")
    assert upward_imports(copy) == [f"engine.core.errors imports engine.schedule{m}" for m in ("", ".pipelines")]


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
