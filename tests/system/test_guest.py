"""Real clients: a Linux guest under QEMU whose disk is mirrorfs, migrating while it writes; and the
guest's kernel attached to mirrorfs with nbd-client. The commands are docs/USING.md's ("Using it
with QEMU", "Using it with nbd-client"): each test checks that what it runs is written there.

The guest is built from Debian's packages (tests/lib/guest.py) and runs under TCG; the tests take about a
minute each. The host checks the images with e2fsck and reads the files back with debugfs.
"""

import json
import time

import pytest

from lib.commands import MIRRORFS, run
from lib.filesystems import check_filesystem
from lib.control import ctl, status
from lib.guest import Guest, build, checksums
from lib.images import MiB, images_identical, make_base, make_overlay, sha256
from lib.readme import check_commands, guest_commands
from lib.served import MigrationSetup, Process
from lib.waits import wait_until

# Not serial: nothing here measures a time (the deadlines only turn a hang into a failure, and the
# guest writes ~10 files a second where the tests need one during a copy of seconds). The marker
# `guest` puts every guest on one xdist worker (tests/system/conftest.py), one QEMU at a time.
pytestmark = [pytest.mark.guest]


@pytest.fixture(scope="session")
def guest_image():
    """Build (or find) the guest once; a missing package is an error, not a skip."""
    return build()


def mirrorfs_argv(argv):
    """The argv a test ran, as docs/USING.md writes it: `mirrorfs ...` for the module's command."""
    argv = [str(a) for a in argv]
    n = len(MIRRORFS)
    return ["mirrorfs", *argv[n:]] if argv[:n] == MIRRORFS else argv


def test_guest_writes_while_its_disk_migrates(guest_image, workdir, serve):
    m = MigrationSetup(workdir, serve, size=128 * MiB)
    disk = m.start()
    socket = disk.socket
    qemu = ["-drive", f"file=nbd+unix:///?socket={socket},format=raw,if=virtio"]
    started = time.monotonic()
    with Guest(workdir, "disk", qemu) as guest:
        guest.wait_for(lambda lines: guest.count("FILE") >= 5, "writes")
        # Step 4 while the guest writes: rate-limited, so that writes land during the copy too.
        before_copy = guest.count("FILE")
        copy = [*MIRRORFS, "copy", "--control", disk.control, "--rate", "8M"]
        run(*copy, timeout=120)
        after_copy = guest.count("FILE")
        pivot = [*MIRRORFS, "pivot", "--control", disk.control]
        assert "switched" in run(*pivot, timeout=60).stdout
        after_pivot = guest.count("FILE")
        # Ten writes after the switch at least, and enough that every file name (f0..f23) was used.
        guest.wait_for(lambda lines: guest.count("FILE") >= max(after_pivot + 10, 30),
                       "writes after the switch")
        guest.send("stop")
        lines = guest.wait_exit()
    print(f"guest: {guest.seconds:.1f}s, {guest.count('FILE')} files written; "
          f"{after_copy - before_copy} during the copy, {guest.count('FILE') - after_pivot} after "
          f"the switch; test {time.monotonic() - started:.1f}s")
    assert after_copy > before_copy, "no write landed during the copy"
    status = json.loads(m.ctl("status", "--json").stdout)
    assert status["phase"] == "switched" and status["datapath"]["reader"] == "destination"
    assert disk.stop() == 0

    # What the guest read back at the end (page cache dropped) is what it wrote last.
    written, final = checksums(lines, "FILE"), checksums(lines, "FINAL")
    assert final == written and len(final) == 24
    # The destination chain stands alone, is a clean file system, and holds every file.
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", "--backing-chain",
                          m.dest_overlay).stdout)
    assert [layer["filename"] for layer in info] == [str(m.dest_overlay), str(m.dest_base)]
    checked = check_filesystem(m.dest_overlay, "qcow2", workdir, final)

    check_commands("Using it with QEMU", {
        "/srv/vm1": str(workdir / "src"), "/srv/new": str(workdir / "dst"), "/run/vm1.sock": str(socket),
        "$KERNEL": str(guest.kernel), "$INITRD": str(guest.initrd),
        "vm1-console.log": str(guest.console), "vm1-guest.ctl": str(guest.ctl_path),
        "vm1.raw": str(workdir / "check.raw")},
        [mirrorfs_argv(disk.argv), guest.argv, mirrorfs_argv(copy), mirrorfs_argv(pivot), *checked])


