"""Phase changes that race, a destination that dies before the pivot, and degraded writes in copy
mode none (issue #11, findings 1–3).

The question each test asks: is every acknowledged write on the side the state says serves the disk,
and did the loser of a race get a refusal with a reason rather than a half-applied change?
"""

import random
import signal
import threading
import time

import nbd
import psutil
import pytest

from lib.commands import EXIT_ERROR, MIRRORFS, run
from lib.control import control_request, saved_state
from lib.images import MiB, images_identical, make_full_pair, qemu_io
from lib.nbdservers import NbdkitFilter
from lib.waits import wait_until

SIZE = 32 * MiB
BLOCK = 4096


def status(disk):
    return control_request(disk.control, {"cmd": "status"})["status"]


def wait_phase(disk, phase, timeout=120):
    return wait_until(lambda: (s := status(disk))["phase"] == phase and s, phase, timeout=timeout)


def saved_phase(state_dir):
    return saved_state(state_dir)["phase"]


class Writer:
    """Writes a fresh pattern to random 4 KiB blocks until stopped; remembers what was acknowledged.
    Any failure before `stop()` fails the test (the client must never see an error here)."""

    def __init__(self, uri, seed):
        self.uri, self.rng = uri, random.Random(seed)
        self.acked = {}
        self.in_flight = None           # (block, value) of the write not yet answered
        self.errors = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self._stop.is_set():
                block = self.rng.randrange(SIZE // BLOCK)
                value = self.rng.randrange(1, 256)
                self.in_flight = (block, value)
                h.pwrite(bytes([value]) * BLOCK, block * BLOCK)
                self.acked[block] = value
                self.in_flight = None
                self.count += 1
            h.shutdown()
        except nbd.Error as e:
            if not self._stop.is_set():
                self.errors.append(e)

    def wait_writes(self, n):
        """Until `n` writes in all were acknowledged; a failed write fails the test at once."""
        wait_until(lambda: self.errors or self.count >= n, f"{n} writes acknowledged")
        assert self.errors == [], self.errors

    def stop(self):
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        assert self.errors == [], self.errors
        assert self.count > 0, "the writer wrote nothing"

    def check(self, uri):
        """Every acknowledged block reads back from `uri`. The write in flight when mirrorfs was
        killed (if any) may or may not have landed: its block may hold either value."""
        h = nbd.NBD()
        h.connect_uri(uri)
        maybe = dict([self.in_flight]) if self.in_flight else {}
        wrong = [b for b, v in self.acked.items()
                 if h.pread(BLOCK, b * BLOCK) not in (bytes([v]) * BLOCK,
                                                      bytes([maybe.get(b, v)]) * BLOCK)]
        h.shutdown()
        assert not wrong, (f"{len(wrong)} of {len(self.acked)} acknowledged blocks lost, e.g. "
                           f"{wrong[:5]} (in flight at the kill: {self.in_flight})")


def synchronized_mirror(workdir, serve, name):
    """`serve --copy full --state-dir` of a fresh pair, synchronized."""
    root = workdir / name
    root.mkdir()
    src, dst = make_full_pair(root, SIZE)
    state = root / "state"
    disk = serve("--copy", "full", "--state-dir", state, "--region", "1M", src, dst, name=name)
    wait_phase(disk, "synchronized")
    return disk, src, dst, state


@pytest.mark.parametrize("gap_ms", [0, 5, 10, 20, 30])
def test_pivot_and_cancel_racing_one_wins_the_state_agrees(gap_ms, workdir, serve):
    """Finding 1: two control clients, pivot and cancel gap_ms apart, on a synchronized mirror
    under writes. Before the fix both answered ok: the data path switched, the state said
    cancelled, and a restart served the source without hundreds of acknowledged writes."""
    disk, src, dst, state = synchronized_mirror(workdir, serve, f"r{gap_ms}")
    writer = Writer(disk.uri, seed=gap_ms)
    writer.wait_writes(50)                   # writing, and goes on while the commands race
    replies = {}
    first, second = ("pivot", "cancel") if gap_ms % 10 == 0 else ("cancel", "pivot")

    def send(cmd, delay):
        time.sleep(delay)
        replies[cmd] = control_request(disk.control, {"cmd": cmd})

    threads = [threading.Thread(target=send, args=(first, 0)),
               threading.Thread(target=send, args=(second, gap_ms / 1000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    writer.wait_writes(writer.count + 50)    # writes after the winner's switch
    writer.stop()

    won = [cmd for cmd, r in replies.items() if r["ok"]]
    assert len(won) == 1, replies
    lost = ({"pivot", "cancel"} - set(won)).pop()
    assert "in progress" in replies[lost]["error"] or "while" in replies[lost]["error"], replies
    end = "switched" if won == ["pivot"] else "cancelled"
    s = status(disk)
    assert s["phase"] == end and s["serving"] == ("destination" if end == "switched" else "source")
    assert s["datapath"]["ended"] == end
    assert saved_phase(state) == end

    # A restart on the same state serves the winner's side, which holds every acknowledged write.
    assert disk.stop() == 0, disk.stderr
    again = serve("--copy", "full", "--state-dir", state, "--region", "1M", src, dst,
                  name=f"r{gap_ms}")
    assert status(again)["phase"] == end
    writer.check(again.uri)


def nbdkit_of(disk):
    """The nbdkit process serving `disk` and its data path's control socket."""
    for p in psutil.Process(disk.proc.pid).children():
        if p.name() == "nbdkit":
            ctl = next(a.split("=", 1)[1] for a in p.cmdline() if a.startswith("control="))
            return p, ctl
    raise AssertionError("no nbdkit child")


def test_the_data_path_allows_one_switch_ever(workdir, serve):
    """The data path's own guard, below the controller's lock: two switches sent straight to it at
    once, to opposite sides: one wins, the other is refused, and a third after both too."""
    disk, *_ , state = synchronized_mirror(workdir, serve, "dp")
    _, ctl = nbdkit_of(disk)
    replies = []
    barrier = threading.Barrier(2)

    def send(to, end):
        barrier.wait()
        replies.append(control_request(ctl, {"cmd": "switch", "to": to, "end": end}))

    threads = [threading.Thread(target=send, args=a)
               for a in (("destination", "switched"), ("source", "cancelled"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r["ok"] for r in replies) == [False, True], replies
    refused = next(r for r in replies if not r["ok"])
    assert "switch refused" in refused["error"], refused
    late = control_request(ctl, {"cmd": "switch", "to": "source", "end": "cancelled"})
    assert not late["ok"] and "already ended" in late["error"], late
    dp = control_request(ctl, {"cmd": "status"})["status"]
    assert saved_phase(state) == dp["ended"]


@pytest.mark.parametrize("command,delay_ms", [("pivot", 0), ("pivot", 3), ("pivot", 15),
                                              ("cancel", 0), ("cancel", 3), ("cancel", 15)])
def test_kill_9_during_a_switch_restarts_on_the_right_side(command, delay_ms, workdir, serve):
    """kill -9 of the supervisor and nbdkit at a point of a pivot or cancel: after a restart, the
    side the state names serves, and it holds every acknowledged write."""
    disk, src, dst, state = synchronized_mirror(workdir, serve, f"k{command}{delay_ms}")
    writer = Writer(disk.uri, seed=delay_ms)
    writer.wait_writes(20)                   # writing when the switch starts, and during it
    nbdkit, _ = nbdkit_of(disk)
    sender = threading.Thread(target=lambda: _quietly(control_request, disk.control, {"cmd": command}))
    sender.start()
    time.sleep(delay_ms / 1000)
    disk.proc.send_signal(signal.SIGKILL)
    nbdkit.kill()
    sender.join(30)
    writer._stop.set()
    writer._thread.join(30)
    disk.proc.wait(10)
    psutil.wait_procs([nbdkit], timeout=10)
    assert writer.count > 0

    end = saved_phase(state)
    again = serve("--copy", "full", "--state-dir", state, "--region", "1M", src, dst,
                  name=f"k{command}{delay_ms}")
    s = status(again)
    if end in ("switched", "cancelled"):
        assert s["phase"] == end
    else:
        s = wait_phase(again, "synchronized")
        assert s["serving"] is None
    # Blocks whose last write was in flight at the kill may hold either value: only writes that
    # were acknowledged before it, and not written again, are certain.
    writer.check(again.uri)


def _quietly(fn, *args):
    try:
        fn(*args)
    except (OSError, ValueError):
        pass                    # the supervisor was killed under the request


def test_pivot_to_a_dead_destination_is_refused(workdir, serve, qemu_nbd):
    """Finding 3: a URI destination killed after synchronized. The pivot must be refused (the
    data path proves the destination answers, under the drain), the source keeps serving, and
    client requests go on working."""
    src, dst = make_full_pair(workdir, SIZE)
    export = qemu_nbd(dst, "dst-export")
    disk = serve("--copy", "full", "--io-timeout", "0", src, export.uri)
    wait_phase(disk, "synchronized")
    export.stop()
    reply = control_request(disk.control, {"cmd": "pivot"})
    assert not reply["ok"] and "does not answer" in reply["error"], reply
    s = status(disk)
    assert s["phase"] != "switched" and s["datapath"]["reader"] == "source"
    qemu_io(disk.uri, "read -P 0x30 0 1M")                  # the source still serves reads


def test_degraded_writes_are_copied_again_in_copy_mode_none(workdir, serve, qemu_nbd):
    """Finding 2: copy mode none (what `start` builds) with a state directory and degrade: while
    the destination fails, writes succeed and the state says copying (not synchronized); once it
    heals, the copier copies them again, the state says synchronized, and pivot is allowed."""
    src, dst = make_full_pair(workdir, SIZE)
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "qcow2", src, dst)   # equal sides
    export = qemu_nbd(dst, "dst-export")
    trigger = workdir / "fail-writes"
    faulty = NbdkitFilter(workdir, "faulty", export.socket, "--filter=error", "error-pwrite=ENOSPC",
                          "error-pwrite-rate=100%", f"error-pwrite-file={trigger}")
    state = workdir / "state"
    try:
        disk = serve("--state-dir", state, "--region", "1M", "--on-dest-error", "degrade",
                     src, faulty.uri)
        assert wait_phase(disk, "synchronized")
        trigger.touch()
        qemu_io(disk.uri, "write -P 0x71 3M 64k", "write -P 0x72 17M 4k")
        s = status(disk)
        assert s["phase"] == "copying" and s["datapath"]["sides"]["destination"]["degraded"] >= 2
        assert saved_phase(state) == "copying"
        refused = run(*MIRRORFS, "pivot", "--control", disk.control, check=False)
        assert refused.returncode == EXIT_ERROR and "may still differ" in refused.stderr, refused.stderr
        assert "MiB" in refused.stderr                      # a human size, not a byte count
        trigger.unlink()                                    # the destination has space again
        wait_phase(disk, "synchronized", timeout=60)
        wait_until(lambda: saved_phase(state) == "synchronized", "state.json synchronized", timeout=10)
        assert "switched" in run(*MIRRORFS, "pivot", "--control", disk.control).stdout
        assert disk.stop() == 0
    finally:
        faulty.stop()
    export.stop()
    identical, detail = images_identical(src, dst)
    assert identical, detail
