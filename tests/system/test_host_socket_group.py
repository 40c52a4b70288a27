"""The host service's `--socket-group GROUP` (issue #27): every named disk's socket is 0660 and
GROUP's, so that a hypervisor whose QEMU runs as another user (a system libvirt's libvirt-qemu)
can connect, and it stays so through everything that happens to the disk: a loan to a
migration, its pivot and commit, its hand-back, a restart of the service (which adopts the
disks), and a take-back from a migration killed with SIGKILL.

Who may connect is checked the way QEMU would: `nbdinfo` run as the user of the group (the
libvirt tests' `mfsvirt`, tests/lib/libvirt.py) connects; run as `nobody`, it is refused.
"""

import grp
import os
import signal
import stat

import psutil

from lib.commands import EXIT_USAGE, MIRRORFS, run
from lib.hosted import Host
from lib.images import MiB
from lib.libvirt import USER, ensure_user, open_path_to
from lib.waits import wait_until

GROUP = USER


def connects(sock, user):
    """Can `user` (with its groups) open the NBD socket `sock`?"""
    res = run("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "nbdinfo",
              "--size", f"nbd+unix:///?socket={sock}", check=False)
    return res.returncode == 0


def check_shared(sock, when):
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660, (when, oct(st.st_mode))
    assert st.st_gid == grp.getgrnam(GROUP).gr_gid, (when, st.st_gid)
    assert connects(sock, USER), f"{USER} cannot connect {when}"
    assert not connects(sock, "nobody"), f"nobody connects {when}"


def phase(host, name="vm1"):
    return host.disks().get(name, {}).get("phase")


def test_an_unknown_group_is_one_line_and_nothing_starts(workdir):
    (workdir / "run").mkdir()
    res = run(*MIRRORFS, "host", "--registry", workdir / "registry", "--run-dir", workdir / "run",
              "--socket-group", "no-such-group-here", check=False)
    assert res.returncode == EXIT_USAGE, res
    assert res.stderr.count("\n") == 1 and "--socket-group no-such-group-here: no such group" \
        in res.stderr, res.stderr
    assert not (workdir / "run" / "host.ctl").exists()


def test_the_socket_keeps_its_group_through_every_loan(workdir):
    ensure_user()
    (workdir / "a").mkdir()
    open_path_to(workdir / "a", os.getuid())     # workdir traversable by the group's user
    (workdir / "b").mkdir()
    image = workdir / "a" / "vm1.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(64 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 8M", image)
    sock = workdir / "vm1.sock"
    host = Host(workdir, take_back_after=1, options=["--socket-group", GROUP]).start()
    try:
        host.mirrorfs("add", "vm1", image, "--socket", sock)
        wait_until(lambda: phase(host) == "exporting", "vm1 served", timeout=60)
        check_shared(sock, "once added")

        argv = ["start", "vm1", "--dest-dir", workdir / "b", "--state-dir", workdir / "state"]
        m = host.background("m", *argv)
        check_shared(sock, "lent")
        host.mirrorfs("copy", "vm1")
        host.mirrorfs("pivot", "vm1")
        check_shared(sock, "pivoted")
        host.mirrorfs("commit", "vm1")
        check_shared(sock, "committed")
        host.mirrorfs("hand-back", "vm1")
        assert m.wait(60) == 0, m.err.read_text()
        wait_until(lambda: phase(host) == "exporting", "vm1 handed back", timeout=60)
        check_shared(sock, "handed back")

        # A restart of the service adopts the daemon and its socket.
        host.kill(signal.SIGKILL)
        host.start()
        wait_until(lambda: phase(host) == "exporting", "vm1 adopted", timeout=60)
        check_shared(sock, "adopted")

        # A migration killed with SIGKILL: the service takes the disk back.
        (workdir / "c").mkdir()
        m = host.background("m2", "start", "vm1", "--dest-dir", workdir / "c")
        check_shared(sock, "lent again")
        kids = m.children(recursive=True)
        m.kill()
        psutil.wait_procs([m, *kids], timeout=30)
        wait_until(lambda: phase(host) == "exporting", "vm1 taken back", timeout=60)
        check_shared(sock, "taken back")
    finally:
        host.close()