def test_nbd_client_in_the_guest_kernel(guest_image, workdir, serve):
    (workdir / "src").mkdir()
    (workdir / "dst").mkdir()
    base = make_base(workdir / "src" / "base.qcow2", 128 * MiB)
    source = make_overlay(workdir / "src" / "disk.qcow2", base)
    dest = make_overlay(workdir / "dst" / "disk.qcow2", base)
    disk = serve(source, dest)
    socket = disk.socket
    # No network but one forwarded port: 10.0.2.100:10809 in the guest is mirrorfs's unix socket.
    qemu = ["-netdev", "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:10809-chardev:nbd",
            "-chardev", f"socket,id=nbd,path={socket}", "-device", "virtio-net-pci,netdev=net0"]
    with Guest(workdir, "nbd", qemu, control=False) as guest:
        lines = guest.wait_exit()
    print(f"guest: {guest.seconds:.1f}s")
    assert f"ATTACHED {128 * MiB // 512}" in lines
    assert disk.stop() == 0

    written, final = checksums(lines, "FILE"), checksums(lines, "FINAL")
    assert final == written and len(final) == 24
    same, detail = images_identical(source, dest)
    assert same, detail
    checked = check_filesystem(dest, "qcow2", workdir, final)

    check_commands("Using it with nbd-client", {
        "/srv/vm2": str(workdir / "src"), "/srv/new": str(workdir / "dst"), "/run/vm2.sock": str(socket),
        "$KERNEL": str(guest.kernel), "$INITRD": str(guest.initrd),
        "vm2-console.log": str(guest.console),
        "vm2.raw": str(workdir / "check.raw")},
        [mirrorfs_argv(disk.argv), guest.argv, *checked], guest=guest_commands())


def test_guest_through_the_life_of_its_disk(guest_image, workdir):
    """Issue #12's guest: its disk is a socket with reconnect-delay, written with fsync all along
    through: plain export -> take over -> kill -9 of the migration's supervisor during the copy ->
    restart -> copy -> pivot -> hand back -> a second migration -> hand back. The guest reports no
    I/O error; every file's hash matches on the final chain; e2fsck -fn is clean."""
    started = []

    def background(name, *args):
        p = Process(workdir, name, *args)
        started.append(p)
        return p

    for d in ("a", "b", "c"):
        (workdir / d).mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", workdir / "a" / "vm.qcow2", str(128 * MiB))
    # Data to copy (the guest's mkfs leaves most of it), so that the kill lands during the copy.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64M", workdir / "a" / "vm.qcow2")
    sock = workdir / "vm.sock"
    try:
        exported = background("export", "export", workdir / "a" / "vm.qcow2", "--socket", sock)
        qemu = ["-drive", f"file.driver=nbd,file.server.type=unix,file.server.path={sock},"
                          "file.reconnect-delay=60,format=raw,if=virtio"]
        with Guest(workdir, "disk", qemu, timeout=300) as guest:
            guest.wait_for(lambda lines: guest.count("FILE") >= 3, "writes")
            take_over = ("start", "--take-over", exported.control, "--dest-dir", workdir / "b",
                         "--state-dir", workdir / "state")
            first = background("first", *take_over)
            ctl(first.control, "copy", "--background", "--rate", "4M")
            wait_until(lambda: (status(first.control).get("copy") or {}).get("bytes_done"), "copying")
            n = guest.count("FILE")
            guest.wait_for(lambda lines: guest.count("FILE") >= n + 1, "writes during the copy")
            assert status(first.control)["phase"] == "copying-base"
            first.kill_tree()
            again = background("again", *take_over)
            ctl(again.control, "copy")
            assert "switched" in ctl(again.control, "pivot").stdout
            ctl(again.control, "hand-back")
            assert again.proc.wait(60) == 0
            n = guest.count("FILE")
            guest.wait_for(lambda lines: guest.count("FILE") >= n + 3, "writes after hand-back")
            second = background("second", "start", "--take-over", exported.control,
                                "--dest-dir", workdir / "c")
            ctl(second.control, "copy")
            assert "switched" in ctl(second.control, "pivot").stdout
            ctl(second.control, "hand-back")
            assert second.proc.wait(60) == 0
            n = guest.count("FILE")
            guest.wait_for(lambda lines: guest.count("FILE") >= max(n + 3, 30), "writes at the end")
            guest.send("stop")
            lines = guest.wait_exit()
        final_image = status(exported.control)["source"]["spec"]
        assert exported.stop() == 0
    finally:
        for p in started:
            p.stop()
    assert not [line for line in lines if line.startswith("FAIL")], lines
    written, final = checksums(lines, "FILE"), checksums(lines, "FINAL")
    assert final == written and len(final) == 24
    assert final_image == str(workdir / "c" / "vm-snap-snap.qcow2")
    check_filesystem(final_image, "qcow2", workdir, final)


