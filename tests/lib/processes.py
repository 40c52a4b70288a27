"""The processes the tests start: found by what their command line names, watched until gone, and
killed on purpose (a crash)."""

import signal
import time

import psutil

CHILD_NAMES = ("nbdkit", "qemu-storage-daemon", "qemu-nbd")

# Deadlines only: a hang fails, a busy machine does not.
GONE_TIMEOUT = 30


def our_processes(marker):
    """nbdkit / qemu-* processes whose command line mentions `marker` (a test's directory)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if any(n in (p.info["name"] or "") or n in cmd for n in CHILD_NAMES) and marker in cmd:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def children(disk):
    """The children of a `mirrorfs serve` (a Served) by role: {"nbdkit": p, "src": p, "dst": p}."""
    found = {}
    for p in psutil.Process(disk.proc.pid).children():
        cmd = " ".join(p.cmdline())
        if p.name() == "nbdkit":
            found["nbdkit"] = p
        elif p.name() == "qemu-storage-daemon":
            role = "src" if "/src.pid" in cmd else "dst" if "/dst.pid" in cmd else cmd
            found[role] = p
        else:
            raise AssertionError(f"unexpected child of mirrorfs: {cmd}")
    assert sorted(found) == ["dst", "nbdkit", "src"], found
    return found


def gone(p):
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def still_running(procs, timeout=0.0):
    """The processes among `procs` still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if not gone(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def kill_mirrorfs(pid, also=()):
    """kill -9 of mirrorfs and its nbdkit (the data path first), as in a crash, plus the processes
    in `also`. Waits until all of them and every child of mirrorfs are gone: the storage daemons
    exit on the SIGTERM the kernel sends them (PR_SET_PDEATHSIG)."""
    proc = psutil.Process(pid)
    victims = [proc] + proc.children(recursive=True)
    nbdkit = [p for p in victims if p.name() == "nbdkit"]
    assert nbdkit, "mirrorfs has no nbdkit child"
    for p in [*nbdkit, proc, *also]:
        p.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(victims + list(also), timeout=30)
    assert not alive, f"still running after kill -9: {alive}"
