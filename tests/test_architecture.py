"""The documented dependency order (docs/architecture.md), enforced on the imports.

Every ``import`` in ``imgpipe/`` and ``serving/`` — at module level or deferred inside a
function, both count — is read from the source (AST, nothing is imported). A room may import
only rooms in lower layers, and no two modules import each other, directly or round a loop
(imports under ``if TYPE_CHECKING:`` never run and are left out of that check).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A room is a top-level module or subpackage of imgpipe, or serving/.
LAYERS: list[set[str]] = [
    {"constants", "errors", "__init__"},
    {"config"},
    {"storage", "runtime", "console", "logs", "prediction_log_format", "checkpoint"},
    {"data"},
    {"bundle_versions"},
    {"bundle", "calibrate"},
    {"metrics", "losses", "models"},
    {"inference"},
    {"evaluate", "robustness", "transfer"},
    {"training"},
    {"report"},
    {"tuning"},
    {"decoupled", "preflight", "cluster", "publish"},
    {"monitoring"},
    {"serving"},
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "serving":
        return "serving"
    if parts[0] != "imgpipe":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imported_rooms(path: Path) -> set[str]:
    rooms: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from imgpipe import storage" imports the room "storage"
            names = ([f"imgpipe.{a.name}" for a in node.names] if node.module == "imgpipe"
                     else [node.module])
        else:
            continue
        rooms.update(r for r in map(_room, names) if r is not None)
    return rooms


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    files = [*(ROOT / "imgpipe").rglob("*.py"), *(ROOT / "serving").rglob("*.py")]
    for path in files:
        rel = path.relative_to(ROOT)
        src = _room(".".join(rel.with_suffix("").parts))
        for dst in _imported_rooms(path) - {src}:
            edges.setdefault((src, dst), []).append(str(rel))
    return edges


def test_every_room_has_a_layer():
    rooms = {a for a, _ in _edges()} | {b for _, b in _edges()}
    assert rooms <= set(LAYER), f"rooms without a layer: {sorted(rooms - set(LAYER))}"


def test_imports_point_down():
    upward = {e: files for e, files in _edges().items() if LAYER[e[1]] >= LAYER[e[0]]}
    assert not upward, "imports that point up or sideways (see docs/architecture.md):\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(sorted(f))}" for (a, b), f in sorted(upward.items()))


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def _module_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in
             [*(ROOT / "imgpipe").rglob("*.py"), *(ROOT / "serving").rglob("*.py")]}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[mod].update(n for n in names if n in paths and n != mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (networkx)."""
    import networkx as nx

    g = nx.DiGraph((a, b) for a, targets in graph.items() for b in targets)
    g.add_nodes_from(graph)
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def test_no_module_import_cycles():
    assert not _cycles(_module_graph()), _cycles(_module_graph())


def test_the_cycle_finder_sees_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_room_reader_sees_deferred_and_package_imports(tmp_path):
    code = ("from imgpipe import storage\n"
            "def f():\n    from imgpipe.tuning.space import SearchSpace\n"
            "import serving.app\n")
    (tmp_path / "m.py").write_text(code)
    assert _imported_rooms(tmp_path / "m.py") == {"storage", "tuning", "serving"}
