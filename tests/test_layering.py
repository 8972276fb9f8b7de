"""The rules of the layers, read from the source with `ast` (function-level imports
included): no import cycle; the library never imports the command layer; the kernels import
nothing of the library (the library dispatches to them, through casa_cli/head.py)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND_LAYER = ("casa_cli.commands", "casa_cli.cli", "casa_cli.__main__")


def modules() -> dict[str, Path]:
    """Dotted name -> file, as installed (kernels/ installs as casa_cli.kernels)."""
    found = {}
    for folder, package in (("casa_cli", ["casa_cli"]), ("kernels", ["casa_cli", "kernels"])):
        for path in (ROOT / folder).rglob("*.py"):
            parts = package + list(path.relative_to(ROOT / folder).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:  # `from casa_cli import training` imports a module
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    return {t for t in targets if t in known and t != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "casa_cli.kernels.safety_attention_triton" in graph()


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_library_never_imports_the_command_layer():
    bad = {name: sorted(t for t in targets if t.startswith(COMMAND_LAYER))
           for name, targets in graph().items() if not name.startswith(COMMAND_LAYER)}
    assert {name: t for name, t in bad.items() if t} == {}


def test_the_kernels_import_nothing_of_the_library():
    bad = {name: sorted(t for t in targets if not t.startswith("casa_cli.kernels"))
           for name, targets in graph().items() if name.startswith("casa_cli.kernels")}
    assert {name: t for name, t in bad.items() if t} == {}


def test_reserved_evaluation_sets_reach_only_the_detection_report():
    """Do-Not-Answer and the other independent sets (casa_cli.data.independent) are for
    evaluation only: the detection report reads them, and nothing reads the report, so no
    training, validation or layer/threshold selection can see them."""
    edges = graph()
    readers = sorted(name for name, targets in edges.items() if "casa_cli.data.independent" in targets)
    assert readers == ["casa_cli.detection"]
    assert not [name for name, targets in edges.items() if "casa_cli.detection" in targets]
