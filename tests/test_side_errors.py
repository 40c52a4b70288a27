"""What the operator learns of a failing side: the last error of each side in status (what, where,
when), a wait bounded by --io-timeout, and, when mirrorfs stops with the sides different, one line
saying so and an exit status that says so too."""

import json
import subprocess
import time

import nbd
import pytest

from conftest import MIRRORFS, MiB, NbdkitFilter, images_identical, qemu_io, run

EXIT_DIVERGED = 3


class FailingWrites(NbdkitFilter):
    """nbdkit in front of a destination export; writes fail with `errno` while `trigger` exists."""

    def __init__(self, workdir, target_socket, errno="EIO", *more):
        self.trigger = workdir / "inject-errors"
        super().__init__(workdir, "failing", target_socket, "--filter=error", *more,
                         f"error-pwrite={errno}", "error-pwrite-rate=100%",
                         f"error-pwrite-file={self.trigger}")


def status(disk):
    return json.loads(run(*MIRRORFS, "status", "--json", "--control", disk.control).stdout)


def failed_write(uri, offset, pattern=0x77):
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        with pytest.raises(nbd.Error):
            h.pwrite(bytes([pattern]) * 65536, offset)
    finally:
        h.shutdown()


def test_stopping_with_the_sides_different_says_so(chains, workdir, serve, qemu_nbd):
    export = qemu_nbd(chains.dest, "dst-export")
    failing = FailingWrites(workdir, export.socket)
    try:
        disk = serve(chains.source, failing.uri)            # no state dir: --on-dest-error fail
        failing.trigger.touch()
        failed_write(disk.uri, 3 * MiB)                     # on the source, not on the destination
        failing.trigger.unlink()
        qemu_io(disk.uri, "write -P 0x78 5M 64k")           # both sides: fine
        assert disk.stop() == EXIT_DIVERGED, disk.stderr
    finally:
        failing.stop()
    export.stop()
    lines = disk.stderr.strip().splitlines()
    assert "not a copy of the source" in lines[-1] and "may differ" in lines[-1], lines[-1]
    assert "stopped" not in disk.out.read_text()
    same, _ = images_identical(chains.source, chains.dest)
    assert not same                                         # what the line says is true


def test_stopping_with_a_state_dir_names_where_the_difference_is_recorded(chains, workdir, serve,
                                                                            qemu_nbd):
    export = qemu_nbd(chains.dest, "dst-export")
    failing = FailingWrites(workdir, export.socket)
    try:
        disk = serve(chains.source, failing.uri, "--state-dir", workdir / "state",
                     "--on-dest-error", "fail", "--region", "1M")
        failing.trigger.touch()
        failed_write(disk.uri, 3 * MiB)
        # Stopped before the copier could repair it: the state holds it; a restart copies it.
        assert disk.stop() == 0, disk.stderr
    finally:
        failing.stop()
    export.stop()
    assert json.loads((workdir / "state" / "state.json").read_text())["dirty"]
    lines = disk.stderr.strip().splitlines()
    assert "recorded in" in lines[-1] and str(workdir / "state") in lines[-1], lines[-1]


def test_stopping_after_a_clean_run_says_nothing_more(chains, serve):
    disk = serve(chains.source, chains.dest)
    qemu_io(disk.uri, "write -P 0x79 1M 64k")
    assert disk.stop() == 0
    assert "differ" not in disk.stderr and "stopped" in disk.out.read_text()
