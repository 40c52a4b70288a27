"""The bounded lag (mirrorfs.datapath.mirror.lag) in this process, on memory backends (the same verbs as
NbdBackend, a destination held on purpose): the order of changes per cluster on the destination,
one change per cluster at a time on it, the bound, the write intent kept until the destination has
a change, and the lag becoming the resync when the destination fails. The same rules with real
processes, kill -9 and a slow destination are in tests/test_lag.py.
"""

import threading
import time

import pytest

from lib.waits import wait_until
from mirrorfs.datapath.mirror import lag as lag_module
from mirrorfs.datapath.mirror.copier import Copier
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.mirror.disk import Disk
from mirrorfs.datapath.sides.memory import MemoryBackend
from mirrorfs.datapath.statedir import open_for

MiB = 1 << 20
SIZE = 16 * MiB
REGION = MiB
CLUSTER = 65536


class Watched(MemoryBackend):
    """A memory side that remembers the most commands it ever ran at once on one cluster."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.running = {}
        self.most_at_once = 0
        self._watch = threading.Lock()

    def run(self, cmd, reserved=None):
        clusters = range(cmd.offset // CLUSTER, (cmd.offset + max(cmd.length, 1) - 1) // CLUSTER + 1)
        with self._watch:
            for c in clusters:
                self.running[c] = self.running.get(c, 0) + 1
                self.most_at_once = max(self.most_at_once, self.running[c])
        try:
            time.sleep(0.0005)          # long enough for a second command on the cluster to meet it
            super().run(cmd, reserved)
        finally:
            with self._watch:
                for c in clusters:
                    self.running[c] -= 1


@pytest.fixture
def lagged(tmp_path):
    """lagged(limit): a Disk with --lag `limit` on two memory sides and a state directory, its lag
    started; stopped at the end."""
    made = []

    def make(limit, policy="degrade"):
        state, _ = open_for(tmp_path / "state", copy="none", source={"uri": "s", "size": SIZE},
                            dest={"uri": "d", "size": SIZE}, size=SIZE, region_size=REGION)
        src = MemoryBackend("source", SIZE)
        dst = Watched("destination", SIZE)
        disk = Disk(src, dst, DirtyMap(SIZE, REGION, state), policy=policy, granularity=CLUSTER,
                    lag=limit)
        disk.lag.start()
        made.append(disk)
        return disk

    yield make
    for disk in made:
        disk.dest.let_go()
        disk.lag.stop()


def test_changes_to_one_cluster_reach_the_destination_in_order_one_at_a_time(lagged):
    """The destination is held while 200 writes to the same few clusters are acknowledged (they
    are in the lag); let go, it must end with the last write of each block, having run one
    command per cluster at a time. Sending every queued change at once (lag.Lag.add's `head`
    always True and _take's check of it dropped) fails this: "At index 4096 diff"."""
    disk = lagged(64 * MiB)
    disk.dest.hold()
    for i in range(200):
        block = (i * 7) % 8                     # 8 blocks of 4 KiB in one cluster
        disk.pwrite(bytes([i % 251 + 1]) * 4096, block * 4096 + (i % 3) * CLUSTER, False)
    status = disk.lag.status()
    assert status["bytes"] == 200 * 4096 and status["mode"] == "lagging", status
    disk.dest.let_go()
    disk.lag.drain(30)
    assert disk.dest.data == disk.source.data
    assert disk.dest.most_at_once == 1
    assert disk.lag.status()["bytes"] == 0


def test_writes_wait_once_the_lag_is_full_and_never_pass_it(lagged):
    """A destination that stops answering: the writes are acknowledged until the lag holds its
    limit, then they wait; none fails, and once the destination answers all complete."""
    limit = 64 * 4096
    disk = lagged(limit)
    disk.dest.hold()
    done, errors, most = [], [], [0]
    stop = threading.Event()

    def writer(n):
        try:
            for i in range(100):
                disk.pwrite(bytes([n + 1]) * 4096, (n * 100 + i) * 4096, False)
                done.append(1)
        except Exception as e:          # a failure is what the test looks for
            errors.append(e)

    def sampler():
        while not stop.is_set():
            most[0] = max(most[0], disk.lag.bytes)
            time.sleep(0.001)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    watch = threading.Thread(target=sampler)
    watch.start()
    for t in threads:
        t.start()
    wait_until(lambda: disk.lag.status()["waits"] >= 4, "the writers waiting for room")
    time.sleep(0.2)
    assert len(done) == 64, "acknowledged beyond the lag's limit, or not up to it"
    assert disk.lag.bytes == limit
    disk.dest.let_go()
    for t in threads:
        t.join(30)
    stop.set()
    watch.join()
    assert not errors and len(done) == 400
    assert most[0] <= limit
    disk.lag.drain(30)
    assert disk.dest.data == disk.source.data


def test_the_intent_stays_saved_until_the_destination_has_the_change(lagged, tmp_path):
    """A lagged change's region is in the saved state before the write is acknowledged and stays
    there while the destination lacks it, whatever clean() does meanwhile (kill -9 here would
    leave it to the restart's copy)."""
    disk = lagged(64 * MiB)
    disk.dest.hold()
    disk.pwrite(b"\x01" * 4096, 5 * MiB, False)
    assert 5 in disk.dirty.state.dirty
    disk.dirty.clean(lambda: None)
    assert 5 in disk.dirty.state.dirty, "cleared while the destination lacks the write"
    disk.dest.let_go()
    disk.lag.drain(30)
    disk.dirty.clean(lambda: None)
    assert 5 not in disk.dirty.state.dirty


def test_a_failing_destination_turns_the_lag_into_the_resync(lagged, monkeypatch):
    """degrade: every lagged change the destination fails marks its region; the copier then copies
    them and the sides are equal."""
    disk = lagged(64 * MiB)
    disk.dest.hold()
    for i in range(50):
        disk.pwrite(bytes([i + 1]) * 4096, i * 3 * MiB // 10, False)
    disk.dest.fail("write")
    disk.dest.let_go()
    disk.lag.drain(30)
    assert disk.lag.status()["failures"] > 0 and not disk.dirty.synchronized()
    disk.dest.clear_faults()
    copier = Copier(disk, chunk=MiB).start()
    try:
        wait_until(disk.dirty.synchronized, "the resync")
    finally:
        copier.stop()
    assert disk.dest.data == disk.source.data


def test_fail_policy_turns_synchronous_after_a_destination_failure(lagged, monkeypatch):
    """--on-dest-error fail: once the destination failed a lagged change, the next writes wait for
    it and hear its error, as a synchronous mirror's do."""
    disk = lagged(64 * MiB, policy="fail")
    disk.dest.fail("write")
    disk.pwrite(b"\x01" * 4096, 0, False)           # acknowledged: the lag had room
    wait_until(lambda: disk.lag.status()["failures"] == 1, "the destination's failure")
    assert disk.lag.mode == lag_module.SYNCHRONOUS
    with pytest.raises(Exception, match="destination write"):
        disk.pwrite(b"\x02" * 4096, MiB, False)


def test_the_switch_drains_the_lag_first(lagged):
    disk = lagged(64 * MiB)
    disk.dest.hold()
    for i in range(20):
        disk.pwrite(bytes([i + 1]) * 4096, i * 65536, False)
    threading.Timer(0.3, disk.dest.let_go).start()
    disk.switch("destination", "switched", timeout=10)
    assert disk.dest.data == disk.source.data
    assert disk.lag.status()["mode"] == "ended"


def test_a_flush_waits_for_the_source_alone_and_the_destination_is_flushed_behind_the_lag(lagged):
    """A client's flush is answered once the source flushed; the destination is flushed once the
    changes queued before the flush reached it, by the lag's own thread; a failing destination flush
    marks every region written to copy again, as without a lag."""
    disk = lagged(64 * MiB)
    disk.dest.hold()
    disk.pwrite(b"\x01" * 4096, 3 * MiB, False)
    disk.flush()                                    # returns with the destination still held
    assert disk.source.commands["flush"] == 1 and disk.dest.commands["flush"] == 0
    disk.dest.let_go()
    wait_until(lambda: disk.dest.commands["flush"] == 1, "the destination's flush")
    assert disk.dest.data == disk.source.data
    disk.dest.fail("flush")
    disk.flush()
    wait_until(lambda: not disk.dirty.synchronized(), "the written regions marked")
    assert 3 in disk.dirty.needs_copy


def test_a_pivot_turns_synchronous_as_soon_as_a_change_finds_the_lag_full(lagged, monkeypatch):
    """A pivot's drain under a writer faster than the destination: the first change that finds
    the lag full says it does not shrink, and the mode turns synchronous then (the backlog gets
    the destination to itself), not a look later. The look is an hour here, so only the full lag
    can say it; without that rule (converge's `self.waits != waits`) the mode stays lagging."""
    monkeypatch.setattr(lag_module, "CONVERGE_LOOK", 3600.0)
    limit = 16 * 4096
    disk = lagged(limit)
    disk.dest.hold()
    for i in range(16):
        disk.pwrite(bytes([i + 1]) * 4096, i * CLUSTER, False)
    assert disk.lag.bytes == limit
    switched = []
    pivot = threading.Thread(target=lambda: switched.append(
        disk.switch("destination", "switched", timeout=30)))
    pivot.start()
    # The drain is watching (its count of waits taken): the next change that finds no room is
    # the writer's.
    wait_until(lambda: disk.lag._watchers == 1, "the pivot's drain")
    writer = threading.Thread(target=disk.pwrite, args=(b"\xff" * 4096, 20 * CLUSTER, False))
    writer.start()                  # finds the lag full
    try:
        wait_until(lambda: disk.lag.mode == lag_module.SYNCHRONOUS, "the synchronous mode")
    finally:
        disk.dest.let_go()
        writer.join(30)
        pivot.join(30)
    assert switched, "the switch did not happen"
    assert disk.dest.data == disk.source.data
