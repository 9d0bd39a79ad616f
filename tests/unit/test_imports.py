"""The import graph of the packages, read from their source.

Layers import one way (protocol <- store <- server; protocol <- client) and no
module imports one that imports it back: a cycle is where a boundary starts to
blur (a connection that knows its session's rooms, keys that know the drain), and
it usually hides behind an `if TYPE_CHECKING:` or a function-level import, so both
count here.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "store", "server", "client")


def import_graph() -> dict[str, set[str]]:
    """Each module of PACKAGES, with the modules of PACKAGES it imports anywhere in its body."""
    files = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        named: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                named += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                named += [a.name for a in node.names]
        graph[module] = {n for n in named if n in files and n != module}
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_layers_import_downward_only() -> None:
    below = {
        "protocol": {"protocol"},
        "store": {"protocol", "store"},
        "client": {"protocol", "client"},
    }
    upward = [
        (module, dep)
        for module, deps in import_graph().items()
        for dep in deps
        if module.split(".")[0] in below and dep.split(".")[0] not in below[module.split(".")[0]]
    ]
    assert upward == []
