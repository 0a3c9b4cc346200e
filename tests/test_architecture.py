"""The documented dependency order (docs/architecture.md), enforced on the imports.

Every ``import`` in ``imgpipe/`` and ``serving/`` — at module level or deferred inside a
function, both count — is read from the source (AST, nothing is imported). A room may import
only rooms in lower layers; the few known back-arrows are listed by name, each with the issue
that removes it, and a listed arrow that no longer exists fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A room is a top-level module or subpackage of imgpipe, or serving/.
LAYERS: list[set[str]] = [
    {"constants", "errors", "__init__"},
    {"storage", "runtime", "console", "logs", "prediction_log_format", "checkpoint", "config"},
    {"data"},
    {"metrics", "losses", "models"},
    {"bundle_versions"},
    {"bundle", "calibrate"},
    {"inference"},
    {"evaluate", "robustness", "transfer"},
    {"training"},
    {"report"},
    {"tuning"},
    {"decoupled", "preflight", "cluster"},
    {"monitoring"},
    {"serving"},
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}

# Known back-arrows (importer, imported), to be removed by the house redesign (issue 16).
KNOWN_BACK_ARROWS = {
    ("config", "data"): "config models hold data value types (Augment, rebalance specs)",
    ("config", "models"): "ModelConfig validation resolves architecture names",
    ("config", "tuning"): "TuneJobConfig validates its search section with SearchSpace",
    ("models", "bundle"): "resolve_weights reads bundles (deferred import)",
}


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


def test_imports_point_down_except_the_known_back_arrows():
    edges = _edges()
    upward = {e: files for e, files in edges.items() if LAYER[e[1]] >= LAYER[e[0]]}
    new = {e: files for e, files in upward.items() if e not in KNOWN_BACK_ARROWS}
    assert not new, "imports that point up or sideways (see docs/architecture.md):\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(sorted(f))}" for (a, b), f in sorted(new.items()))
    gone = set(KNOWN_BACK_ARROWS) - set(upward)
    assert not gone, f"fixed back-arrows still listed in KNOWN_BACK_ARROWS: {sorted(gone)}"


def test_the_room_reader_sees_deferred_and_package_imports(tmp_path):
    code = ("from imgpipe import storage\n"
            "def f():\n    from imgpipe.tuning.space import SearchSpace\n"
            "import serving.app\n")
    (tmp_path / "m.py").write_text(code)
    assert _imported_rooms(tmp_path / "m.py") == {"storage", "tuning", "serving"}
