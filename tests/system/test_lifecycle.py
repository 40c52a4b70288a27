"""The life of a disk (issue #12): served by a plain export, taken over by a migration, copied,
switched, handed back, migrated again; and restarts of mirrorfs in every way it can end. The client
is QEMU's own NBD client with reconnection on (qemu-io, `reconnect-delay`): the question each test
asks is whether any of its writes failed, and whether every one of them is on the disk afterwards.
"""

import json
import os
import signal
import socket
import subprocess

import pytest

from lib.commands import EXIT_ERROR, MIRRORFS, run
from lib import control
from lib.control import status
from lib.images import MiB, images_identical, make_base, qemu_io
from lib.readme import check_commands
from lib.reconnecting import RECONNECT_DELAY, ReconnectingWriter
from lib.served import Process
from lib.waits import wait_until

@pytest.fixture
def processes():
    started = []

    def start(*args, **kw):
        p = Process(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


RAN = []                        # the commands ctl() ran, as docs/OPERATING.md writes them


def ctl(path, *args, check=True):
    """lib.control.ctl, recorded in RAN."""
    RAN.append(["mirrorfs", *map(str, args), "--control", str(path)])
    return control.ctl(path, *args, check=check)


# Restarts.

@pytest.mark.parametrize("how", ["sigterm", "kill-9-supervisor", "kill-9-nbdkit",
                                 "kill-9-source-daemon", "kill-9-destination-daemon"])
def test_a_restart_fails_no_request(how, workdir, processes):
    """A client with reconnection writes while mirrorfs is stopped (or killed) and started again
    on the same socket and state: no write fails, and every one is on both sides."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    for image in (src, dst):
        run("qemu-img", "create", "-q", "-f", "qcow2", image, str(64 * MiB))
    argv = ("serve", src, dst, "--socket", workdir / "d.sock", "--state-dir", workdir / "state")
    disk = processes(workdir, "serve1", *argv)
    writer = ReconnectingWriter(workdir / "d.sock")
    writer.wait_sent(100)
    if how == "sigterm":
        assert disk.stop() == 0
    elif how == "kill-9-supervisor":
        disk.kill_tree()
    else:
        # A child of the supervisor killed: it says so and stops everything, leaving requests
        # unanswered (a request that lost its source is held, not failed); the restart serves them.
        program, mark = {"kill-9-nbdkit": ("nbdkit", ""),
                         "kill-9-source-daemon": ("qemu-storage-daemon", "src.pid"),
                         "kill-9-destination-daemon": ("qemu-storage-daemon", "dst.pid")}[how]
        child = next(p for p in disk.proc.children()
                     if p.name().startswith(program[:15]) and mark in " ".join(p.cmdline()))
        child.kill()
        assert disk.proc.wait(60) == EXIT_ERROR, disk.err.read_text()
    again = processes(workdir, "serve2", *argv)
    wait_until(lambda: status(again.control)["phase"] == "synchronized", "synchronized")
    writer.wait_sent(200)
    writer.stop()
    writer.check(f"nbd+unix:///?socket={workdir / 'd.sock'}")
    assert again.stop() == 0
    identical, detail = images_identical(src, dst)
    assert identical, detail


# The life of a disk.

def migrate(workdir, processes, export_ctl, dest_dir, name, *extra):
    """Take the disk over from its export, copy, pivot, hand back (with ctl: RAN has them);
    returns the migration."""
    dest_dir.mkdir()
    m = processes(workdir, name, "start", "--take-over", export_ctl, "--dest-dir", dest_dir, *extra)
    assert status(export_ctl)["phase"] == "lent"
    ctl(m.control, "copy")
    assert "switched" in ctl(m.control, "pivot").stdout
    out = ctl(m.control, "hand-back").stdout
    assert "handed back" in out
    assert m.proc.wait(30) == 0
    assert status(export_ctl)["phase"] == "exporting"
    return m


def chain_of(image):
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", "--backing-chain", image).stdout)
    return [layer["filename"] for layer in info]


def test_export_take_over_hand_back_and_migrate_again(workdir, processes):
    """A → B → C on one running client: export, take over, copy, pivot, hand back, twice. No write
    fails; every write is on the final chain; the chain does not grow. The commands are
    docs/OPERATING.md's ("The life of a disk")."""
    (workdir / "a").mkdir()
    base = make_base(workdir / "a" / "vm1.qcow2", 128 * MiB)
    sock = workdir / "vm1.sock"
    exported = processes(workdir, "export", "export", base, "--socket", sock)
    writer = ReconnectingWriter(sock)
    writer.wait_sent(50)
    RAN.clear()
    to_b = migrate(workdir, processes, exported.control, workdir / "b", "to-b")
    served = status(exported.control)["source"]["spec"]
    assert served == str(workdir / "b" / "vm1-snap.qcow2")
    writer.wait_sent(writer.sent + 50)
    to_c = migrate(workdir, processes, exported.control, workdir / "c", "to-c")
    final = status(exported.control)["source"]["spec"]
    assert final == str(workdir / "c" / "vm1-snap-snap.qcow2")
    writer.wait_sent(writer.sent + 50)
    writer.stop()
    writer.check(f"nbd+unix:///?socket={sock}")
    qemu_io(f"nbd+unix:///?socket={sock}", f"read -P {0x10 + 63} {63 * MiB} {MiB}")   # the base's
    assert exported.stop() == 0
    # The destination is always the flattened copy plus one overlay.
    assert chain_of(final) == [final, str(workdir / "c" / "vm1-snap.qcow2")]
    assert not any(str(workdir / d) in p for p in chain_of(final) for d in ("a", "b"))
    writer.check(final, fmt="qcow2")
    check_commands("The life of a disk: export, take over, hand back, migrate again", {
        "/srv/a": str(workdir / "a"), "/srv/b": str(workdir / "b"), "/srv/c": str(workdir / "c"),
        "/run/vm1.sock": str(sock)}, [exported.argv, to_b.argv, to_c.argv, *RAN])


def test_a_migration_killed_during_the_copy_resumes_on_the_same_socket(workdir, processes):
    """kill -9 of the migration's supervisor while the base is copied: the export keeps the socket,
    a restart with the same state borrows it again and resumes; copy, pivot, hand back."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    base = make_base(workdir / "a" / "disk.qcow2", 64 * MiB)
    sock = workdir / "vm.sock"
    exported = processes(workdir, "export", "export", base, "--socket", sock)
    writer = ReconnectingWriter(sock)
    argv = ("start", "--take-over", exported.control, "--dest-dir", workdir / "b",
            "--state-dir", workdir / "state")
    first = processes(workdir, "first", *argv)
    ctl(first.control, "copy", "--background", "--rate", "4M")
    wait_until(lambda: (status(first.control).get("copy") or {}).get("bytes_done"), "copying")
    assert status(first.control)["phase"] == "copying-base"
    writer.wait_sent(100)
    first.kill_tree()
    lent = status(exported.control)
    assert lent["phase"] == "lent" and lent["lent"]["alive"] is False
    again = processes(workdir, "again", *argv)
    assert status(again.control)["phase"] == "mirroring"
    ctl(again.control, "copy")
    ctl(again.control, "pivot")
    writer.wait_sent(writer.sent + 50)
    ctl(again.control, "hand-back")
    assert again.proc.wait(30) == 0
    writer.wait_sent(writer.sent + 50)
    writer.stop()
    writer.check(f"nbd+unix:///?socket={sock}")
    assert status(exported.control)["source"]["spec"] == str(workdir / "b" / "disk-snap.qcow2")


# Bad input.

def test_taking_over_what_is_not_an_export_changes_nothing(workdir, processes, chains):
    (workdir / "b").mkdir()
    res = run(*MIRRORFS, "start", "--take-over", workdir / "nothing.ctl", "--dest-dir", workdir / "b",
              check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "cannot take the disk over" in res.stderr and "no control socket" in res.stderr

    served = processes(workdir, "serve", "serve", chains.source, chains.dest,
                       "--socket", workdir / "s.sock")
    res = run(*MIRRORFS, "start", "--take-over", served.control, "--dest-dir", workdir / "b",
              check=False)
    assert res.returncode == 2 and "not the control socket of a mirrorfs export" in res.stderr
    assert status(served.control)["phase"] == "synchronized"


def test_a_failed_take_over_leaves_the_export_serving(workdir, processes):
    (workdir / "a").mkdir()
    base = make_base(workdir / "a" / "disk.qcow2", 16 * MiB)
    sock = workdir / "vm.sock"
    exported = processes(workdir, "export", "export", base, "--socket", sock)
    qemu_io(f"nbd+unix:///?socket={sock}", "write -P 0x42 0 64k")
    res = run(*MIRRORFS, "start", "--take-over", exported.control, "--dest-dir",
              workdir / "missing", check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    assert status(exported.control)["phase"] == "exporting"
    assert sorted(p.name for p in (workdir / "a").iterdir()) == ["disk.qcow2"]
    qemu_io(f"nbd+unix:///?socket={sock}", "read -P 0x42 0 64k")
    # Lent to a live migration: a second one is refused, the first goes on.
    (workdir / "b").mkdir()
    (workdir / "c").mkdir()
    first = processes(workdir, "first", "start", "--take-over", exported.control,
                      "--dest-dir", workdir / "b")
    res = run(*MIRRORFS, "start", "--take-over", exported.control, "--dest-dir", workdir / "c",
              "--control", workdir / "second.ctl", check=False)
    assert res.returncode == 2 and "lent to a migration already" in res.stderr, res.stderr
    assert status(first.control)["phase"] == "mirroring"


def test_hand_back_only_after_the_end_of_a_taken_over_migration(workdir, processes, migration):
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    base = make_base(workdir / "a" / "disk.qcow2", 16 * MiB)
    exported = processes(workdir, "export", "export", base, "--socket", workdir / "vm.sock")
    m = processes(workdir, "m", "start", "--take-over", exported.control, "--dest-dir", workdir / "b")
    res = ctl(m.control, "hand-back", check=False)
    assert res.returncode == 1 and "cannot hand-back while mirroring" in res.stderr, res.stderr
    ctl(m.control, "copy", "--background", "--rate", "1M")
    res = ctl(m.control, "hand-back", check=False)
    assert res.returncode == 1 and "cannot hand-back while copying-base" in res.stderr, res.stderr
    assert status(exported.control)["phase"] == "lent"

    plain = migration.start()                           # not taken over from an export
    migration.ctl("copy")
    migration.ctl("pivot")
    res = migration.ctl("hand-back", check=False)
    assert res.returncode == 1 and "did not take the disk over" in res.stderr, res.stderr
    assert json.loads(migration.ctl("status", "--json").stdout)["phase"] == "switched"
    assert plain.proc.poll() is None


# Running it as a service.

def test_the_readiness_protocol(workdir, processes):
    """Type=notify: READY=1 once clients can connect, STATUS= as the disk changes hands, and
    STOPPING=1, as datagrams to $NOTIFY_SOCKET (a real datagram socket: no systemd here)."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    base = make_base(workdir / "a" / "disk.qcow2", 16 * MiB)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(workdir / "notify"))
    listener.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(workdir / "notify"))
    exported = processes(workdir, "export", "export", base, "--socket", workdir / "vm.sock", env=env)
    ready = dict(line.split("=", 1) for line in listener.recv(4096).decode().splitlines())
    assert ready["READY"] == "1" and ready["MAINPID"] == str(exported.proc.pid)
    assert "exporting" in ready["STATUS"]
    processes(workdir, "m", "start", "--take-over", exported.control, "--dest-dir", workdir / "b")
    assert listener.recv(4096).decode().startswith("STATUS=lent to migration pid")
    exported.stop()
    assert b"STOPPING=1" in listener.recv(4096)
    listener.close()