def test_guest_through_an_evacuation(guest_image, workdir):
    """A guest writes with fsync all along while its exported disk is evacuated switch-first:
    `start --take-over --switch-first` -> kill -9 of the supervisor during hydration -> the same
    command line resumes -> hydrated -> hand-back. The guest reports no I/O error; every file's
    hash matches on the new image, which stands alone; e2fsck -fn is clean; the source image is
    unchanged since the take-over."""
    started = []

    def background(name, *args):
        p = Process(workdir, name, *args)
        started.append(p)
        return p

    for d in ("a", "b"):
        (workdir / d).mkdir()
    source = workdir / "a" / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", source, str(128 * MiB))
    # Data to hydrate (the guest's mkfs leaves most of it), so that the kill lands during it.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64M", source)
    sock = workdir / "vm.sock"
    try:
        exported = background("export", "export", source, "--socket", sock)
        qemu = ["-drive", f"file.driver=nbd,file.server.type=unix,file.server.path={sock},"
                          "file.reconnect-delay=60,format=raw,if=virtio"]
        with Guest(workdir, "disk", qemu, timeout=300) as guest:
            guest.wait_for(lambda lines: guest.count("FILE") >= 3, "writes")
            evacuate = ("start", "--take-over", exported.control, "--switch-first", "--dest-dir",
                        workdir / "b", "--state-dir", workdir / "state", "--rate", "2M")
            first = background("first", *evacuate)
            source_hash = sha256(source)        # nothing writes it from the take-over on
            wait_until(lambda: status(first.control)["hydration"]["percent"] > 10, "hydrating")
            n = guest.count("FILE")
            guest.wait_for(lambda lines: guest.count("FILE") >= n + 1, "writes during hydration")
            assert status(first.control)["phase"] == "hydrating"
            first.kill_tree()
            again = background("again", *evacuate)
            assert status(again.control)["phase"] == "hydrating"     # the same command line goes on
            # The kill landed during hydration: the rest may go at full speed (`mirrorfs rate`
            # lifts the cap the command line set), which saves the suite half a minute.
            ctl(again.control, "rate", "none")
            wait_until(lambda: status(again.control)["phase"] == "hydrated", "hydrated",
                       timeout=300)
            ctl(again.control, "hand-back")
            assert again.proc.wait(60) == 0
            n = guest.count("FILE")
            guest.wait_for(lambda lines: guest.count("FILE") >= max(n + 3, 30), "writes at the end")
            guest.send("stop")
            lines = guest.wait_exit()
        final_image = status(exported.control)["source"]["spec"]
        assert exported.stop() == 0
    finally:
        for p in started:
            p.stop()
    assert not [line for line in lines if line.startswith("FAIL")], lines
    written, final = checksums(lines, "FILE"), checksums(lines, "FINAL")
    assert final == written and len(final) == 24
    assert final_image == str(workdir / "b" / "vm.qcow2")
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", "--backing-chain",
                          final_image).stdout)
    assert [layer["filename"] for layer in info] == [final_image]
    assert sha256(source) == source_hash
    check_filesystem(final_image, "qcow2", workdir, final)
