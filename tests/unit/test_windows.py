"""The windows the data path's rules guard, held open at a chosen point, in this process: each test
fails on every run when its rule is broken (docs/TESTING.md, "The mutation table"), because it
does not write and hope a request lands in the window, it stops the data path inside it.

- A destination with a write cache (`MemoryBackend.volatile()`, then `power_loss()`): what no
  flush or FUA covered is lost, so a map saved before the destination's flush is caught.
- A copy held between two chunks of a region it copies again: a copier limited to 1 byte/s copies
  one chunk at once, then waits for its rate outside the range lock (`Pacer.reserve`), for good.
- A request held in flight at the destination (`MemoryBackend.hold()`) while a switch waits.
- A group commit whose flush is held (a flush function that waits for the test), so a request can
  join the next batch while one is being saved.

No mocks: memory backends, the real dirty map, hydration map and state directory.
"""

import errno
import threading
import time

import pytest

from lib.statefiles import new_state, saved
from mirrorfs.datapath.mirror import copier as copier_module
from mirrorfs.datapath.mirror.copier import Copier
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.mirror.disk import Disk
from mirrorfs.datapath.errors import SwitchRefused
from mirrorfs.datapath.evacuation.evacuee import Evacuee
from mirrorfs.datapath.evacuation.hydration import HydrationMap
from mirrorfs.datapath.sides import sideio
from mirrorfs.datapath.sides.memory import MemoryBackend

MiB = 1 << 20
SIZE = 16 * MiB
REGION = MiB


def wait_until(condition, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout}s"
        time.sleep(0.005)


