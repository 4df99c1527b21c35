"""cogvid_core's layering: sub-packages import only the floors below them, and no module imports
another in a circle (imports inside functions included). The floors, bottom up, are LAYERS; each
sub-package's ``__init__`` docstring says the same in words."""
import ast
from pathlib import Path

import cogvid_core

PKG = Path(cogvid_core.__file__).parent
LAYERS = ("device", "model", "memory", "speed", "plan", "run")     # each may import those before it
TOP = ("api", "cli", "__main__", "__init__")      # the public surface and the entry points, above every layer


def module_name(path: Path) -> str:
    """'run.guard' for cogvid_core/run/guard.py, 'cli' for cogvid_core/cli.py, 'run' for run/__init__.py."""
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The cogvid_core modules (dotted, without 'cogvid_core.') a file imports, anywhere in it."""
    here = module_name(path).split(".")
    package = here[:-1] if path.name != "__init__.py" else here
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:                                   # relative: resolve against this package
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "cogvid_core" or node.module.startswith("cogvid_core.")):
                mod = node.module.split(".")[1:]
            else:
                continue
            out.add(".".join(mod))
            out.update(".".join(mod + [a.name]) for a in node.names)   # `from pkg import module`
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("cogvid_core."))
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(p) if m in files and m != name} for name, p in files.items()}


def layer_of(module: str) -> int | None:
    head = module.split(".")[0]
    return LAYERS.index(head) if head in LAYERS else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        mine = layer_of(mod)
        if mine is None:                                     # top-level entry points may import anything
            continue
        bad += [f"{mod} -> {d}" for d in deps if layer_of(d) is None or layer_of(d) > mine]
    return sorted(bad)


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
    assert "plan.estimate" in import_graph()["run.guard"]      # guard imports it inside stage_need


def test_layering_checker_catches_an_upward_import():
    assert layering_violations({"model.vae": {"device.devmem"}, "cli": {"run.pipeline"}}) == []
    assert layering_violations({"model.vae": {"memory.profiles"}}) == ["model.vae -> memory.profiles"]
    assert layering_violations({"device.devmem": {"cli"}}) == ["device.devmem -> cli"]


def test_every_module_lives_in_a_layer():
    graph = import_graph()
    assert {"plan.estimate", "plan.planner", "memory.placement", "memory.profiles"} <= set(graph)
    stray = [m for m in graph if layer_of(m) is None and m not in TOP]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_run_down_the_layers():
    assert layering_violations(import_graph()) == []


def test_no_import_cycle():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def adapter_imports(path: Path) -> set[str]:
    """The cogvid_core modules a ComfyUI adapter or the command line imports (dotted, with 'cogvid_core.')."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cogvid_core"):
            out.add(node.module if node.module != "cogvid_core" else
                    ",".join(sorted(f"cogvid_core.{a.name}" for a in node.names)))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cogvid_core"))
    return out


def test_adapters_use_the_public_surface():
    """nodes/ and cli.py reach the engine through cogvid_core.api alone: the rest may move."""
    files = [*sorted((PKG.parent / "nodes").glob("*.py")), PKG / "cli.py", PKG / "__main__.py"]
    allowed = {"cogvid_core.api", "cogvid_core.cli"}
    bad = {f"{p.relative_to(PKG.parent)}: {m}" for p in files for m in adapter_imports(p) if m not in allowed}
    assert not bad, sorted(bad)
    assert adapter_imports(PKG.parent / "nodes" / "sampler.py") == {"cogvid_core.api"}


def test_the_surface_exports_what_it_lists():
    from cogvid_core import api
    missing = [n for n in api.__all__ if not hasattr(api, n)]
    assert not missing and len(api.__all__) == len(set(api.__all__))
