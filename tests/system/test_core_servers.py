"""The data path's core, driven in this process, against two real `nbdkit memory` servers (with
nbdkit's error and delay filters where a side must misbehave): `Disk` and the copier over
`NbdBackend`, the pools' order, the copier's settle time and cursor, the switch's proof that the
destination answers, the write-intent rule with a write held by the delay filter. The same rules
on memory backends, without a process: tests/unit/test_core.py.
"""

import errno
import subprocess
import threading
import time

import nbd
import pytest

from lib.nbdservers import wait_for_pidfile
from lib.statefiles import new_state, saved
from mirrorfs.datapath.mirror import copier as copier_module
from mirrorfs.datapath.sides.backend import NbdBackend
from mirrorfs.datapath.mirror.copier import Copier
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.mirror.disk import Disk
from mirrorfs.datapath.errors import RequestError, SwitchRefused

MiB = 1 << 20
SIZE = 16 * MiB
REGION = MiB


class Memory:
    """`nbdkit memory` (optionally behind filters) on a unix socket."""

    def __init__(self, workdir, name, *filters, size=SIZE):
        self.socket = workdir / f"{name}.sock"
        pidfile = workdir / f"{name}.pid"
        names = [f for f in filters if f.startswith("--filter=")]
        params = [f for f in filters if not f.startswith("--filter=")]
        self.proc = subprocess.Popen(["nbdkit", "-f", "-U", self.socket, "--pidfile", pidfile,
                                      *names, "memory", str(size), *params],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_pidfile(self.proc, pidfile), "nbdkit memory did not start"
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def read(self, offset, length):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            return h.pread(length, offset)
        finally:
            h.shutdown()

    def write(self, data, offset):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        h.pwrite(data, offset)
        h.shutdown()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self):
        """Die as a crashed server does: connections dropped, nothing answered."""
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def memory(workdir):
    started = []

    def start(name, *filters, size=SIZE):
        m = Memory(workdir, name, *filters, size=size)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


# Disk and copier against real servers.

@pytest.fixture
def disk_on(memory):
    """disk_on(source, dest, ...): a Disk on two Memory servers; its connections are closed at the
    end (before the servers stop: nbdkit waits for connected clients)."""
    made = []

    def make(source, dest, state=None, full=False, policy="fail"):
        src = NbdBackend(source.uri, "source")
        dst = NbdBackend(dest.uri, "destination")
        made.extend((src, dst))
        return Disk(src, dst, DirtyMap(SIZE, REGION, state, full=full), policy=policy,
                    granularity=65536)

    yield make
    for backend in made:
        backend.close()


def test_a_write_reaches_both_sides_before_it_completes(memory, disk_on):
    source, dest = memory("src"), memory("dst")
    disk = disk_on(source, dest)
    disk.pwrite(bytearray(b"\x5a" * 8192), MiB, fua=False)
    assert source.read(MiB, 8192) == dest.read(MiB, 8192) == b"\x5a" * 8192


def test_a_failing_destination_fails_the_request_or_degrades(memory, disk_on):
    source = memory("src")
    dest = memory("dst", "--filter=error", "error-pwrite=ENOSPC", "error-pwrite-rate=100%")
    with pytest.raises(RequestError) as failed:
        disk_on(source, dest).pwrite(bytearray(4096), 0, fua=False)
    assert failed.value.errno == errno.ENOSPC
    degrading = disk_on(source, dest, policy="degrade")
    degrading.pwrite(bytearray(b"\x11" * 4096), 3 * MiB, fua=False)     # succeeds for the client
    assert degrading.dirty.needs_copy == {3}
    assert degrading.stats["destination"].degraded == 1


def test_a_batch_answers_each_command_and_a_dead_server_fails_the_rest(memory):
    """`run_each` (the lag's batches, the copier's chunks) starts its commands with libnbd's
    completion callback and polls until each answered: each command's own outcome, in order; and
    a server that dies with the batch in flight fails every command not answered, at once (a
    lost answer would leave the caller polling forever)."""
    from mirrorfs.datapath.sides.commands import Write, Zero
    from mirrorfs.datapath.errors import SideError
    picky = memory("picky", "--filter=error", "error-zero=EPERM", "error-zero-rate=100%")
    side = NbdBackend(picky.uri, "destination")
    try:
        results = side.run_each([Write(bytearray(b"\x01" * 4096), 0, False),
                                 Zero(4096, MiB, True, False, False),
                                 Write(bytearray(b"\x03" * 4096), 2 * MiB, False)])
        assert results[0] is None and results[2] is None, results
        assert isinstance(results[1], SideError) and results[1].errno == errno.EPERM, results
        assert picky.read(0, 4096) == b"\x01" * 4096 and picky.read(2 * MiB, 4096) == b"\x03" * 4096
    finally:
        side.close()

    slow = memory("slow", "--filter=delay", "delay-write=30")
    side = NbdBackend(slow.uri, "destination")
    answered = []
    batch = threading.Thread(target=lambda: answered.append(side.run_each(
        [Write(bytearray(4096), i * MiB, False) for i in range(4)])))
    batch.start()
    time.sleep(1)                   # the writes are in flight, held by the delay filter
    assert not answered
    slow.kill()
    batch.join(10)
    assert not batch.is_alive(), "the batch still waits for a server that died"
    assert len(answered[0]) == 4 and all(isinstance(r, SideError) for r in answered[0]), answered
    side.close()


