"""The two halves of the package: what runs inside nbdkit imports only the standard library, libnbd
and nbdkit; and an installed copy of the package (not this checkout) serves a disk."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import MiB, make_base, make_overlay, qemu_io, run

ROOT = Path(__file__).resolve().parent.parent
DATAPATH_MODULES = ("service", "options", "disk", "backend", "inflight", "dirtymap", "copier",
                    "state", "jsonlines", "threadstate")
ALLOWED_OUTSIDE_STDLIB = {"mirrorfs", "nbd", "libnbdmod"}

PROBE = """
import json, sys
sys.path.insert(0, {root!r})
before = set(sys.modules)
for name in {modules!r}:
    __import__("mirrorfs.datapath." + name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_datapath_imports_only_the_standard_library_and_libnbd():
    """In a clean interpreter (Debian's, as nbdkit embeds it; -I: no PYTHONPATH, no user site),
    import every data path module and look at what came along."""
    res = run("/usr/bin/python3", "-I", "-c",
              PROBE.format(root=str(ROOT), modules=DATAPATH_MODULES))
    loaded = json.loads(res.stdout)
    ours = [m for m in loaded if m.split(".")[0] == "mirrorfs"]
    assert ours and all(m in ("mirrorfs", "mirrorfs.datapath") or m.startswith("mirrorfs.datapath.")
                        for m in ours), ours
    foreign = sorted({m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
                     - ALLOWED_OUTSIDE_STDLIB)
    assert foreign == [], f"the data path pulled in {foreign}"


def test_the_supervisor_does_not_reach_into_the_datapath_for_private_names():
    """Only the names the data path offers the supervisor (its constants, state, options, the
    control protocol, the connect path) are imported across the line."""
    offered = {"jsonlines", "human_size", "NBDKIT_SCRIPT", "options", "state", "backend"}
    crossing = set()
    for path in (ROOT / "mirrorfs").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith("from mirrorfs.datapath"):
                module, _, names = line.partition(" import ")
                crossing.add(module.removeprefix("from mirrorfs.datapath").lstrip(".") or
                             names.split(",")[0].split(" as ")[0].strip())
    assert crossing and crossing <= offered, crossing - offered


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