def pattern(size):
    return (bytes(range(1, 252)) * (size // 251 + 1))[:size]


def disk_on_memory(policy="degrade"):
    """A Disk in copy mode none (synchronized from the start) on two memory backends, the source
    and the destination holding the same pattern."""
    src, dst = MemoryBackend("source", SIZE), MemoryBackend("destination", SIZE)
    src.data[:] = dst.data[:] = pattern(SIZE)
    return Disk(src, dst, DirtyMap(SIZE, REGION, None), policy=policy, granularity=65536)


def in_thread(target, *args, **kwargs):
    """Run target in a thread; the thread's .result is what it returned or raised."""
    def run():
        try:
            t.result = target(*args, **kwargs)
        except Exception as e:
            t.result = e
    t = threading.Thread(target=run, daemon=True)
    t.result = None
    t.start()
    return t


# The hydration map is saved only after the destination was flushed.

def test_a_hydrated_region_survives_the_destinations_power_loss(tmp_path):
    """A client write (no FUA) into a region not hydrated copies the region, writes, and commits
    it: the map names it hydrated once the answer is given. The destination then loses power: a
    region the saved map names hydrated must hold the source's data and the write, never what
    the destination held before. Saving the map without flushing the destination first (the
    flush in `HydrationMap._lead` removed) fails this: the region's copy was in the cache."""
    src, dst = MemoryBackend("source", SIZE), MemoryBackend("destination", SIZE)
    src.data[:] = pattern(SIZE)
    dst.volatile()
    ev = Evacuee(src, dst, HydrationMap.open(tmp_path, SIZE, REGION,
                                                 flush=lambda: sideio.flush(dst)))
    offset, data = 3 * REGION + 4097, b"\x5a" * 3001
    ev.pwrite(data, offset, False)                   # acknowledged
    assert ev.map.hydrated(3)
    dst.power_loss()
    saved = HydrationMap.open(tmp_path, SIZE, REGION, create=False)
    expected = bytearray(src.data)
    expected[offset:offset + len(data)] = data
    assert saved.hydrated(3)
    lo, hi = saved.span(3)
    assert dst.data[lo:hi] == expected[lo:hi], \
        "the map says hydrated but the destination lost the region's copy: saved before a flush"


def test_the_memory_sides_write_cache_keeps_only_what_was_flushed_or_fua():
    side = MemoryBackend("destination", MiB)
    side.volatile()
    side.pwrite(b"\x01" * 4096, 0)
    side.pwrite(b"\x02" * 4096, 8192, fua=True)
    side.power_loss()
    assert side.data[:4096] == bytes(4096) and side.data[8192:12288] == b"\x02" * 4096
    side.pwrite(b"\x03" * 4096, 0)
    side.flush()
    side.zero(4096, 0)                               # after the flush: lost
    side.power_loss()
    assert side.data[:4096] == b"\x03" * 4096


def test_the_copys_saved_cursor_survives_the_destinations_power_loss(tmp_path, monkeypatch):
    """The first pass saves its cursor ("everything below is on the destination") only after
    flushing the destination. Here every flush of the destination fails: the copy still runs to
    the end in memory, but no saved cursor may claim a byte; after the power loss the
    destination must hold the source's data below the cursor the state names. A cursor saved
    without the flush (`flush_dest()` removed from `DirtyMap.save_cursor`) claims the whole
    disk over a destination that lost it. Once flushes work again the cursor is saved."""
    monkeypatch.setattr(copier_module, "MAINTENANCE_INTERVAL", 0.05)
    src, dst = MemoryBackend("source", SIZE), MemoryBackend("destination", SIZE)
    src.data[:] = pattern(SIZE)
    dst.volatile()
    dst.fail("flush", errno.EIO)
    disk = Disk(src, dst, DirtyMap(SIZE, REGION, new_state(tmp_path), full=True),
                policy="fail", granularity=65536)
    copier = Copier(disk, chunk=MiB, workers=2).start()
    try:
        wait_until(lambda: disk.dirty.cursor == SIZE, "the first pass at the end")
        # Two more flushes tried (a maintenance round that began after the end has tried to save
        # the cursor: it flushes the destination first, which fails), or the cursor saved.
        tried = dst.commands["flush"]
        wait_until(lambda: dst.commands["flush"] >= tried + 2 or saved(tmp_path)["cursor"],
                   "the cursor's save tried")
        dst.power_loss()
        cursor = saved(tmp_path)["cursor"]
        assert dst.data[:cursor] == src.data[:cursor], \
            f"the saved cursor ({cursor}) claims bytes the destination lost: saved before a flush"
        dst.clear_faults()
        wait_until(lambda: saved(tmp_path)["cursor"] > cursor, "the cursor saved")
    finally:
        copier.stop()


# A region copied again counts as differing until its copy is done.

def test_a_switch_between_two_chunks_of_a_region_copied_again_is_refused(monkeypatch):
    """A write that reached only the source (degrade) makes its region one to copy again. The
    copier, limited to 1 byte/s, copies the region's first chunk (256 KiB) at once and waits for
    its rate before the second, holding no range lock: the region is half copied, with nothing in
    flight. A switch there must be refused (take_region's contract); clearing the region before
    its copy (`region_done` moved above the copy in `Copier._step`) lets it through."""
    monkeypatch.setattr(copier_module, "MAINTENANCE_INTERVAL", 0.05)
    monkeypatch.setattr(copier_module, "SETTLE_FIRST", 0.01)
    disk = disk_on_memory()
    disk.dest.fail("write", errno.EIO, times=1)
    # In the region's last chunk: still differing while the copy waits before its second.
    disk.pwrite(bytearray(b"\x77" * 4096), 6 * REGION - 8192, fua=False)
    assert disk.dirty.needs_copy == {5}
    copier = Copier(disk, rate=1, chunk=MiB, workers=1).start()
    try:
        wait_until(lambda: copier.bytes_read >= copier_module.PACED_CHUNK,
                   "the region's first chunk copied")
        assert copier.bytes_read == copier_module.PACED_CHUNK and disk.inflight.count == 0
        with pytest.raises(SwitchRefused, match="may still differ"):
            disk.switch("destination", "switched", timeout=5)
        assert disk.reader is disk.source and disk.ended is None
    finally:
        copier.stop()
    assert disk.dest.data[5 * REGION:6 * REGION] != disk.source.data[5 * REGION:6 * REGION]


# The switch drains the requests in flight.

def test_a_switch_waits_for_a_write_in_flight_that_then_fails_at_the_destination():
    """A write has reached the source and is held at the destination when a switch to the
    destination starts. The switch must wait for it: the write then fails there (degrade: the
    client is answered, its region is to copy again), so the sides differ and the switch is
    refused. A pause that does not wait for requests in flight (`InFlight.pause`) switches first,
    and the disk serves a destination without the acknowledged write."""
    disk = disk_on_memory()
    disk.dest.hold()
    offset, data = 6 * REGION + 8192, bytearray(b"\x66" * 4096)
    writer = in_thread(disk.pwrite, data, offset, fua=False)
    try:
        wait_until(lambda: disk.dest.held() == 1, "the write held at the destination")
        switch = in_thread(disk.switch, "destination", "switched", timeout=30)
        wait_until(lambda: disk.inflight.paused, "the switch holding new requests")
        disk.dest.fail("write", errno.EIO, times=1)  # the held write fails once let go
    finally:
        disk.dest.let_go()
        writer.join(10)
    switch.join(30)
    assert isinstance(switch.result, SwitchRefused), \
        f"the switch did not wait for the write in flight: {switch.result!r}"
    assert writer.result is None                     # degraded: the client was answered
    buf = bytearray(4096)
    disk.pread(buf, offset)
    assert bytes(buf) == data
    assert disk.reader is disk.source and disk.dirty.needs_copy == {6}


# The group commit answers a request with its own batch's save.

def test_a_request_that_joins_during_a_commit_waits_for_its_own_batch(tmp_path):
    """A commits region 1 and leads its batch; its flush is held. B commits region 2 meanwhile:
    B's region is in the next batch, so B is answered only once that batch is flushed and saved.
    A request answered with the batch that was running when it came (the batch number taken as
    "the next to end", not the one it joined) returns before its region is saved."""
    entered, release = [], [threading.Event(), threading.Event()]

    def flush():
        n = len(entered)
        entered.append(n)
        assert release[n].wait(10), f"flush {n} never let go"

    hmap = HydrationMap.open(tmp_path, SIZE, REGION, flush=flush)
    a = in_thread(hmap.commit, [1])
    wait_until(lambda: len(entered) == 1, "A's batch flushing")
    b = in_thread(hmap.commit, [2])
    wait_until(lambda: 2 in hmap._pending, "B waiting in the next batch")
    release[0].set()                                 # A's batch saved: region 1 only
    a.join(10)
    assert a.result is None and hmap.hydrated(1)
    wait_until(lambda: len(entered) == 2 or not b.is_alive(), "B's batch flushing, or B answered")
    assert b.is_alive(), "B was answered before its batch was flushed and saved"
    assert not HydrationMap.open(tmp_path, SIZE, REGION).hydrated(2)
    release[1].set()
    b.join(10)
    assert b.result is None
    assert HydrationMap.open(tmp_path, SIZE, REGION).hydrated(2)
