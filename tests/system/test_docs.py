"""The README stays short and true: at most 150 lines, every .py path the docs name exists, and
its one migration runs as written (the other sections' commands are checked by the tests that run
them: grep check_commands)."""

import os
import re
import subprocess
import time

from lib.commands import MIRRORFS, run
from lib.images import MiB, qemu_io
from lib.readme import README, ROOT, check_commands, commands, documents

MAX_README_LINES = 150
MODULE_PATH = re.compile(r"(?<![\w/])(?:mirrorfs|tests|scripts|plugin)/[\w/]*\.py\b")


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move detail to docs/")


def test_every_python_path_in_the_docs_exists():
    """mirrorfs/..., tests/..., scripts/... and plugin/... paths ending in .py, in README.md and
    docs/*.md: a module that moves takes its docs along."""
    missing = [f"{path.relative_to(ROOT)}: {name}" for path in documents()
               for name in sorted(set(MODULE_PATH.findall(path.read_text())))
               if not (ROOT / name).is_file()]
    assert not missing, "the docs name modules that do not exist:\n" + "\n".join(missing)


def test_the_readmes_two_commands_are_make_targets():
    host, _ = commands("Two commands")
    assert [c.split("#")[0].split() for c in host] == [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    # `make demo` runs what tests/test_demo.py runs; `make test` is this suite.
    assert re.search(r"^demo: setup\n\t\$\(PY\) scripts/demo.py$", makefile, re.M)
    # `make test` lints first (make lint, which needs setup), then runs pytest.
    assert re.search(r"^test: lint\n\t.*-m pytest", makefile, re.M)
    assert re.search(r"^lint: setup$", makefile, re.M)


def test_the_readmes_migration_runs_as_written(workdir):
    """The README's migration, command by command, in a work directory (the README's relative
    src/ and dst/), with a client writing through the disk before the copy and reading after the
    switch."""
    sock, ctl = workdir / "vm1.sock", workdir / "vm1.sock.ctl"
    env = {k: v for k, v in os.environ.items() if k != "MIRRORFS_CONTROL"}
    ran = []

    def sh(*argv):
        ran.append(["mirrorfs", *argv[len(MIRRORFS):]] if list(argv[:len(MIRRORFS)]) == MIRRORFS
                   else list(argv))
        res = run(*argv, cwd=workdir, env=env, check=False)
        assert res.returncode == 0, f"{ran[-1]}: {res.stderr}"
        return res.stdout

    sh("mkdir", "-p", "src", "dst")
    sh("qemu-img", "create", "-f", "qcow2", "src/base.qcow2", "20G")
    qemu_io(str(workdir / "src" / "base.qcow2"), f"write -P 0x5a {MiB} {MiB}", fmt="qcow2")
    start = [*MIRRORFS, "start", "src/base.qcow2", "--dest-dir", "dst", "--socket", str(sock)]
    ran.append(["mirrorfs", *start[len(MIRRORFS):]])
    out = workdir / "start.out"
    with open(out, "w") as stdout, open(workdir / "start.err", "w") as stderr:
        server = subprocess.Popen(start, cwd=workdir, env=env, stdout=stdout, stderr=stderr,
                                  stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "serving " not in out.read_text():
            assert server.poll() is None, (workdir / "start.err").read_text()
            assert time.monotonic() < deadline, "mirrorfs start is not serving"
            time.sleep(0.02)
        assert f"serving nbd+unix:///?socket={sock}" in out.read_text()
        uri = f"nbd+unix:///?socket={sock}"
        qemu_io(uri, f"write -P 0xa5 {3 * MiB} 4k", "write -P 0x33 512 512")   # the VM, Step 3

        env["MIRRORFS_CONTROL"] = str(ctl)
        ran.append(["export", f"MIRRORFS_CONTROL={ctl}"])
        sh(*MIRRORFS, "copy", "--rate", "200M")
        assert "switched to the destination" in sh(*MIRRORFS, "pivot")
        assert "switched" in sh(*MIRRORFS, "status")
        qemu_io(uri, f"read -P 0x5a {MiB} {MiB}", f"read -P 0xa5 {3 * MiB} 4k",
                "read -P 0x33 512 512", "read -P 0 0 512")
        server.terminate()
        assert server.wait(60) == 0, (workdir / "start.err").read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # The destination chain alone holds the disk.
    dest = workdir / "dst" / "base-snap.qcow2"
    info = run("qemu-img", "info", "--backing-chain", dest).stdout
    assert str(workdir / "src") not in info and "src/" not in info, info
    qemu_io(str(dest), f"read -P 0x5a {MiB} {MiB}", f"read -P 0xa5 {3 * MiB} 4k", fmt="qcow2")
    check_commands('Migrating a disk (the oVirt "Mirrored-Snapshot" flow)',
                   {"/run/vm1.sock": str(sock)}, ran)
