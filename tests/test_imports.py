"""The ledger at the centre: the modules around delivery records import in one direction.

Read from the source with ast, so a lazy import inside a function counts as much as one at
the top of a module: Python runs either sooner or later, and a circle among them is what
lazy imports were hiding."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["apps", "notify", "config"]
# The composition root: the Celery app every process loads first, which wires the tasks and
# the workers' start-up to everything. Any `config.x` import runs it, so it stays out of the
# graph, as a program's main module would.
COMPOSITION_ROOT = {"config", "config.celery"}

# Record writes the ledger and returns what follows; nothing it imports may import it back.
CORE = [
    "notify.pipeline.record",
    "notify.pipeline.dispatch",
    "notify.pipeline.routing",
    "notify.channels.sms",
    "notify.policy.suppression",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(*, tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name the module imports when it runs (imports for type checkers only,
    which never run, aside), a `from x import y` counted as both x and x.y."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, each with the packages above it
    (importing a.b.c runs a/__init__.py and a/b/__init__.py first)."""
    sources = {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py") if path.is_file()
    }
    sources = {module: path for module, path in sources.items() if module not in COMPOSITION_ROOT}
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for name in _imported_names(tree=tree, module=module, is_package=path.name == "__init__.py"):
            parts = name.split(".")
            edges.update(".".join(parts[:end]) for end in range(1, len(parts) + 1) if ".".join(parts[:end]) in sources)
        # A module's own packages ran before it did: they are no import of its.
        parts = module.split(".")
        edges.difference_update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
        graph[module] = edges
    return graph


def _reachable(*, graph: dict[str, set[str]], start: str) -> dict[str, str | None]:
    """Every module reachable from start, each with the module it was reached from."""
    came_from: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        module = frontier.pop()
        for imported in sorted(graph.get(module, ())):
            if imported not in came_from:
                came_from[imported] = module
                frontier.append(imported)
    return came_from


def _path(*, came_from: dict[str, str | None], end: str) -> list[str]:
    path = [end]
    while (previous := came_from[path[-1]]) is not None:
        path.append(previous)
    return path[::-1]


def cycles_through(*, graph: dict[str, set[str]], module: str) -> list[list[str]]:
    """An import circle back to the module through each module it imports, if any."""
    circles = []
    for imported in sorted(graph.get(module, ())):
        came_from = _reachable(graph=graph, start=imported)
        if module in came_from:
            circles.append([module, *_path(came_from=came_from, end=module)])
    return circles


def test_the_graph_sees_lazy_imports_and_packages():
    graph = import_graph()
    # A function-level import is an edge, and importing a channel runs the channels' package.
    assert "notify.pipeline.record" in graph["notify.pipeline.send"]
    assert "notify.channels" in graph["notify.resilience.providers"]
    circle = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycles_through(graph=circle, module="a") == [["a", "b", "c", "a"]]
    assert cycles_through(graph={"a": {"b"}, "b": set()}, module="a") == []


def test_no_import_circle_through_the_ledger():
    graph = import_graph()
    circles = {module: cycles_through(graph=graph, module=module) for module in CORE}
    found = {module: [" -> ".join(circle) for circle in found] for module, found in circles.items() if found}
    assert not found, found
