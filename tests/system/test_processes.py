"""The life of `mirrorfs serve` and the processes it owns (nbdkit and one qemu-storage-daemon per image):
stopped in order by a signal, gone with it when it is killed, and a child dying on its own is fatal."""

import os
import signal
import socket
import stat
import subprocess
import time

import pytest

from lib.commands import run
from lib.images import MiB, check_images, images_identical, qemu_io
from lib.processes import GONE_TIMEOUT, children, still_running
from mirrorfs.system.children import Child

@pytest.fixture(autouse=True)
def rundir_in_workdir(workdir, monkeypatch):
    """mirrorfs makes its run directory (its children's sockets, pidfiles, logs) in XDG_RUNTIME_DIR:
    put it in the test's directory, so that it can be checked and is removed with it."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", os.fspath(workdir))


def rundirs(workdir):
    return sorted(workdir.glob("mirrorfs-*"))


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nothing_listens(port):
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_everything(sig, chains, serve, workdir):
    port = free_tcp_port()
    sock = workdir / "disk.sock"
    disk = serve(chains.source, chains.dest, "--socket", sock, "--listen", f"127.0.0.1:{port}")
    kids = children(disk)
    qemu_io(disk.uri, "write -P 0x5a 1M 64k", "write -z 8M 1M")
    qemu_io(f"nbd://127.0.0.1:{port}/", "read -P 0x5a 1M 64k")

    assert disk.stop(sig, timeout=GONE_TIMEOUT * 2) == 0, disk.stderr
    assert disk.out.read_text().splitlines()[-1] == "stopped"
    assert disk.stderr == ""
    # mirrorfs waited for its children: none is left, not even for a moment.
    assert not still_running(kids.values()), kids
    assert not sock.exists() and not sock.is_symlink()
    assert nothing_listens(port)
    assert rundirs(workdir) == []
    check_images(chains)
    qemu_io(chains.source, "read -P 0x5a 1M 64k", fmt="qcow2")


def test_sighup_is_ignored(chains, serve):
    """Closing the terminal that started mirrorfs (SIGHUP) must not take the VM's disk away: the
    disk keeps serving, and SIGTERM still stops it in order."""
    disk = serve(chains.source, chains.dest)
    disk.proc.send_signal(signal.SIGHUP)
    qemu_io(disk.uri, "write -P 0x6b 2M 64k")          # still serving, after the signal arrived
    assert disk.proc.poll() is None, disk.stderr
    qemu_io(disk.uri, "read -P 0x6b 2M 64k")
    assert disk.stop(signal.SIGTERM) == 0, disk.stderr
    check_images(chains)


def test_sigterm_while_a_client_writes(chains, serve, workdir):
    """A client busy writing (a running VM) does not keep mirrorfs from stopping, and no write is left
    half-mirrored: every request nbdkit took was finished on both sides before it exited."""
    disk = serve(chains.source, chains.dest)
    kids = children(disk)
    with open(workdir / "fio.log", "w") as log:
        fio = subprocess.Popen(
            ["fio", "--name=vm", "--ioengine=nbd", f"--uri={disk.uri}", "--rw=randwrite", "--bs=4k-64k",
             "--iodepth=8", "--size=32m", "--time_based", "--runtime=3600", "--randrepeat=0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        # Stop it in the middle of the I/O: once nbdkit has received a few MiB from fio (nbdkit read()s
        # its clients' requests, so they count in its read_chars).
        deadline = time.monotonic() + 120
        before = kids["nbdkit"].io_counters().read_chars
        while kids["nbdkit"].io_counters().read_chars - before < 4 * MiB:
            assert fio.poll() is None and time.monotonic() < deadline, (workdir / "fio.log").read_text()
            time.sleep(0.02)
        # fio would write for an hour: stopping must not wait for the client to go.
        assert disk.stop(signal.SIGTERM, timeout=GONE_TIMEOUT * 4) == 0, disk.stderr
    finally:
        if fio.poll() is None:
            fio.kill()
        fio.wait(10)
    assert fio.returncode != 0              # the server went away under it
    assert not still_running(kids.values()), kids
    check_images(chains)


def test_sigkill_of_mirrorfs_takes_its_children_along(chains, serve):
    disk = serve(chains.source, chains.dest)
    kids = children(disk)
    qemu_io(disk.uri, "write -P 0x6b 2M 128k", "write -z 9M 1M", "discard 3M 1M")

    disk.proc.kill()
    disk.proc.wait(GONE_TIMEOUT)
    # The kernel sends the storage daemons SIGTERM (PR_SET_PDEATHSIG) and nbdkit SIGKILL (its death
    # signal set back by mirrorfs/datapath/nbdkit/lifeline.py).
    left = still_running(kids.values(), timeout=GONE_TIMEOUT)
    assert not left, f"orphans: {[' '.join(p.cmdline()) for p in left]}"
    # SIGTERM let each storage daemon close its image properly: both are consistent and identical.
    check_images(chains)
    qemu_io(chains.dest, "read -P 0x6b 2M 128k", "read -P 0 9M 1M", fmt="qcow2")


def test_restart_after_sigkill_replaces_the_stale_socket(chains, serve):
    disk = serve(chains.source, chains.dest)
    kids = children(disk)
    qemu_io(disk.uri, "write -P 0x3c 0 64k")
    disk.proc.kill()
    disk.proc.wait(GONE_TIMEOUT)
    assert not still_running(kids.values(), timeout=GONE_TIMEOUT)
    assert disk.socket.is_socket()          # nobody was left to remove it

    again = serve(chains.source, chains.dest)
    assert again.socket == disk.socket
    qemu_io(again.uri, "read -P 0x3c 0 64k")
    assert again.stop() == 0, again.stderr
    assert not again.socket.exists()
    check_images(chains)


@pytest.mark.parametrize("victim,name", [
    ("nbdkit", "nbdkit"),
    ("src", "qemu-storage-daemon (src"),
    ("dst", "qemu-storage-daemon (dst"),
])
def test_a_child_dying_is_fatal(victim, name, chains, serve, workdir):
    disk = serve(chains.source, chains.dest)
    kids = children(disk)
    qemu_io(disk.uri, "write -P 0x21 4M 64k")

    kids[victim].kill()
    rc = disk.proc.wait(GONE_TIMEOUT * 2)
    err = disk.stderr
    assert rc > 0, f"exit status {rc}: {err!r}"
    assert "Traceback" not in err, err
    *relayed, last = err.splitlines()
    assert last.startswith("mirrorfs: error: ") and name in last and "exited unexpectedly" in last, err
    if victim == "nbdkit":
        assert relayed == [], err
    else:
        # nbdkit, stopped after a storage daemon died, may report that it could not flush that side;
        # mirrorfs relays the data path's log to stderr as it comes, so such lines come first.
        assert all(line.startswith("mirrorfs[nbdkit]: ") for line in relayed), err
    assert "stopped" not in disk.out.read_text()
    # The others were stopped before mirrorfs exited.
    left = still_running(kids.values())
    assert not left, f"left running: {[' '.join(p.cmdline()) for p in left]}"
    assert not disk.socket.exists()
    assert rundirs(workdir) == []
    # The write completed on both sides before the kill; a daemon killed with -9 may leak clusters
    # (qemu-img check exit 3 is "leaks only"), but it must never be corrupt.
    for image in (chains.source, chains.dest):
        res = run("qemu-img", "check", image, check=False)
        assert res.returncode in (0, 3), f"qemu-img check {image}: {res.stdout}{res.stderr}"
        qemu_io(image, "read -P 0x21 4M 64k", fmt="qcow2")


def test_sockets_are_private(chains, serve, workdir):
    """The served socket is 0600 and the children's sockets sit in a 0700 directory, even under umask 0."""
    old = os.umask(0)
    try:
        disk = serve(chains.source, chains.dest)
    finally:
        os.umask(old)
    st = os.stat(disk.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    [rundir] = rundirs(workdir)
    assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
    for path in rundir.iterdir():
        if path.is_socket():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
    assert disk.stop() == 0


def test_sigterm_with_an_idle_client_connected(chains, serve):
    """A VM keeps its connection open and may send nothing for a while; stopping must not wait
    for it to leave, and must not leave the sides different."""
    import nbd
    disk = serve(chains.source, chains.dest)
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(b"i" * 65536, 4096)
    disk.proc.send_signal(signal.SIGTERM)
    assert disk.proc.wait(GONE_TIMEOUT) == 0     # nbdkit alone would wait for the client forever
    del h
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


def test_a_child_stopped_on_purpose_has_not_died(workdir):
    """The supervisor's watch loop treats a child's exit as fatal unless the child is being
    stopped: after a switch the retired side's daemon is stopped while that loop runs in another
    thread (it once took a whole migration down right after a successful pivot)."""
    stopped = Child("sleep", ["sleep", "60"], workdir / "stopped.log")
    killed = Child("sleep", ["sleep", "60"], workdir / "killed.log")
    stopped.start()
    killed.start()
    try:
        assert not stopped.died() and not killed.died()
        stopped.stop()
        os.kill(killed.pid, signal.SIGKILL)
        killed.proc.wait(10)
        assert not stopped.alive() and not stopped.died()
        assert not killed.alive() and killed.died()
    finally:
        stopped.stop()
        killed.stop()
