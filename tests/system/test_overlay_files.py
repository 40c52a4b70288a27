"""The files `mirrorfs start` creates: only where it says (a symlink in their place is refused, not
followed), never over something that exists, and readable by their owner alone."""

import os
import stat

import pytest

import subprocess

from lib.commands import EXIT_ERROR, MIRRORFS
from lib.images import MiB, qemu_io


def start_fails(migration):
    """`mirrorfs start` refused in one line (a start that wrongly succeeds is stopped, not waited
    for: it would serve until killed)."""
    argv = [*MIRRORFS, "start", migration.base, "--dest-dir", migration.workdir / "dst",
            "--socket", migration.workdir / "x.sock"]
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate()
        raise AssertionError(f"start was not refused: {out}")
    # ImageError: exits 1, where `start` refusing an overlay that exists already exits 2.
    assert proc.returncode == EXIT_ERROR, (out, err)
    assert err.startswith("mirrorfs: error:") and err.count("\n") == 1, err
    assert not (migration.workdir / "x.sock").exists()
    return err


@pytest.fixture
def umask_022():
    """The usual umask, under which a file created 0644 would be readable by everyone."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("side", ["source", "dest"])
@pytest.mark.parametrize("dangling", [True, False])
def test_start_refuses_a_symlink_where_an_overlay_goes(side, dangling, migration, workdir):
    outside = workdir / "outside"
    outside.mkdir()
    target = outside / "elsewhere.qcow2"
    if not dangling:
        target.write_bytes(b"somebody's data")
    link = migration.source_overlay if side == "source" else migration.dest_overlay
    link.symlink_to(target)
    err = start_fails(migration)
    assert str(link) in err and "symbolic link" in err, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == b"somebody's data"
    assert sorted(p.name for p in outside.iterdir()) == ([] if dangling else ["elsewhere.qcow2"])
    other = migration.dest_overlay if side == "source" else migration.source_overlay
    assert not other.exists() and not other.is_symlink()


def test_start_refuses_a_symlink_where_the_destination_base_goes(migration, workdir):
    """`copy` would write the base through it."""
    migration.dest_base.symlink_to(workdir / "elsewhere.qcow2")
    err = start_fails(migration)
    assert str(migration.dest_base) in err and "symbolic link" in err, err
    assert not migration.source_overlay.exists() and not migration.dest_overlay.exists()


def test_overlays_are_private_to_their_owner(migration, umask_022):
    disk = migration.start()
    for overlay in (migration.source_overlay, migration.dest_overlay):
        assert stat.S_IMODE(overlay.stat().st_mode) == 0o600, overlay
    qemu_io(disk.uri, "write -P 0x44 1M 64k")
    assert disk.stop() == 0
    qemu_io(migration.dest_overlay, f"read -P 0x44 {MiB} 64k", fmt="qcow2")
