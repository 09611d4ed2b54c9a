"""The package's architecture, checked from its source: layers import only downward, and so do the study's rooms;
bwl's own imports sit at the top of each module; no module outgrows 400 lines, no class 100 (config dataclasses
aside)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bwl"
LAYERS = ("core", "sd", "adapters", "data", "train", "toy", "study")  # lowest first
TOP = len(LAYERS)  # bwl/__init__.py and bwl/__main__.py (the command line) sit above every layer
TOOLKIT = ("core", "sd", "adapters")
ROOMS = ("design", "scoring", "running", "experiments", "presentation")  # the study's rooms, lowest first
MAX_CLASS_LINES = 100


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer(path: Path) -> int:
    parts = path.relative_to(PACKAGE).parts
    return LAYERS.index(parts[0]) if len(parts) > 1 else TOP


def imported_layers(tree: ast.Module) -> list[tuple[int, str, int]]:
    """(line, module, layer) of every import of a bwl module."""
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "bwl" and len(parts) > 1 and parts[1] in LAYERS:
                found.append((node.lineno, name, LAYERS.index(parts[1])))
    return found


def upward_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    relative = [
        f"line {n.lineno}: relative import" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level
    ]
    return relative + [f"line {line}: {name}" for line, name, target in imported_layers(tree) if target > layer(path)]


def test_layers_import_only_downward():
    violations = {str(p.relative_to(PACKAGE)): found for p in modules() if (found := upward_imports(p))}
    assert not violations, f"imports of a higher layer (layers, lowest first: {LAYERS}): {violations}"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    module = PACKAGE / "adapters" / "spec.py"
    tree = ast.parse("import torch\nfrom bwl.study.design.vocabulary import GRIDS\n")
    assert [name for _, name, target in imported_layers(tree) if target > layer(module)] == [
        "bwl.study.design.vocabulary", "bwl.study.design.vocabulary.GRIDS"]


def room(path: Path) -> int | None:
    """The study room a module sits in (its index in ``ROOMS``), or None outside the study's rooms."""
    parts = path.relative_to(PACKAGE).parts
    return ROOMS.index(parts[1]) if len(parts) > 2 and parts[0] == "study" else None


def imported_rooms(tree: ast.Module) -> list[tuple[int, str, int]]:
    """(line, module, room) of every import of a module inside one of the study's rooms."""
    return [(line, name, ROOMS.index(name.split(".")[2])) for line, name, _ in imported_layers(tree)
            if name.split(".")[1] == "study" and len(name.split(".")) > 3 and name.split(".")[2] in ROOMS]


def test_the_study_has_rooms_and_each_imports_only_the_rooms_before_it():
    study = PACKAGE / "study"
    loose = sorted(p.name for p in study.iterdir() if p.suffix == ".py")
    assert loose == ["__init__.py"], f"study modules outside the rooms: {loose}"
    assert {p.name for p in study.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ROOMS)
    violations = {}
    for path in modules():
        if (own := room(path)) is not None:
            found = [f"line {line}: {name}" for line, name, target in imported_rooms(ast.parse(path.read_text()))
                     if target > own]
            if found:
                violations[str(path.relative_to(PACKAGE))] = found
    assert not violations, f"imports of a later room (rooms, lowest first: {ROOMS}): {violations}"


def test_the_room_check_sees_an_upward_import():
    tree = ast.parse("from bwl.study.presentation.figures import write_figures\n")
    assert [r for _, _, r in imported_rooms(tree)] == [ROOMS.index("presentation")] * 2
    assert room(PACKAGE / "study" / "design" / "runs.py") == 0


def is_config_dataclass(node: ast.ClassDef) -> bool:
    """A dataclass whose name says it is a config (``TrainConfig``, ``Profile``): a list of fields, long by nature."""
    decorated = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
    return decorated and (node.name.endswith("Config") or node.name == "Profile")


def test_no_class_is_over_100_lines_except_config_dataclasses():
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not is_config_dataclass(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
    assert not long, long


def test_the_toolkit_imports_neither_the_study_nor_the_toy_world():
    for path in modules():
        if layer(path) < TOP and LAYERS[layer(path)] in TOOLKIT:
            names = [name for _, name, _ in imported_layers(ast.parse(path.read_text()))]
            assert not [n for n in names if n.split(".")[1] in ("study", "toy")], path


def test_bwl_imports_are_at_the_top_of_each_module():
    nested = {}
    for path in modules():
        tree = ast.parse(path.read_text())
        lines = [line for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))
                 for line, _, _ in imported_layers(ast.Module(body=[node], type_ignores=[]))]
        if lines:
            nested[str(path.relative_to(PACKAGE))] = lines
    assert not nested, f"bwl imported inside a function or class: {nested}"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