def test_take_over_and_hand_back_under_fio_verify(workdir, processes):
    """fio with verify=crc32c writes all along through a take-over, copy, pivot and hand-back. fio's
    nbd engine does not reconnect, so it talks to QEMU's NBD client, which does: a qemu-nbd whose
    image is the disk's socket with reconnect-delay. fio must finish with no error and every block
    it wrote verified."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", workdir / "a" / "vm1.qcow2", str(128 * MiB))
    sock, proxy_sock = workdir / "vm1.sock", workdir / "proxy.sock"
    exported = processes(workdir, "export", "export", workdir / "a" / "vm1.qcow2", "--socket", sock)
    proxy = subprocess.Popen(
        ["qemu-nbd", "--image-opts",
         f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},"
         f"file.reconnect-delay={RECONNECT_DELAY}", "-k", proxy_sock, "--persistent", "--shared=8",
         "--pid-file", workdir / "proxy.pid"], stderr=subprocess.DEVNULL)
    fio = None
    try:
        wait_until(lambda: (workdir / "proxy.pid").exists(), "the proxy up")
        fio = subprocess.Popen(
            ["fio", "--name=verify", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={proxy_sock}",
             "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=64M", "--verify=crc32c",
             "--verify_backlog=256", "--verify_state_save=0", "--time_based", "--runtime=600",
             "--thread"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
        # fio is writing (it runs until told to stop): the export's image grows by the clusters
        # its first writes allocate.
        image = workdir / "a" / "vm1.qcow2"
        empty = image.stat().st_size
        wait_until(lambda: fio.poll() is not None or image.stat().st_size >= empty + 4 * MiB,
                   "4 MiB of fio's writes on the export's image")
        assert fio.poll() is None, fio.stdout.read()
        m = processes(workdir, "m", "start", "--take-over", exported.control,
                      "--dest-dir", workdir / "b")
        ctl(m.control, "copy")
        ctl(m.control, "pivot")
        ctl(m.control, "hand-back")
        assert m.proc.wait(30) == 0
        assert fio.poll() is None, fio.stdout.read()
        fio.send_signal(signal.SIGINT)  # stop: fio ends its job and reports
        out, _ = fio.communicate(timeout=120)
        # An I/O error or a block that fails its checksum makes fio report err= (non-zero) and
        # print what it found ("verify: bad ...", "crc32c: verify failed").
        assert "err= 0" in out and " bad " not in out and "failed" not in out, out[-2000:]
        iops = out.split("write: IOPS=")[1].split(",")[0]        # "5190" or "5.2k"
        assert float(iops.rstrip("k")) > 0, out
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        proxy.terminate()
        proxy.wait(30)
    assert status(exported.control)["source"]["spec"] == str(workdir / "b" / "vm1-snap.qcow2")
