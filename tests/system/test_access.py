"""Who can reach the disk and what a client can make mirrorfs do: private sockets (or a group's),
one export name, no request outside the disk, control requests checked, no file named by a client."""

import grp
import json
import os
import socket
import stat
import time
from pathlib import Path

import nbd
import psutil
import pytest

from lib.commands import run
from lib.failures import snapshot
from lib.images import MiB, images_identical, qemu_io

GROUP = "nogroup"               # in every Debian's base-passwd


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def rundir_of(served):
    """mirrorfs's private run directory, from its nbdkit child's --pidfile."""
    for child in psutil.Process(served.proc.pid).children(recursive=True):
        cmd = child.cmdline()
        if cmd and cmd[0] == "nbdkit":
            return Path(cmd[cmd.index("--pidfile") + 1]).parent
    raise AssertionError("no nbdkit child")


def test_sockets_are_private(chains, serve):
    disk = serve(chains.source, chains.dest)
    assert mode(disk.socket) == 0o600 and mode(disk.control) == 0o600
    rundir = rundir_of(disk)
    assert mode(rundir) == 0o700
    for name in ("datapath.ctl", "src.sock", "dst.sock", "src.qmp", "dst.qmp"):
        assert mode(rundir / name) == 0o600, name
    assert disk.stop() == 0


def check_group_sockets(disk):
    gid = grp.getgrnam(GROUP).gr_gid
    for path in (disk.socket, disk.control):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid, path
    assert mode(rundir_of(disk)) == 0o700          # the data path's own sockets stay private
    qemu_io(disk.uri, "write -P 0x11 0 64k")
    assert disk.stop() == 0


def test_group_shares_the_sockets_of_serve(chains, serve):
    check_group_sockets(serve(chains.source, chains.dest, "--group", GROUP))


def test_group_shares_the_sockets_of_start(migration):
    check_group_sockets(migration.start("--group", GROUP))


def test_only_the_default_export(chains, serve):
    disk = serve(chains.source, chains.dest)
    for name in ("disk", "../../etc/passwd", str(chains.dest), "x" * 4096):
        h = nbd.NBD()
        h.set_export_name(name)
        with pytest.raises(nbd.Error):
            h.connect_unix(str(disk.socket))
    # Listed: the one export, "".
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(disk.socket))
    names = []
    h.opt_list(lambda name, description: names.append(name))
    h.opt_abort()
    assert names == [""]
    qemu_io(disk.uri, "write -P 0x22 0 4k", "read -P 0x22 0 4k")
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


def test_requests_outside_the_disk_are_refused(chains, serve, workdir):
    """libnbd's own bounds checks off, so the requests reach the server as a hostile client would
    send them. Every one fails; the images keep their size and content."""
    size = 64 * MiB
    disk = serve(chains.source, chains.dest)
    before = {p: run("qemu-img", "info", "-U", "--output=json", p).stdout for p in (chains.source,
                                                                                  chains.dest)}
    files = set(snapshot(workdir))
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(disk.uri)
    assert h.get_size() == size
    block = b"\xee" * 4096
    attempts = [
        ("pwrite across the end", lambda: h.pwrite(block, size - 512)),
        ("pwrite at the end", lambda: h.pwrite(block, size)),
        ("pwrite far beyond", lambda: h.pwrite(block, 1 << 40)),
        ("pwrite at 2^64-4096", lambda: h.pwrite(block, (1 << 64) - 4096)),
        ("zero beyond", lambda: h.zero(1 << 20, size)),
        ("zero wrapping", lambda: h.zero(1 << 20, (1 << 64) - 4096)),
        ("trim beyond", lambda: h.trim(1 << 20, size + 4096)),
        ("pread beyond", lambda: h.pread(4096, size)),
    ]
    for what, attempt in attempts:
        with pytest.raises(nbd.Error):
            attempt()
            pytest.fail(f"{what}: accepted")
    # The connection still works, and so does the last block.
    h.pwrite(block, size - 4096)
    assert h.pread(4096, size - 4096) == block
    h.shutdown()
    assert disk.stop() == 0
    for path, info in before.items():
        assert json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)[
            "virtual-size"] == json.loads(info)["virtual-size"]
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    assert set(snapshot(workdir)) - files <= {"disk.out", "disk.err"}


def control_call(path, payload):
    """Send raw bytes on a control socket; the reply line, parsed."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.fspath(path))
        s.sendall(payload)
        return json.loads(s.makefile("rb").readline())


@pytest.mark.parametrize("payload,error", [
    (b"not json\n", "bad request"),
    (b"[1, 2]\n", "bad request"),
    (b'{"command": "status"}\n', "bad request"),
    (b'{"cmd": 7}\n', "bad request"),
    (b'{"cmd": "rm -rf /"}\n', "unknown command"),
    (b'{"cmd": "copy", "rate": "fast"}\n', "copy: rate 'fast': expected a whole number of bytes"),
    (b'{"cmd": "copy", "rate": -1}\n', "copy: rate -1: expected a whole number of bytes"),
    # 0 and a fraction once meant "no limit" (issue #26); null is how "no limit" is sent.
    (b'{"cmd": "copy", "rate": 0}\n', "copy: rate 0: expected a whole number of bytes"),
    (b'{"cmd": "copy", "rate": 0.5}\n', "copy: rate 0.5: expected a whole number of bytes"),
    (b'{"cmd": "rate", "rate": 0.5}\n', "rate: rate 0.5: expected a whole number of bytes"),
    (b'{"cmd": "events", "since": "0; rm"}\n', "since must be a non-negative finite number"),
    (b'{"cmd": "status", "pad": "' + b"x" * (70 * 1024) + b'"}\n', "longer than"),
])
def test_control_requests_are_checked(payload, error, migration):
    disk = migration.start()
    reply = control_call(disk.control, payload)
    assert reply["ok"] is False and error in reply["error"], reply
    # Still serving, still in the same phase, nothing copied.
    assert control_call(disk.control, b'{"cmd": "status"}\n')["status"]["phase"] == "mirroring"
    assert not migration.dest_base.exists()
    assert disk.stop() == 0


def test_control_requests_cannot_name_files(migration, workdir):
    """No command takes a path: fields a client adds are ignored, and nothing appears there."""
    disk = migration.start()
    decoy = workdir / "decoy.qcow2"
    for request in ({"cmd": "status", "path": str(decoy)},
                    {"cmd": "verify", "dest_base": str(decoy), "target": str(decoy)},
                    {"cmd": "copy", "target": str(decoy), "rate": None}):
        reply = control_call(disk.control, json.dumps(request).encode() + b"\n")
        assert reply["ok"], reply
    deadline = time.monotonic() + 30
    while json.loads(migration.ctl("status", "--json").stdout)["copy"]["running"]:
        assert time.monotonic() < deadline, "the copy did not finish"
        time.sleep(0.1)
    # The copy went where it always goes.
    assert migration.dest_base.exists() and not decoy.exists()
    assert disk.stop() == 0
