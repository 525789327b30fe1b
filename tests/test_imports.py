"""The package has no import circles: every module's imports, lazy ones inside functions and those under
TYPE_CHECKING included, form a graph without cycles. Checked on the source's syntax tree, so an import
that only runs on some path counts too."""

import ast
from pathlib import Path

import expunge

PACKAGE = Path(expunge.__file__).parent


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports. ``from X import Y`` counts as importing X (even when X is
    a package whose submodule Y is meant: the strict reading), and X.Y when Y is a module."""
    mods = modules()
    graph = {name: set() for name in mods}
    for name, (path, is_package) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import circles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "expunge.unlearn.registry" in graph["expunge.unlearn.run"]
    assert "expunge.unlearn.fitted" in graph["expunge.unlearn.catalog"]


def test_no_import_circles_in_the_package():
    assert cycles(import_graph()) == []


def test_method_modules_import_only_lower_layers():
    """A method module may import base, registry, run, fitted (the gradient-run layer) and modules outside
    unlearn/, never another method module or the catalog."""
    graph = import_graph()
    lower = {"expunge.unlearn." + m for m in ("base", "registry", "run", "fitted")}
    methods = {"expunge.unlearn." + m for m in ("deltagrad", "retrain", "certified", "fisher", "baselines",
                                                "private", "sisa", "lm_run")}
    for module in methods:
        inside = {t for t in graph[module] if t.startswith("expunge.unlearn")}
        assert inside <= lower, (module, inside - lower)
