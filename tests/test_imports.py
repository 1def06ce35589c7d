"""The package's modules import one way: no cycles, counting every import (inside functions and
under TYPE_CHECKING too, since those hide a cycle rather than remove it)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lrc_dist"


def import_graph() -> dict[str, set[str]]:
    """module -> the lrc_dist modules it imports."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for module in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "lrc_dist":
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lrc_dist."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lrc_dist.")}
        graph[module] = found - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert {"model", "families"} <= graph["lrc"] and "losses" in graph["dskd"]


def test_no_module_imports_in_a_circle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_loss_layers_go_one_way():
    """divergences <- losses (head kernel) <- dskd <- lrc, kd: each method owns its objective."""
    graph = import_graph()
    assert not graph["divergences"]
    assert graph["losses"] <= {"divergences"}
    assert graph["dskd"] <= {"divergences", "losses"}
    assert "losses" in graph["lrc"] and "losses" in graph["kd"]
