"""The two halves of the package: what runs inside nbdkit imports only the standard library, libnbd
and nbdkit; each family imports only downward; the tests share helpers through tests/lib/ alone.
That an installed copy of the package (not this checkout) serves a disk: tests/system/test_installed.py."""

import ast
import json
import sys
from pathlib import Path

from lib.commands import run

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mirrorfs"
# The families, lowest first: a module may import from its own family and from those below it, never
# from above. `common` is stdlib-only and shared by both processes; `datapath` runs inside nbdkit; the
# rest is the supervisor. A new subpackage must be placed here (the test below fails until it is).
LAYERS = ("common", "datapath", "system", "sides", "daemons", "host", "control", "cli")
# Top-level modules: the supervisor's exception tree, the package's metadata and `python -m`.
TOP_LEVEL = {"errors": "system", "__init__": "common", "__main__": "cli"}
ALLOWED_OUTSIDE_STDLIB = {"mirrorfs", "nbd", "libnbdmod"}
# What the data path offers the supervisor: the script nbdkit loads, its parameters, the state file's
# reader, the state directory's (every file of it, and whose it is), the one connect path and the
# one copy of a range (the migration's base copy, control.basecopy, is the copy the data path's
# copier and hydrator make, on two NBD sides: one loop, not a second walker of block status).
# Everything else in it is private to the nbdkit process.
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
before = set(sys.modules)
for name in {modules!r}:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""
OFFERED_BY_DATAPATH = {"mirrorfs.datapath", "mirrorfs.datapath.options", "mirrorfs.datapath.state",
                       "mirrorfs.datapath.statedir", "mirrorfs.datapath.sides.backend",
                       "mirrorfs.datapath.sides.copy"}


def family(module):
    """'mirrorfs.control.migration' -> 'control'; a top-level module -> the layer it stands in."""
    parts = module.split(".")
    if len(parts) == 1:
        return TOP_LEVEL["__init__"]
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return TOP_LEVEL[parts[1]]


