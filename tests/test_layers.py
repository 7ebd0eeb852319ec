"""The import direction of docs/ARCHITECTURE.md: every module of the package imports only its own layer
and the layers below it, training and evaluation never each other, and nothing imports the bare
repository folder names (`processing`, `evaluation`, ...), which are not installed."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "regionmed_clip"
# Repository folder -> its installed package name (setup.cfg's package_dir).
FOLDERS = {
    "regionmed_clip": NAMESPACE,
    "modeling_regionmed_clip": f"{NAMESPACE}.modeling_regionmed_clip",
    "processing": f"{NAMESPACE}.processing",
    "training_scripts": f"{NAMESPACE}.training_scripts",
    "evaluation": f"{NAMESPACE}.evaluation",
}
# Room -> (layer height, the rooms it may import besides its own). Longest prefix wins.
ROOMS = {
    f"{NAMESPACE}.cli": (0, set()),
    f"{NAMESPACE}.modeling_regionmed_clip": (1, set()),
    f"{NAMESPACE}.processing": (1, set()),
    f"{NAMESPACE}.scoring": (2, set()),
    f"{NAMESPACE}.figures": (2, set()),
    f"{NAMESPACE}.data": (2, {"cli", "processing", "scoring"}),
    f"{NAMESPACE}.training_scripts": (3, {"cli", "modeling_regionmed_clip", "processing", "scoring", "figures", "data"}),
    f"{NAMESPACE}.evaluation": (3, {"cli", "modeling_regionmed_clip", "processing", "scoring", "figures", "data"}),
    f"{NAMESPACE}.apps": (4, {"cli", "modeling_regionmed_clip", "processing", "scoring", "figures", "data",
                              "training_scripts", "evaluation"}),
    NAMESPACE: (5, set()),  # the namespace's own __init__ imports nothing
}
SHIPPED = ("modeling_regionmed_clip", "processing")


def _room(module: str) -> str:
    return max((room for room in ROOMS if module == room or module.startswith(room + ".")), key=len)


def _short(room: str) -> str:
    return room.removeprefix(NAMESPACE + ".")


def _modules() -> list[tuple[str, Path]]:
    modules = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if folder == "regionmed_clip" and not parts:
                modules.append((NAMESPACE, path))
            else:
                modules.append((".".join((package, *parts)), path))
    return modules


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, function-level ones included."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                found.append((node.lineno, node.module))
    return found


MODULES = _modules()
KNOWN = {module for module, _ in MODULES}


def test_every_package_module_is_seen():
    names = {module for module, _ in MODULES}
    assert {f"{NAMESPACE}.training_scripts.train", f"{NAMESPACE}.evaluation.probe", f"{NAMESPACE}.data.schema",
            f"{NAMESPACE}.processing.processing_regionmed_clip", f"{NAMESPACE}.apps.demo"} <= names
    assert all(_room(module) in ROOMS for module in names)


def _violations(module: str, path: Path) -> list[str]:
    room = _room(module)
    height, allowed = ROOMS[room]
    wrong = []
    for line, target in _imports(module, path):
        top = target.split(".")[0]
        if top in FOLDERS and top != NAMESPACE:
            wrong.append(f"line {line}: bare `{target}` is not installed; import `{NAMESPACE}.{target}`")
            continue
        if top != NAMESPACE:
            continue
        if target not in KNOWN:
            wrong.append(f"line {line}: `{target}` is no module of the package")
            continue
        target_room = _room(target)
        if target_room != room and _short(target_room) not in allowed:
            wrong.append(f"line {line}: `{_short(room)}` (layer {height}) may not import `{target}` "
                         f"(layer {ROOMS[target_room][0]})")
    return wrong


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[module for module, _ in MODULES])
def test_imports_point_down(module, path):
    wrong = _violations(module, path)
    assert not wrong, f"{path.relative_to(ROOT)}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_files_import_siblings_only_by_relative_name(folder):
    """The Hub's remote-code loader copies sibling files reached by `from .module import name` only."""
    wrong = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level and (node.level > 1 or not node.module):
                wrong.append(f"{path.name}:{node.lineno}: `from {'.' * node.level}{node.module or ''} import ...`")
    assert not wrong, wrong
    assert not [path for path in (ROOT / folder).iterdir() if path.is_dir() and path.name != "__pycache__"]


@pytest.mark.parametrize(("module", "source", "expected"), [
    (f"{NAMESPACE}.evaluation.bad", "from regionmed_clip.training_scripts.train import main\n",
     "`evaluation` (layer 3) may not import `regionmed_clip.training_scripts.train`"),
    (f"{NAMESPACE}.training_scripts.bad", "def f():\n    from regionmed_clip.evaluation import probe\n",
     "line 2: `training_scripts` (layer 3) may not import `regionmed_clip.evaluation`"),
    (f"{NAMESPACE}.data.bad", "from ..apps.demo import main\n",
     "`data` (layer 2) may not import `regionmed_clip.apps.demo`"),
    (f"{NAMESPACE}.processing.bad", "from regionmed_clip.data.schema import SPLITS\n",
     "`processing` (layer 1) may not import `regionmed_clip.data.schema`"),
    (f"{NAMESPACE}.evaluation.bad", "import processing.medical_image_io\n",
     "bare `processing.medical_image_io` is not installed"),
    (f"{NAMESPACE}.training_scripts.bad", "from .data_schema import load_canonical\n",
     "`regionmed_clip.training_scripts.data_schema` is no module of the package"),
])
def test_a_violation_is_reported(tmp_path, module, source, expected):
    """The checker itself: an upward, sideways or bare import is named with its line."""
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    wrong = _violations(module, bad)
    assert len(wrong) == 1 and expected in wrong[0], wrong
    bad.write_text("import os\nfrom regionmed_clip.processing import RegionMedCLIPProcessor\n")
    assert _violations(f"{NAMESPACE}.evaluation.good", bad) == []
