"""The README's one migration runs as written (the other sections' commands are checked by the
tests that run them: grep check_commands; what the docs say without running anything, the README's
length, the paths they name, its two commands: tests/unit/test_docs_text.py)."""

import os
import subprocess
import time

from lib.commands import MIRRORFS, run
from lib.images import MiB, qemu_io
from lib.readme import check_commands


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