def modules():
    """Every module of the package, from the tree itself: (dotted name, path)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def imports_of(path):
    """The mirrorfs modules `path` imports, as dotted names ('from mirrorfs.x import y' gives
    mirrorfs.x.y when y is a module, else mirrorfs.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mirrorfs"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "mirrorfs":
            for a in node.names:
                candidate = f"{node.module}.{a.name}"
                as_path = ROOT.joinpath(*candidate.split("."))
                found.add(candidate if as_path.with_suffix(".py").is_file() or as_path.is_dir()
                          else node.module)
    return found


def test_every_family_is_placed_in_the_layers():
    families = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert families == set(LAYERS), f"place {families - set(LAYERS)} in LAYERS, or drop {set(LAYERS) - families}"
    tops = {p.stem for p in PACKAGE.glob("*.py")}
    assert tops <= set(TOP_LEVEL), f"a module outside every family: {tops - set(TOP_LEVEL)}"


def test_every_module_imports_only_downward():
    wrong = []
    for name, path in modules():
        mine = LAYERS.index(family(name))
        for target in imports_of(path):
            if LAYERS.index(family(target)) > mine:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


# The data path's rooms, lowest first; a module imports from its own room and those below, and the
# two modes (`mirror`, `evacuation`) never from each other. The shared pieces are its top-level
# modules; `served` (the served disk's contract, which both modes implement) stands above the sides
# (its statistics are theirs) and below the modes; `statedir` above both modes (it reads every file
# of the state directory, the evacuation's hydration map included), `nbdkit` (the process: script,
# callbacks, service) above all.
DATAPATH_ROOMS = {"shared": 0, "sides": 1, "served": 2, "mirror": 3, "evacuation": 3,
                  "statedir": 4, "nbdkit": 5}
PLACED_MODULES = {"served", "statedir"}         # top-level modules with a room of their own


def room(module):
    """'mirrorfs.datapath.mirror.disk' -> 'mirror'; 'mirrorfs.datapath.errors' -> 'shared'."""
    parts = module.split(".")
    if len(parts) < 3:
        return "shared"
    if (PACKAGE / "datapath" / parts[2]).is_dir():
        return parts[2]
    return parts[2] if parts[2] in PLACED_MODULES else "shared"


def test_every_datapath_room_is_placed():
    rooms = {p.name for p in (PACKAGE / "datapath").iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(DATAPATH_ROOMS) - {"shared"} - PLACED_MODULES, rooms


def test_the_datapath_rooms_import_only_downward_and_the_modes_never_each_other():
    wrong = []
    for name, path in modules():
        if family(name) != "datapath":
            continue
        mine = room(name)
        for target in imports_of(path):
            theirs = room(target)
            if family(target) == "datapath" and theirs != mine and \
                    DATAPATH_ROOMS[theirs] >= DATAPATH_ROOMS[mine]:
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_the_datapath_imports_only_the_standard_library_and_libnbd():
    """In a clean interpreter (Debian's, as nbdkit embeds it; -I: no PYTHONPATH, no user site),
    import every module of the data path and of common (found in the tree) and look at what came
    along."""
    names = [n for n, _ in modules() if family(n) in ("common", "datapath") and n != "mirrorfs"
             and not n.endswith(".nbdkit.script") and not n.endswith(".callbacks")]
    assert "mirrorfs.datapath.mirror.disk" in names and "mirrorfs.common.jsonlines" in names, names
    res = run("/usr/bin/python3", "-I", "-c", PROBE.format(root=str(ROOT), modules=names))
    loaded = json.loads(res.stdout)
    ours = [m for m in loaded if m.split(".")[0] == "mirrorfs"]
    assert ours and all(family(m) in ("common", "datapath") for m in ours), ours
    foreign = sorted({m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
                     - ALLOWED_OUTSIDE_STDLIB)
    assert foreign == [], f"the data path pulled in {foreign}"


def test_the_supervisor_does_not_reach_into_the_datapath_for_private_names():
    crossing = set()
    for name, path in modules():
        if family(name) not in ("common", "datapath"):
            crossing |= {t for t in imports_of(path) if family(t) == "datapath"}
    assert crossing and crossing <= OFFERED_BY_DATAPATH, crossing - OFFERED_BY_DATAPATH


def test_no_test_imports_another_or_conftest():
    """Tests share helpers through tests/lib/ only: a test file importing another test file (or
    conftest, which holds fixtures alone) couples them and runs the other's module-level code."""
    tests = ROOT / "tests"
    # tests/unit/ and tests/system/ are both on sys.path while pytest runs (its rootdir-relative
    # "prepend" import mode): a file of either could import one of the other.
    own = {p.stem for p in tests.rglob("*.py") if p.parent.name != "lib"}
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            wrong += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in own]
    assert wrong == []


def test_every_test_file_is_in_one_of_the_two_suites():
    """`make check` runs tests/unit/ and `make test` runs tests/unit/ and tests/system/: a test
    file anywhere else (tests/ itself, a new folder) would run in neither, and pass unseen. Two
    files of one name would make pytest refuse the second (one module name on sys.path)."""
    tests = ROOT / "tests"
    placed = [p.relative_to(tests) for p in tests.rglob("test_*.py") if p.parent.name != "lib"]
    assert placed and [str(p) for p in placed if p.parts[0] not in ("unit", "system") or len(p.parts) != 2] == []
    names = [p.name for p in placed]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_every_module_is_named_in_its_packages_map():
    """The module map is written once, in the docstrings (docs/DESIGN.md points there): every module
    and subpackage is named, as `name.py` or `name/`, in its package's `__init__.py` docstring."""
    missing = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        if init.parent == PACKAGE:
            continue
        text = ast.get_docstring(ast.parse(init.read_text())) or ""
        for child in sorted(init.parent.iterdir()):
            if child.suffix == ".py" and child.name != "__init__.py" and child.name not in text:
                missing.append(str(child.relative_to(ROOT)))
            elif (child / "__init__.py").is_file() and f"{child.name}/" not in text:
                missing.append(str(child.relative_to(ROOT)) + "/")
    assert missing == [], "name these in their package's __init__.py docstring"
