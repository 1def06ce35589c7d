"""Imports go one way: no modules import in a circle, the loss layers build on each other in one
direction, and training code does not import data-prep code, directly or through another module,
counting every import of lrc_dist/*.py (function-level and TYPE_CHECKING ones too, since those hide
a cycle rather than remove it)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lrc_dist"
TRAINING = ("align", "build", "checkpoint", "data", "divergences", "dskd", "evaluate", "export", "families", "kd",
            "losses", "lrc", "metrics", "model", "parallel", "preflight", "projection_init", "train")
DATA_PREP = ("documents", "pretokenize", "prep", "sources")


def lrc_dist_imports(file: Path) -> set[str]:
    """The lrc_dist modules `file` imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("lrc_dist.")}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_imports_are_found_wherever_they_are(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("from typing import TYPE_CHECKING\nimport lrc_dist.model\nfrom lrc_dist import losses, nothing\n"
                    "if TYPE_CHECKING:\n    from lrc_dist.data import TokenSet\n"
                    "def f():\n    from lrc_dist.pretokenize import tokenize_corpus\n")
    assert lrc_dist_imports(file) == {"model", "losses", "data", "pretokenize"}


def test_training_code_does_not_import_data_prep_code():
    graph = {p.stem: lrc_dist_imports(p) for p in PACKAGE.glob("*.py")}
    assert set(TRAINING) | set(DATA_PREP) <= graph.keys(), "a module named here was renamed: update this test"
    for module in TRAINING:
        path, seen, todo = {module: [module]}, set(), [module]
        while todo:  # breadth first: `path` holds the shortest import chain to each module
            current = todo.pop(0)
            for imported in sorted(graph[current] - seen):
                seen.add(imported)
                path[imported] = path[current] + [imported]
                todo.append(imported)
        bad = sorted(seen & set(DATA_PREP))
        assert not bad, f"training module {module} imports data prep: {' -> '.join(path[bad[0]])}"


def import_graph() -> dict[str, set[str]]:
    return {p.stem: lrc_dist_imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}


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


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_in_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_loss_layers_go_one_way():
    """divergences <- losses (head kernel) <- dskd <- lrc, kd: each method owns its objective."""
    graph = import_graph()
    assert not graph["divergences"]
    assert graph["losses"] <= {"divergences"}
    assert graph["dskd"] <= {"divergences", "losses"}
    assert "losses" in graph["lrc"] and "losses" in graph["kd"]
