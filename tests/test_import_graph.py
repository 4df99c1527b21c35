"""cogvid_core's modules import each other without a cycle, imports inside functions included."""
import ast
from pathlib import Path

import cogvid_core

PKG = Path(cogvid_core.__file__).parent


def _imports(path: Path) -> set[str]:
    """The cogvid_core modules a file imports, anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:                 # from .x import y
                out.add(node.module.split(".")[0])
            elif node.level == 1:                               # from . import x, y
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("cogvid_core."):
                out.add(node.module.split(".")[1])
            elif node.module == "cogvid_core":
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cogvid_core."))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PKG.glob("*.py")}
    return {p.stem: _imports(p) & modules - {p.stem} for p in PKG.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_finder_sees_function_level_imports_and_cycles():
    tree = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(tree) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "estimate" in import_graph()["guard"]      # guard imports it inside stage_need


def test_no_import_cycle():
    graph = import_graph()
    assert {"estimate", "planner", "placement", "profiles"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
