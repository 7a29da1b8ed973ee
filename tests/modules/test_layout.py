"""The package's import direction: components never import training support or tools."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "apex_tune"
COMPONENTS = ("modules", "models")
NOT_FOR_COMPONENTS = ("apex_tune.training", "apex_tune.dev", "apex_tune.cli")


def imported_modules(path: Path):
    """Every apex_tune module a file imports, at module level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apex_tune"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("apex_tune"))


def test_components_import_no_training_support_or_tools():
    offending = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for folder in COMPONENTS
        for path in sorted((PACKAGE / folder).glob("*.py"))
        for name in imported_modules(path)
        if name.startswith(NOT_FOR_COMPONENTS)
    ]
    assert not offending, "\n".join(offending)


def test_every_module_lives_in_a_subpackage():
    top_level = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "_torchao_log.py"))
    assert not top_level, f"put these in modules/, models/, training/, dev/ or cli/: {top_level}"


def test_training_support_imports_no_tools():
    offending = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / "training").glob("*.py"))
        for name in imported_modules(path)
        if name.startswith(("apex_tune.dev", "apex_tune.cli"))
    ]
    assert not offending, "\n".join(offending)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """apex_tune module -> the apex_tune modules it imports (``from pkg import submodule``
    counted as importing the submodule), at module level or inside functions."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apex_tune"):
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                edges |= submodules or {node.module}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("apex_tune")}
        graph[name] = edges & modules.keys() - {name}
    return graph


def test_no_import_cycle():
    graph = import_graph()
    assert "apex_tune.modules.nf4" in graph["apex_tune.modules.model"]  # the graph sees real imports
    done, on_path, cycles = set(), [], []

    def visit(name):
        if name in on_path:
            cycles.append(" -> ".join(on_path[on_path.index(name):] + [name]))
            return
        if name in done:
            return
        on_path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "\n".join(cycles)
