"""An installed copy of the package (`pip install --target`, not this checkout) serves a disk: the
nbdkit script ships inside the package and nbdkit loads it from there. The import rules the two
halves of the package keep: tests/unit/test_layers.py."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lib.images import MiB, make_base, make_overlay, qemu_io

ROOT = Path(__file__).resolve().parents[2]


def test_an_installed_copy_serves_a_disk(workdir):
    """`pip install .` (not editable): the nbdkit script ships inside the package, so nbdkit loads
    it from the installed copy, and the disk is served."""
    target = workdir / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", target, ROOT],
                   check=True, capture_output=True)
    assert (target / "mirrorfs" / "datapath" / "nbdkit" / "script.py").is_file()
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
        script = next(a for a in nbdkit.cmdline() if a.endswith("nbdkit/script.py"))
        assert Path(script).is_relative_to(target), script
        qemu_io(f"nbd+unix:///?socket={sock}", "write -P 0x3c 1M 64k", "read -P 0x3c 1M 64k")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (workdir / "installed.out").read_text()
    qemu_io(dest, "read -P 0x3c 1M 64k", fmt="qcow2")