def test_requests_take_the_sides_connections_in_one_order(memory, disk_on):
    """Each request holds a connection of each side at once, and the pools are bounded: requests
    that took them in different orders (the source's then the destination's, and the reverse)
    would each hold one the other waits for, forever. One connection per side makes that happen
    within a few requests."""
    disk = disk_on(memory("src"), memory("dst"))
    for side in disk.sides:
        side.max_handles = 1
    done = []

    def writer(n):
        for i in range(200):
            disk.pwrite(bytearray([n]) * 4096, (n * 256 + i % 256) * 4096, fua=False)
        done.append(n)

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
    assert sorted(done) == [0, 1, 2, 3], "requests wait for each other's connections"


def test_one_outage_doubles_the_copiers_wait_once(memory, disk_on, monkeypatch):
    """Every chunk in flight fails together when the destination fails: the copier's wait before
    it tries again (the settle time) doubles once for that round, not once per worker (six workers
    took it from 2 s to the 60 s cap at the first outage). The retry delay is made long so that
    the first round is all that happens while the test looks."""
    monkeypatch.setattr(copier_module, "RETRY_DELAY", 60.0)
    source = memory("src")
    for i in range(0, SIZE, MiB):
        source.write(bytes([1 + i // MiB]) * MiB, i)       # data everywhere: every chunk writes
    # Each write fails only after 500 ms (the delay filter in front of the error filter), so the
    # six workers' chunks are all in flight when the first fails, however late a busy machine
    # starts a worker: a chunk started after the doubling is a new round, and doubles it again.
    dest = memory("dst", "--filter=delay", "--filter=error", "delay-write=500ms",
                  "error-pwrite=EIO", "error-pwrite-rate=100%")
    disk = disk_on(source, dest, full=True)
    copier = Copier(disk, chunk=MiB, workers=6).start()
    try:
        deadline = time.monotonic() + 30
        while copier.failures < 6:
            assert time.monotonic() < deadline, f"{copier.failures} chunks failed, not 6"
            time.sleep(0.01)
        with copier._lock:
            assert (copier.failures, copier._settle) == (6, 2 * copier_module.SETTLE_FIRST)
    finally:
        copier.stop()


def test_the_copier_cursor_never_passes_a_chunk_not_copied(memory, disk_on):
    """The cursor promises that everything below it is on the destination: sampled while a slow
    destination takes the chunks of three workers, the promise holds every time."""
    source = memory("src")
    for i in range(0, SIZE, 2 * MiB):
        source.write(bytes([1 + i // MiB]) * MiB, i)
    dest = memory("dst", "--filter=delay", "delay-write=20ms")
    disk = disk_on(source, dest, full=True)
    copier = Copier(disk, chunk=MiB, workers=3).start()
    samples = 0
    try:
        while not disk.dirty.synchronized():
            cursor = disk.dirty.cursor
            if 0 < cursor < SIZE:
                assert dest.read(0, cursor) == source.read(0, cursor), f"cursor {cursor}"
                samples += 1
            time.sleep(0.05)
    finally:
        copier.stop()
    assert samples > 0, "the copy finished before the cursor could be sampled"
    assert dest.read(0, SIZE) == source.read(0, SIZE)


def test_a_switch_to_a_destination_that_does_not_answer_is_refused(memory, disk_on):
    source, dest = memory("src"), memory("dst")
    disk = disk_on(source, dest)
    disk.pwrite(bytearray(4096), 0, fua=False)                      # the pool holds a connection
    dest.kill()
    with pytest.raises(SwitchRefused, match="does not answer"):
        disk.switch("destination", "switched", timeout=5)
    assert disk.reader is disk.source and disk.ended is None
    buf = bytearray(4096)
    disk.pread(buf, 0)                                   # the source still serves
    disk.switch("source", "cancelled")                   # the other end is still possible
    with pytest.raises(SwitchRefused, match="already ended"):
        disk.switch("source", "cancelled")


def test_a_write_in_flight_below_the_cursor_is_in_the_saved_intent(tmp_path, memory, disk_on):
    """The rule through Disk itself: while a write has reached the source and not the destination
    (held by the delay filter), the saved state names its region. Saving the intent after issuing
    the write (or not at all) fails this every time."""
    source = memory("src")
    dest = memory("dst", "--filter=delay", "delay-write=3")
    state = new_state(tmp_path, copy="none")
    disk = disk_on(source, dest, state=state)
    writer = threading.Thread(target=disk.pwrite, args=(bytearray(b"\x77" * 4096), 6 * MiB),
                              kwargs={"fua": False})
    writer.start()
    deadline = time.monotonic() + 10
    while source.read(6 * MiB, 4096) != b"\x77" * 4096:
        assert time.monotonic() < deadline, "the write never reached the source"
        time.sleep(0.01)
    assert writer.is_alive(), "the destination's write was not held"
    assert dest.read(6 * MiB, 4096) == bytes(4096)
    assert 6 in saved(tmp_path)["dirty"]
    writer.join(30)
