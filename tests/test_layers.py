"""The two halves of the package: what runs inside nbdkit imports only the standard library, libnbd
and nbdkit; and an installed copy of the package (not this checkout) serves a disk."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lib.commands import run
from lib.images import MiB, make_base, make_overlay, qemu_io

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mirrorfs"
# The families, lowest first: a module may import from its own family and from those below it, never
# from above. `common` is stdlib-only and shared by both processes; `datapath` runs inside nbdkit; the
# rest is the supervisor. A new subpackage must be placed here (the test below fails until it is).
LAYERS = ("common", "datapath", "system", "sides", "daemons", "host", "control", "cli")
# Top-level modules: the supervisor's exception tree, the package's metadata and `python -m`.
TOP_LEVEL = {"errors": "system", "__init__": "common", "__main__": "cli"}
ALLOWED_OUTSIDE_STDLIB = {"mirrorfs", "nbd", "libnbdmod"}
# What the data path offers the supervisor: the script nbdkit loads, its parameters, the state file's
# reader, the state directory's (every file of it, and whose it is) and the one connect path.
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
                       "mirrorfs.datapath.statedir", "mirrorfs.datapath.backend"}


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


def test_the_datapath_imports_only_the_standard_library_and_libnbd():
    """In a clean interpreter (Debian's, as nbdkit embeds it; -I: no PYTHONPATH, no user site),
    import every module of the data path and of common (found in the tree) and look at what came
    along."""
    names = [n for n, _ in modules() if family(n) in ("common", "datapath") and n != "mirrorfs"
             and not n.endswith("nbdkit_script") and not n.endswith(".callbacks")]
    assert "mirrorfs.datapath.disk" in names and "mirrorfs.common.jsonlines" in names, names
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


def test_an_installed_copy_serves_a_disk(workdir):
    """`pip install .` (not editable): the nbdkit script ships inside the package, so nbdkit loads
    it from the installed copy, and the disk is served."""
    target = workdir / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", target, ROOT],
                   check=True, capture_output=True)
    assert (target / "mirrorfs" / "datapath" / "nbdkit_script.py").is_file()
    (workdir / "src").mkdir()
    (workdir / "dst").mkdir()
    base = make_base(workdir / "src" / "base.qcow2", 16 * MiB)
    source = make_overlay(workdir / "src" / "snap.qcow2", base)
    dest = make_overlay(workdir / "dst" / "snap.qcow2", base)
    sock = workdir / "d.sock"
    env = dict(os.environ, PYTHONPATH=str(target))
    out = open(workdir / "installed.out", "w")
    proc = psutil.Popen([sys.executable, "-m", "mirrorfs", "serve", source, dest, "--socket", sock],
                        cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "serving" not in (workdir / "installed.out").read_text():
            assert proc.poll() is None, (workdir / "installed.out").read_text()
            assert time.monotonic() < deadline, "not serving after 30 s"
            time.sleep(0.05)
        nbdkit = next(p for p in proc.children() if p.name() == "nbdkit")
        script = next(a for a in nbdkit.cmdline() if a.endswith("nbdkit_script.py"))
        assert Path(script).is_relative_to(target), script
        qemu_io(f"nbd+unix:///?socket={sock}", "write -P 0x3c 1M 64k", "read -P 0x3c 1M 64k")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (workdir / "installed.out").read_text()
    qemu_io(dest, "read -P 0x3c 1M 64k", fmt="qcow2")


def test_no_test_imports_another_or_conftest():
    """Tests share helpers through tests/lib/ only: a test file importing another test file (or
    conftest, which holds fixtures alone) couples them and runs the other's module-level code."""
    tests = ROOT / "tests"
    own = {p.stem for p in tests.glob("*.py")}
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            wrong += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in own]
    assert wrong == []
