"""The data path's core, driven in this process, the way libnbd tests itself: range locks, the
dirty map's write-intent rule, the state journal, the options, and `Disk` plus the copier on two
memory backends (mirrorfs.datapath.sides.memory: the same verbs, failures to order), and the Evacuee
on them. No process is started (tests/unit/conftest.py refuses one): the same rules against two
real `nbdkit memory` servers are tests/system/test_core_servers.py.

No mocks: the memory backend is a backend of the data path like NbdBackend, the state is a real
directory.
"""

import errno
import importlib
import inspect
import json
import pkgutil
import threading
import time
from pathlib import Path

import pytest

from lib.statefiles import new_state, saved
from mirrorfs.datapath.mirror import copier as copier_module
from mirrorfs.datapath.mirror.copier import Copier
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.mirror.disk import Disk
from mirrorfs.datapath.errors import DataPathError, DrainTimeout, RequestError, SwitchRefused
from mirrorfs.datapath.inflight import InFlight
from mirrorfs.datapath.mirror.compare import CHUNK, compare
from mirrorfs.datapath.sides import resend as resend_module
from mirrorfs.datapath.sides.memory import MemoryBackend
from mirrorfs.datapath.options import DataPathOptions
from mirrorfs.datapath.state import State, StateError

MiB = 1 << 20
SIZE = 16 * MiB
REGION = MiB


# Range locks.

def test_overlapping_changes_wait_for_each_other():
    flight = InFlight(granularity=4096)
    first = flight.enter_range("write", 0, 8192)
    entered = threading.Event()

    def second():
        token = flight.enter_range("write", 4096, 12288)
        entered.set()
        flight.leave(token)

    t = threading.Thread(target=second)
    t.start()
    assert not entered.wait(0.3)            # held while the first change is in flight
    flight.leave(first)
    assert entered.wait(10)
    t.join()


def test_changes_in_one_cluster_are_serialized_even_when_bytes_do_not_overlap():
    """The cluster-wide lock (qemu-storage-daemon 7.2 corrupts qcow2 refcounts otherwise)."""
    flight = InFlight(granularity=65536)
    first = flight.enter_range("write", 0, 4096)
    entered = threading.Event()
    t = threading.Thread(target=lambda: (flight.leave(flight.enter_range("trim", 60000, 61000)),
                                         entered.set()))
    t.start()
    assert not entered.wait(0.3)
    flight.leave(first)
    assert entered.wait(10)
    t.join()
    # Other clusters are not held.
    a = flight.enter_range("write", 0, 4096)
    b = flight.enter_range("write", 65536, 65536 + 4096)
    flight.leave(a)
    flight.leave(b)


def test_pause_holds_new_requests_and_drains_those_in_flight():
    flight = InFlight()
    flight.enter("read")
    with pytest.raises(DrainTimeout):
        flight.pause(0.2)                   # one request never leaves: the pause gives up
    flight.leave()
    flight.pause(1)
    entered = threading.Event()
    t = threading.Thread(target=lambda: (flight.enter("read"), entered.set(), flight.leave()))
    t.start()
    assert not entered.wait(0.3)            # held while paused
    flight.resume()
    assert entered.wait(10)
    t.join()


# The write-intent rule.

def test_intent_is_saved_before_a_write_below_the_cursor_is_issued(tmp_path):
    state = new_state(tmp_path)
    dirty = DirtyMap(SIZE, REGION, state, full=True)
    dirty.advance(8 * MiB)                  # the first pass copied [0, 8 MiB)
    token = dirty.before_change(3 * MiB, 3 * MiB + 4096)
    # When before_change returns the write may be issued: the region must already be on disk.
    assert 3 in saved(tmp_path)["dirty"]
    dirty.after_change(token, both_sides=True)
    assert 3 in saved(tmp_path)["dirty"]    # still: not flushed on both sides yet


def test_intent_is_not_needed_above_the_cursor(tmp_path):
    state = new_state(tmp_path)
    dirty = DirtyMap(SIZE, REGION, state, full=True)
    dirty.advance(4 * MiB)
    dirty.after_change(dirty.before_change(10 * MiB, 10 * MiB + 4096), both_sides=True)
    assert saved(tmp_path)["dirty"] == []   # the copier will copy it when it gets there


def test_intent_is_cleared_only_after_both_sides_flushed_with_nothing_in_flight(tmp_path):
    state = new_state(tmp_path, copy="none")
    dirty = DirtyMap(SIZE, REGION, state)
    flushes = []
    idle = dirty.before_change(MiB, MiB + 4096)
    dirty.after_change(idle, both_sides=True)
    busy = dirty.before_change(2 * MiB, 2 * MiB + 4096)        # still in flight
    dirty.clean(lambda: flushes.append(saved(tmp_path)["dirty"]))
    assert flushes == [[1, 2]]              # the flush came before anything was cleared
    assert saved(tmp_path)["dirty"] == [2]  # the busy region keeps its intent
    dirty.after_change(busy, both_sides=True)
    dirty.clean(lambda: flushes.append("flush"))
    assert saved(tmp_path)["dirty"] == []


def test_a_write_during_clean_keeps_its_region(tmp_path):
    """A region written between clean()'s snapshot and its flush is not cleared by that flush."""
    state = new_state(tmp_path, copy="none")
    dirty = DirtyMap(SIZE, REGION, state)
    dirty.after_change(dirty.before_change(MiB, MiB + 4096), both_sides=True)

    def flush_while_another_write_completes():
        dirty.after_change(dirty.before_change(MiB + 8192, MiB + 12288), both_sides=True)

    dirty.clean(flush_while_another_write_completes)
    assert saved(tmp_path)["dirty"] == [1]


def test_a_write_that_reached_one_side_is_copied_again_and_the_phase_says_so(tmp_path):
    state = new_state(tmp_path, copy="none")
    dirty = DirtyMap(SIZE, REGION, state)
    assert saved(tmp_path)["phase"] == "synchronized"
    dirty.after_change(dirty.before_change(5 * MiB, 5 * MiB + 4096), both_sides=False)
    assert dirty.needs_copy == {5} and not dirty.synchronized()
    assert saved(tmp_path)["phase"] == "copying" and 5 in saved(tmp_path)["dirty"]
    region = dirty.take_region()
    dirty.region_done(region)
    assert saved(tmp_path)["phase"] == "synchronized"


def test_dirty_bytes_count_each_byte_once():
    dirty = DirtyMap(SIZE + 4096, REGION, full=True)     # a last region shorter than the others
    dirty.advance(8 * MiB)
    dirty.needs_copy.update({2, 9, 16})                  # 9 and 16 are above the cursor
    assert dirty.dirty_bytes() == (SIZE + 4096 - 8 * MiB) + MiB
    assert dirty.dirty_bytes() <= dirty.size


# The state journal.

def test_the_state_ends_once(tmp_path):
    state = new_state(tmp_path)
    state.record(end="switched")
    with pytest.raises(StateError, match="already switched"):
        state.record(end="cancelled")
    state.record(dirty={1, 2}, synchronized=False)       # a late save of the dirty map
    assert saved(tmp_path)["phase"] == "switched"
    assert State.load(tmp_path).phase == "switched"


def test_a_corrupt_state_is_refused(tmp_path):
    new_state(tmp_path)
    data = saved(tmp_path)
    data["cursor"] = 12345                               # the checksum no longer matches
    (tmp_path / "state.json").write_text(json.dumps(data))
    with pytest.raises(StateError, match="corrupt"):
        State.load(tmp_path)


def test_a_state_of_the_first_format_is_refused():
    """Format 1 of the state did not say whose it is (no migration id, no inode): refused with
    the reason, not converted."""
    import hashlib
    import tempfile
    from pathlib import Path
    fields = {"format": 1, "mode": "mirror", "source": {"uri": "s", "size": SIZE},
              "dest": {"uri": "d", "size": SIZE}, "size": SIZE, "region_size": REGION,
              "phase": "synchronized", "cursor": 0, "dirty": [3]}
    checksum = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "state.json").write_text(json.dumps({**fields, "checksum": checksum}))
        with pytest.raises(StateError, match="older mirrorfs .state format 1.*no conversion"):
            State.load(d)


# Options.

def test_options_round_trip_through_nbdkit_parameters():
    o = DataPathOptions(source="nbd+unix:///?socket=/s", dest="nbd://h/", control="/c", copy="full",
                        state="/st", policy="degrade", rate=1 << 20, region=2 * MiB,
                        granularity=65536, io_timeout=2.5)
    assert DataPathOptions.from_params(o.to_params()) == o
    alone = o.alone("nbd://h/", "destination")
    assert DataPathOptions.from_params(alone.to_params()) == alone


# The operator's options (--copy, --rate, --region, --io-timeout...) are ServeOptions' to refuse,
# once: tests/unit/test_options.py. What comes into the data path is parsed here, and the
# parameters only the process tree sets are checked.
@pytest.mark.parametrize("params,problem", [
    ({"dest": "d"}, "missing parameter: source"),
    ({"source": "s", "mode": "full"}, "unknown parameter 'mode'"),
    ({"source": "s", "dest": "d", "rate": "fast"}, "expected a int"),
    ({"source": "s", "dest": "d", "switch_first": "yes"}, "expected a boolean"),
    ({"source": "s", "source_label": "left"}, "source_label 'left'"),
    ({"source": "s", "dest": "d", "granularity": "1000"}, "granularity 1000: expected a power of two"),
    ({"source": "s", "dest": "d", "in_place": "True"}, "in_place hydrates an evacuation"),
    ({"source": "s", "net": "True"}, "net: a mirror's destination serves reads"),
])
def test_bad_parameters_are_refused(params, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        DataPathOptions.from_params(params)


# Disk, dirty map and copier on memory backends.

def wait_until(condition, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout}s"
        time.sleep(0.005)


@pytest.fixture
def mem():
    """mem(...): a Disk on two MemoryBackends (disk.source, disk.dest); copiers made with
    mem.copier() are stopped at the end."""
    copiers = []

    def make(state=None, full=False, policy="fail", **capabilities):
        src = MemoryBackend("source", SIZE, **capabilities)
        dst = MemoryBackend("destination", SIZE, **capabilities)
        return Disk(src, dst, DirtyMap(SIZE, REGION, state, full=full), policy=policy,
                    granularity=65536)

    def copier(disk, **kw):
        c = Copier(disk, chunk=MiB, **kw).start()
        copiers.append(c)
        return c

    make.copier = copier
    yield make
    for c in copiers:
        c.stop()


@pytest.fixture
def quick_copier(monkeypatch):
    """A copier that tries again after a failure within milliseconds, not seconds."""
    monkeypatch.setattr(copier_module, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(copier_module, "SETTLE_FIRST", 0.01)
    monkeypatch.setattr(copier_module, "MAINTENANCE_INTERVAL", 0.05)


def test_every_change_reaches_both_sides(mem):
    disk = mem()
    disk.pwrite(bytearray(b"\x5a" * 8192), MiB, fua=True)
    disk.pwrite(bytearray(b"\x33" * 8192), 2 * MiB, fua=False)
    disk.zero(4096, MiB, may_trim=False, fua=False, fast=False)
    disk.trim(4096, 2 * MiB, fua=False)
    disk.flush()
    for side in (disk.source, disk.dest):
        assert side.data[MiB:MiB + 8192] == bytes(4096) + b"\x5a" * 4096
        assert side.data[2 * MiB + 4096:2 * MiB + 8192] == b"\x33" * 4096
        assert side.commands == {"write": 2, "zero": 1, "trim": 1, "flush": 1}
    assert not disk.dirty.needs_copy
    buf = bytearray(4096)
    disk.pread(buf, MiB + 4096)
    assert buf == b"\x5a" * 4096
    assert disk.dest.commands["read"] == 0          # reads go to the source alone


def test_a_destination_failure_fails_the_request_or_degrades(mem):
    disk = mem()
    disk.dest.fail("write", errno.ENOSPC)
    with pytest.raises(RequestError, match="destination write") as failed:
        disk.pwrite(bytearray(b"\x11" * 4096), 3 * MiB, fua=False)
    assert failed.value.errno == errno.ENOSPC
    assert disk.dirty.needs_copy == {3}             # the source has it: copied again either way
    assert disk.stats["destination"].errors == 1
    assert disk.stats["destination"].last_error["errno"] == "ENOSPC"

    degrading = mem(policy="degrade")
    degrading.dest.fail("write", errno.ENOSPC)
    degrading.pwrite(bytearray(b"\x11" * 4096), 5 * MiB, fua=False)   # succeeds for the client
    assert degrading.source.data[5 * MiB:5 * MiB + 4096] == b"\x11" * 4096
    assert degrading.dirty.needs_copy == {5}
    assert degrading.stats["destination"].degraded == 1


def test_an_unreachable_destination_degrades_like_a_failing_one(mem):
    disk = mem(policy="degrade")
    disk.dest.unreachable = True
    for _ in range(2):                              # each side takes its turn at running last
        disk.pwrite(bytearray(b"\x22" * 4096), 7 * MiB, fua=False)
    assert disk.dirty.needs_copy == {7}
    assert disk.stats["destination"].degraded == 2
    assert not disk.stats["destination"].latencies     # it never got a command to time


def test_a_source_failure_fails_the_request_even_when_degrading(mem):
    disk = mem(policy="degrade")
    disk.source.fail("write", errno.EIO)
    with pytest.raises(RequestError, match="source write") as failed:
        disk.pwrite(bytearray(b"\x44" * 4096), 2 * MiB, fua=False)
    assert failed.value.errno == errno.EIO
    assert disk.dest.data[2 * MiB:2 * MiB + 4096] == b"\x44" * 4096    # the sides differ
    assert disk.dirty.needs_copy == {2}                                 # and the map knows
    assert disk.stats["destination"].degraded == 0


def test_a_change_the_source_lost_with_its_connection_is_sent_again(mem, monkeypatch):
    monkeypatch.setattr(resend_module, "RESEND_EVERY", 0.001)
    disk = mem()
    disk.source.fail("write", errno.ECONNRESET, times=2)
    disk.pwrite(bytearray(b"\x66" * 4096), MiB, fua=False)
    assert disk.source.data[MiB:MiB + 4096] == disk.dest.data[MiB:MiB + 4096] == b"\x66" * 4096
    assert disk.source.commands["write"] == 3
    assert disk.stats["source"].errors == 0 and not disk.dirty.needs_copy
    # A read too.
    disk.source.fail("read", errno.ENOTCONN, times=1)
    buf = bytearray(4096)
    disk.pread(buf, MiB)
    assert buf == b"\x66" * 4096
    # A side that refuses the command sent again: the client hears of it.
    disk.source.fail("write", errno.ECONNRESET, times=1)
    disk.source.fail("write", errno.EROFS, times=1)
    with pytest.raises(RequestError) as failed:
        disk.pwrite(bytearray(4096), MiB, fua=False)
    # ... as EIO: NBD has no ECONNRESET, and nbdkit would send it as EINVAL ("you asked wrong").
    assert failed.value.errno == errno.EIO
    # The destination's lost connection is not sent again: the copier repairs it.
    disk.dest.fail("write", errno.ECONNRESET, times=1)
    with pytest.raises(RequestError):
        disk.pwrite(bytearray(4096), 4 * MiB, fua=False)
    assert disk.dest.commands["write"] == 3 and disk.dirty.needs_copy == {1, 4}


def test_a_fast_zero_one_side_refuses_is_done_the_slow_way_there(mem):
    disk = mem()
    disk.pwrite(bytearray(b"\x99" * 65536), 0, fua=False)
    disk.dest.fail("zero", errno.ENOTSUP, times=1)
    disk.zero(65536, 0, may_trim=True, fua=False, fast=True)
    assert disk.source.data[:65536] == disk.dest.data[:65536] == bytes(65536)
    assert disk.dest.commands["zero"] == 2 and not disk.dirty.needs_copy
    disk.source.fail("zero", errno.ENOTSUP, times=1)
    disk.dest.fail("zero", errno.ENOTSUP, times=1)
    with pytest.raises(RequestError) as failed:              # every side refused: the client
        disk.zero(65536, 0, may_trim=True, fua=False, fast=True)    # writes zeros itself
    assert failed.value.errno == errno.ENOTSUP


def test_a_request_larger_than_the_sides_accept_is_sent_in_pieces(mem):
    disk = mem(block_size=(1, 4096, 65536))
    data = bytearray(bytes(range(256)) * 1024)                          # 256 KiB
    disk.pwrite(data, MiB, fua=False)
    assert disk.source.data[MiB:MiB + len(data)] == disk.dest.data[MiB:MiB + len(data)] == data
    assert disk.source.commands["write"] == disk.dest.commands["write"] == 4
    buf = bytearray(len(data))
    disk.pread(buf, MiB)
    assert buf == data and disk.source.commands["read"] == 4
    # The source fails the second piece: the rest is not sent, the client hears of it, the range
    # is marked.
    disk.source.fail("write", errno.EIO, start=3 * MiB + 65536, end=3 * MiB + 2 * 65536)
    with pytest.raises(RequestError):
        disk.pwrite(data, 3 * MiB, fua=False)
    assert disk.source.commands["write"] == disk.dest.commands["write"] == 6
    assert disk.dirty.needs_copy == {3}


def test_a_piece_the_source_lost_with_its_connection_is_sent_again(mem, monkeypatch):
    """A request cut into pieces is one change: a piece whose connection to the source was lost
    is sent again as a whole request's would be, and the rest follows."""
    monkeypatch.setattr(resend_module, "RESEND_EVERY", 0.001)
    disk = mem(block_size=(1, 4096, 65536))
    data = bytearray(bytes(range(256)) * 1024)                          # 256 KiB, 4 pieces
    disk.source.fail("write", errno.ECONNRESET, times=1, start=MiB + 65536, end=MiB + 2 * 65536)
    disk.pwrite(data, MiB, fua=False)
    assert disk.source.data[MiB:MiB + len(data)] == disk.dest.data[MiB:MiB + len(data)] == data
    assert disk.source.commands["write"] == 5 and disk.dest.commands["write"] == 4
    assert disk.stats["source"].errors == 0 and not disk.dirty.needs_copy


def test_a_switch_is_refused_while_the_sides_may_differ_then_allowed(mem, quick_copier):
    disk = mem(full=True)
    disk.source.data[:] = bytes(range(256)) * (SIZE // 256)
    with pytest.raises(SwitchRefused, match="may still differ"):
        disk.switch("destination", "switched", timeout=1)
    assert disk.reader is disk.source and disk.ended is None
    mem.copier(disk)
    wait_until(disk.dirty.synchronized, "synchronized")
    assert disk.dest.data == disk.source.data
    disk.switch("destination", "switched", timeout=1)
    assert disk.reader is disk.dest and disk.writers == (disk.dest,) and disk.source.closed
    disk.pwrite(bytearray(4096), 0, fua=False)
    assert disk.source.commands["write"] == 0
    with pytest.raises(SwitchRefused, match="already ended"):
        disk.switch("source", "cancelled")


def test_a_switch_to_a_destination_that_does_not_answer_is_refused_in_process(mem):
    disk = mem()                                    # copy mode none: synchronized from the start
    disk.dest.hold()
    try:
        with pytest.raises(SwitchRefused, match="does not answer"):
            disk.switch("destination", "switched", timeout=0.2)
    finally:
        disk.dest.let_go()
    assert disk.reader is disk.source and disk.ended is None


@pytest.mark.parametrize("source_fault", [None, "flush", "write"])
def test_the_commit_of_a_net_flushes_the_kept_source_inside_the_hold_and_says_if_it_is_whole(
        mem, source_fault):
    """A group's commit keeps the retired sources as the disks at one instant, and its record says
    whether they are consistent. So the commit point must come after the source's flush (its
    daemon could be killed right after the hold, with qcow2's metadata in its memory), and must
    learn whether the source holds every change: False when its flush failed, or when a write to
    it failed (the net degrades the source's failures: the client got success). The switch goes
    on either way: the destination has everything."""
    disk = mem()
    disk.read_from("destination")
    disk.source.volatile()
    if source_fault:
        disk.source.fail(source_fault, errno.EIO)
    disk.pwrite(bytearray(b"\x42" * 4096), MiB, fua=False)
    seen = []
    disk.switch("destination", "switched", timeout=1,
                commit=lambda complete: seen.append((complete, bytes(disk.source._stable[MiB:MiB + 4096]))))
    if source_fault is None:
        assert seen == [(True, b"\x42" * 4096)]
    else:
        assert [complete for complete, _ in seen] == [False]
    assert disk.retired_complete is seen[0][0]
    assert disk.reader is disk.dest and disk.ended == "switched"


def test_the_intent_is_saved_before_a_change_is_sent_to_either_side(tmp_path, mem):
    """While a write has reached the source and is held at the destination, the saved state names
    its region. Saving the intent after issuing the write (or not at all) fails this."""
    disk = mem(state=new_state(tmp_path, copy="none"))
    disk.dest.hold()
    writers = [threading.Thread(target=disk.pwrite, args=(bytearray(b"\x77" * 4096), r * MiB),
                                kwargs={"fua": False}) for r in (6, 9)]   # each side runs last once
    try:
        for w in writers:
            w.start()
        wait_until(lambda: disk.dest.held() == 2, "held at the destination")
        for r in (6, 9):
            assert disk.source.data[r * MiB:r * MiB + 4096] == b"\x77" * 4096
            assert disk.dest.data[r * MiB:r * MiB + 4096] == bytes(4096)
        assert {6, 9} <= set(saved(tmp_path)["dirty"])
    finally:
        disk.dest.let_go()
        for w in writers:
            w.join(10)
    assert disk.dest.data[6 * MiB:6 * MiB + 4096] == b"\x77" * 4096


def test_a_failed_mirror_flush_marks_everything_to_copy_again(mem):
    disk = mem(policy="degrade")
    disk.dest.fail("flush", errno.EIO, times=1)
    disk.flush()                                            # degrade: the client is not told
    assert disk.dirty.needs_copy == set(range(SIZE // REGION))
    failing = mem()
    failing.dest.fail("flush", errno.EIO, times=1)
    with pytest.raises(RequestError, match="destination flush"):
        failing.flush()


def test_the_copier_copies_again_what_reached_only_the_source(mem, quick_copier):
    disk = mem(policy="degrade")
    disk.dest.fail("write", errno.EIO, times=1)
    disk.pwrite(bytearray(b"\x55" * 4096), 3 * MiB + 4096, fua=False)
    assert not disk.dirty.synchronized()
    copier = mem.copier(disk)
    wait_until(disk.dirty.synchronized, "synchronized")
    assert disk.dest.data == disk.source.data
    assert copier.bytes_read == 4096                # only the block holding data is read
    assert copier.bytes_zeroed == REGION - 4096     # the rest of the region: zero requests


def test_the_first_pass_copies_data_and_zeros_over_a_dirty_destination(mem, quick_copier):
    disk = mem(full=True)
    for i in range(0, SIZE, 2 * MiB):
        disk.source.data[i:i + MiB] = bytes([1 + i // MiB]) * MiB
    disk.dest.data[:] = b"\xff" * SIZE             # what was there must not survive
    copier = mem.copier(disk, workers=3)
    wait_until(disk.dirty.synchronized, "synchronized")
    assert disk.dest.data == disk.source.data
    assert (copier.bytes_read, copier.bytes_zeroed) == (SIZE // 2, SIZE // 2)


def test_the_copier_retries_a_failing_destination_until_it_takes_the_data(mem, quick_copier):
    disk = mem(full=True)
    disk.source.data[:] = b"\x42" * SIZE
    disk.dest.fail("write", errno.EIO)
    copier = mem.copier(disk)
    wait_until(lambda: copier.failures >= 3, "three failed chunks")
    assert disk.dirty.cursor < SIZE and not disk.dirty.synchronized()
    disk.dest.clear_faults()
    wait_until(disk.dirty.synchronized, "synchronized")
    assert disk.dest.data == disk.source.data


def test_a_client_write_during_a_copy_is_not_overwritten(mem, quick_copier):
    """The copier's chunk holds the range lock: a client write to its bytes waits for the chunk, and
    is then mirrored over it."""
    disk = mem(full=True)
    disk.source.data[:] = b"\x01" * SIZE
    disk.dest.hold()                                # the first chunks' writes are held
    mem.copier(disk, workers=1)
    wait_until(lambda: disk.dest.held() == 1, "a chunk held at the destination")
    writer = threading.Thread(target=disk.pwrite, args=(bytearray(b"\x02" * 4096), 4096),
                              kwargs={"fua": False})
    writer.start()
    try:
        time.sleep(0.05)
        # Not even on the source, which is not held: the write waits for the chunk's range lock.
        assert writer.is_alive() and disk.source.data[4096:8192] == b"\x01" * 4096, \
            "the client write did not wait for the chunk"
    finally:
        disk.dest.let_go()
        writer.join(10)
    wait_until(disk.dirty.synchronized, "synchronized")
    assert disk.dest.data[4096:8192] == disk.source.data[4096:8192] == b"\x02" * 4096
    assert disk.dest.data == disk.source.data


def test_every_exception_of_the_data_path_has_one_root():
    """One tree (mirrorfs.datapath.errors), drawn where it is defined: a caller can tell the data
    path's failures from bugs, a reader finds every class in one drawing, and no name is shared
    with the supervisor's tree (mirrorfs.errors)."""
    import mirrorfs.errors
    from mirrorfs.datapath import errors
    supervisor = {n for n, c in vars(mirrorfs.errors).items() if isinstance(c, type)}
    found = {}
    for info in pkgutil.walk_packages(mirrorfs.datapath.__path__, "mirrorfs.datapath."):
        if info.name.endswith((".callbacks", ".script")):
            continue                                # need nbdkit's own module
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("mirrorfs."):
                found[name] = cls
    assert {n for n, c in found.items() if not issubclass(c, DataPathError)} == set()
    assert {n for n, c in found.items() if c.__module__ != errors.__name__} == set(), \
        "define the data path's exceptions in mirrorfs/datapath/errors.py"
    drawing = errors.__doc__.split("\n\n")[1].split()
    assert {n for n in found if n not in drawing} == set(), "draw it in errors.py's tree"
    assert set(found) & supervisor == set()
    assert {"SideUnreachable", "RequestError", "SwitchRefused", "SideFailure", "HydrationError",
            "Stopped"} <= set(found)


def _exception_classes(package):
    """{(module, class name): the names of its bases} for every class of `package`'s source, read
    as text (the supervisor imports QEMU's and Prometheus's modules, which the unit suite does not
    need), keeping those that derive from an exception: a built-in one, one of the package's, or a
    library's (a base named *Error or *Exception)."""
    import ast
    import builtins
    classes = {}
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "?")
                         for b in node.bases]
                classes[(module, node.name)] = bases
    by_name = {}
    for (module, name), bases in classes.items():
        by_name.setdefault(name, []).append(bases)

    def is_exception(name, seen=()):
        if name in seen:
            return False
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type):
            return issubclass(builtin, BaseException)
        if name not in by_name:
            return name.endswith(("Error", "Exception"))
        return any(is_exception(b, (*seen, name)) for bases in by_name[name] for b in bases)

    def ancestors(name, seen=()):
        out = set()
        for bases in by_name.get(name, []):
            for b in bases:
                if b not in seen:
                    out |= {b} | ancestors(b, (*seen, name))
        return out

    return {key: ancestors(key[1]) for key in classes if is_exception(key[1])}


# Exceptions of the supervisor's modules that are not under mirrorfs.errors.Error, each with why:
# none today. A class added here must say why a caller may meet it outside the one tree.
OUTSIDE_THE_SUPERVISORS_TREE = {}


def test_every_exception_of_the_supervisor_has_one_root():
    """The supervisor's twin of the data path's rule: every exception class defined in its
    modules (every family but common and datapath) derives from mirrorfs.errors.Error, which the
    CLI turns into one line, and is drawn in mirrorfs/errors.py's tree; common's own tree is the
    control protocol's ControlError alone (drawn in mirrorfs/common/jsonlines.py), which each
    process converts where it crosses. The families are tests/unit/test_layers.py's."""
    import mirrorfs
    import mirrorfs.errors
    from mirrorfs.common import jsonlines
    package = Path(mirrorfs.__file__).parent
    found = _exception_classes(package)
    supervisor = {(m, n): a for (m, n), a in found.items()
                  if m.split(".")[1] not in ("common", "datapath")}
    assert supervisor, "no exception found: the walk is broken"
    outside = {n for (m, n), a in supervisor.items()
               if not (m == "mirrorfs.errors" and n == "Error") and "Error" not in a}
    assert outside == set(OUTSIDE_THE_SUPERVISORS_TREE), \
        "derive it from mirrorfs.errors.Error, or list it with why"
    drawing = mirrorfs.errors.__doc__.split("\n\n")[1].split()
    assert {n for (m, n) in supervisor if n not in drawing} == set(), \
        "draw it in mirrorfs/errors.py's tree"
    common = {n for (m, n) in found if m.split(".")[1] == "common"}
    assert common == {"ControlError"}, "common's tree is the control protocol's ControlError"
    assert "common's tree" in jsonlines.ControlError.__doc__


def test_the_supervisors_client_of_the_data_path_raises_its_own_tree(tmp_path):
    """The protocol's ControlError becomes the supervisor's Error at its one client of the data
    path's socket (ProcessTree.datapath), so no caller above meets common's exception."""
    from mirrorfs.common.jsonlines import ControlError
    from mirrorfs.daemons.tree import ProcessTree
    from mirrorfs.errors import Error
    tree = ProcessTree.__new__(ProcessTree)             # not started: no data path listens
    tree.rundir = tmp_path
    with pytest.raises(Error) as e:
        tree.datapath("status", timeout=1)
    assert not isinstance(e.value, ControlError)
    assert str(e.value) == f"no control socket at {tmp_path / 'datapath.ctl'} (is mirrorfs running?)"
    assert tree.datapath_status() == {"error": str(e.value)}


# An evacuation's Evacuee (switch first) on memory backends: held ranges, copy-on-read, in place.

@pytest.fixture
def evacuee(tmp_path):
    """evacuee(**kw): an Evacuee on two MemoryBackends, the source full of a pattern, its map in
    tmp_path; ev.reopen() is the map as a restart would load it."""
    from mirrorfs.datapath.evacuation.evacuee import Evacuee
    from mirrorfs.datapath.evacuation.hydration import HydrationMap
    from mirrorfs.datapath.sides import sideio
    made = []

    def make(in_place=False, **kw):
        src = MemoryBackend("source", SIZE)
        src.data[:] = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)
        dst = MemoryBackend("destination", SIZE)
        hmap = HydrationMap.open(tmp_path, SIZE, REGION, in_place=in_place,
                                 flush=lambda: sideio.flush(dst))
        ev = Evacuee(src, dst, hmap, in_place=in_place, **kw)
        ev.reopen = lambda: HydrationMap.open(tmp_path, SIZE, REGION, in_place=in_place)
        made.append(ev)
        return ev
    yield make
    for ev in made:
        if ev.copy_on_read is not None:
            ev.copy_on_read.stop()


def test_a_partial_write_while_the_source_fails_is_held_then_copied_around(evacuee):
    ev = evacuee()
    original = bytes(ev.source.data)
    ev.source.fail("read")
    offset, data = 3 * REGION + 4097, b"\x5a" * 3001
    ev.pwrite(data, offset, False)                  # the source cannot give the rest: held
    assert ev.map.held == {3: ((offset, offset + len(data)),)}
    saved = ev.reopen()                             # saved before the answer
    assert saved.held == ev.map.held and not saved.hydrated(3)
    buf = bytearray(len(data))
    ev.pread(buf, offset)
    assert bytes(buf) == data                       # the held bytes from the destination
    with pytest.raises(RequestError) as e:          # the rest of the region needs the source
        ev.pread(bytearray(4096), 3 * REGION)
    assert e.value.errno == errno.EIO
    ev.source.clear_faults()
    buf = bytearray(REGION)
    ev.pread(buf, 3 * REGION)
    expected = bytearray(original)
    expected[offset:offset + len(data)] = data
    assert bytes(buf) == expected[3 * REGION:4 * REGION]
    # Copying the region (the hydrator's verb) copies only what is not held.
    ev.copy_region(3)
    ev.map.commit([3])
    assert ev.map.hydrated(3) and ev.map.held == {} and ev.reopen().held == {}
    assert ev.dest.data[3 * REGION:4 * REGION] == expected[3 * REGION:4 * REGION]


def test_a_write_that_completes_a_held_region_hydrates_it(evacuee):
    ev = evacuee()
    ev.source.fail("read")
    lo = 5 * REGION
    ev.pwrite(b"\x01" * 1000, lo + 10, False)
    ev.zero(REGION - 1010, lo + 1010, False, False, False)   # the rest but [lo, lo + 10)
    assert 5 in ev.map.held and not ev.map.hydrated(5)
    ev.pwrite(b"\x02" * 10, lo, False)                        # the last bytes: complete
    assert ev.map.hydrated(5) and 5 not in ev.map.held and ev.reopen().hydrated(5)
    buf = bytearray(REGION)
    ev.pread(buf, lo)                                         # all from the destination
    assert bytes(buf) == b"\x02" * 10 + b"\x01" * 1000 + bytes(REGION - 1010)


def test_holes_in_place_are_saved_before_and_refused_elsewhere(tmp_path):
    """Holes (the rare path in place) survive a reopen, a commit that fills part of one keeps the
    rest, hydrating the region drops them; a map with holes is refused by a hydration through
    nbdkit (which would read the destination's zeros) and when its ranges are not the region's."""
    from mirrorfs.datapath.evacuation.hydration import HydrationError, HydrationMap
    m = HydrationMap.open(tmp_path, SIZE, REGION, in_place=True, flush=lambda: None)
    lo = 6 * REGION
    m.add_holes({6: [(lo + 100, lo + 65536), (lo, lo + 10)]})
    assert HydrationMap.open(tmp_path, SIZE, REGION, in_place=True).holes == {
        6: ((lo, lo + 10), (lo + 100, lo + 65536))}
    assert list(m.runs_in_place(lo, lo + 200)) == [(lo, 10, False), (lo + 10, 90, True),
                                                   (lo + 100, 100, False)]
    with pytest.raises(HydrationError, match="in place, not through nbdkit"):
        HydrationMap.open(tmp_path, SIZE, REGION)
    m.mark_filled(6, lo + 1000, lo + 2000)
    assert m.holes_to_copy(6) == ((lo, lo + 10), (lo + 100, lo + 1000), (lo + 2000, lo + 65536))
    m.commit((), filled={6: (lo + 1000, lo + 2000)})
    assert HydrationMap.open(tmp_path, SIZE, REGION, in_place=True).holes[6] == m.holes[6] == (
        (lo, lo + 10), (lo + 100, lo + 1000), (lo + 2000, lo + 65536))
    m.commit([6])
    assert m.holes == {} and HydrationMap.open(tmp_path, SIZE, REGION, in_place=True).holes == {}
    saved = json.loads((tmp_path / "hydration.map").read_text())
    assert saved["format"] == 2 and "holes" not in saved
    m.add_holes({7: [(7 * REGION - 5, 7 * REGION)]})    # not inside region 7: refused on load
    with pytest.raises(HydrationError, match="corrupt"):
        HydrationMap.open(tmp_path, SIZE, REGION, in_place=True)


UNIT = 64 * 1024


def test_in_place_a_write_the_source_cannot_fill_is_written_around_it(evacuee):
    """The rare path in place: the destination fails a write into part of a cluster (its daemon
    could not read the rest from the failing source): the cluster is written whole, zeros where
    the source fails, those saved as holes and read from the source; hydration copies them."""
    ev = evacuee(in_place=True, unit=UNIT)
    lo, offset, data = 3 * REGION, 3 * REGION + 1000, b"\x5a" * 500
    ev.source.fail("read")
    ev.dest.fail("write", times=1)          # as QEMU fails it: the cluster's rest unreadable
    ev.pwrite(data, offset, False)
    holes = {3: ((lo, offset), (offset + 500, lo + UNIT))}
    assert ev.map.holes == ev.reopen().holes == holes and ev.written_around == 1
    assert ev.dest.data[lo:lo + UNIT] == bytes(1000) + data + bytes(UNIT - 1500)
    buf = bytearray(500)
    ev.pread(buf, offset)
    assert bytes(buf) == data
    with pytest.raises(RequestError) as e:  # a hole: the source's, which fails
        ev.pread(bytearray(10), lo + 2000)
    assert e.value.errno == errno.EIO
    ev.source.clear_faults()
    whole = bytearray(UNIT)
    ev.pread(whole, lo)                     # the holes from the source, the write from here
    expected = bytearray(ev.source.data[lo:lo + UNIT])
    expected[1000:1500] = data
    assert whole == expected
    ev.copy_range(lo, lo + REGION)          # the hydrator's verb copies the holes
    ev.map.commit([3])
    assert ev.map.holes == {} and ev.dest.data[lo:lo + UNIT] == expected


def test_in_place_holes_are_saved_before_the_write_around(evacuee):
    """A write around that fails finds its holes saved already: saved after it, a crash between
    would leave the zeros readable."""
    ev = evacuee(in_place=True, unit=UNIT)
    lo = 4 * REGION
    ev.source.fail("read")
    ev.dest.fail("write", times=2)          # the client's write, then the write around it
    with pytest.raises(RequestError):
        ev.pwrite(b"\x01" * 10, lo + 5, False)
    assert ev.reopen().holes == {4: ((lo, lo + 5), (lo + 15, lo + UNIT))}


def test_in_place_a_write_around_keeps_what_the_destination_holds(evacuee):
    """A cluster the destination's own image holds (allocation depth 1) is read from it, not
    zeroed; the next, which the source holds and cannot give, becomes holes. A destination that
    cannot say who holds a cluster gets the write failed: nothing is guessed over its data."""
    ev = evacuee(in_place=True, unit=UNIT)
    lo = 5 * REGION
    ev.dest.data[lo:lo + UNIT] = b"\x77" * UNIT
    ev.dest.depths = [(lo, UNIT, 1)]
    ev.source.fail("read")
    ev.dest.fail("write", times=1)
    ev.pwrite(b"\x02" * 200, lo + UNIT - 100, False)     # across into the next cluster
    assert ev.dest.data[lo:lo + UNIT - 100] == b"\x77" * (UNIT - 100)
    assert ev.map.holes == {5: ((lo + UNIT + 100, lo + 2 * UNIT),)}
    ev.dest.fail("write", times=1)
    ev.dest.fail("depth", errno.ENOTSUP)
    with pytest.raises(RequestError):
        ev.pwrite(b"\x03" * 10, lo + 3 * UNIT + 1, False)
    assert ev.dest.data[lo + 3 * UNIT:lo + 4 * UNIT] == bytes(UNIT)
    assert 5 in ev.map.holes and len(ev.map.holes[5]) == 1


def test_a_partial_write_without_the_fallback_would_fail(evacuee):
    """The source readable: the common path (the region copied whole first), nothing held."""
    ev = evacuee()
    ev.pwrite(b"\x33" * 7, 2 * REGION + 1, False)
    assert ev.map.hydrated(2) and ev.map.held == {}
    assert ev.dest.data[2 * REGION] == ev.source.data[2 * REGION]


def test_copy_on_read_hydrates_what_a_client_reads(evacuee):
    ev = evacuee(copy_on_read=True)
    ev.copy_on_read.start()
    buf = bytearray(2 * REGION)
    ev.pread(buf, 7 * REGION)                       # two whole regions
    small = bytearray(100)
    ev.pread(small, 9 * REGION + 12345)             # part of a third
    wait_until(lambda: all(ev.map.hydrated(r) for r in (7, 8, 9)), "hydrated by reads")
    assert ev.copy_on_read.status()["bytes"] == 3 * REGION
    assert ev.reopen().hydrated(9)
    ev.source.fail("read")                          # now read from the destination alone
    again = bytearray(3 * REGION)
    ev.pread(again, 7 * REGION)
    assert bytes(again) == ev.source.data[7 * REGION:10 * REGION]


def test_copy_on_read_never_goes_over_a_newer_write(evacuee):
    ev = evacuee(copy_on_read=True)
    buf = bytearray(REGION)
    ev.pread(buf, 4 * REGION)                       # queued, the worker not started yet
    ev.pwrite(b"\x99" * 512, 4 * REGION + 512, False)
    ev.copy_on_read.start()
    time.sleep(0.2)
    assert ev.dest.data[4 * REGION + 512:4 * REGION + 1024] == b"\x99" * 512
    assert ev.copy_on_read.status()["bytes"] == 0


def test_in_place_a_failed_read_of_a_region_not_hydrated_is_the_sources(evacuee):
    ev = evacuee(in_place=True)
    ev.dest.fail("read", start=6 * REGION, end=7 * REGION)
    with pytest.raises(RequestError):
        ev.pread(bytearray(4096), 6 * REGION + 8192)
    s = ev.status()
    assert s["hydration"]["source_read_errors"] == 1
    assert s["hydration"]["failed_reads"][0]["offset"] == 6 * REGION + 8192
    assert s["sides"]["source"]["errors"] == 1 and s["sides"]["destination"]["errors"] == 0
    # A hydrated region's failure is the destination's own.
    ev.copy_region(6)
    ev.map.commit([6])
    with pytest.raises(RequestError):
        ev.pread(bytearray(4096), 6 * REGION)
    s = ev.status()
    assert s["hydration"]["source_read_errors"] == 1
    assert s["sides"]["destination"]["errors"] == 1


# serve's pivot compares the sides (tests/system/test_serve_pivot.py runs it for real).

def test_compare_finds_the_first_difference_skips_zeros_and_stops_at_its_deadline():
    """datapath.mirror.compare on two in-memory sides: the exact first differing byte (in a chunk after
    equal ones), zeros that both sides report skipped unread, and a deadline that stops it with
    what it compared (fewer bytes than the disk: not "identical")."""
    size = 16 * MiB
    src, dst = MemoryBackend("source", size), MemoryBackend("destination", size)
    disk = Disk(src, dst, DirtyMap(size, MiB))
    for side in (src, dst):
        side.data[CHUNK + 7:CHUNK + 4096] = b"\x11" * (4096 - 7)
    assert compare(disk) == (None, size)
    assert src.commands["read"] == dst.commands["read"] == 1     # the one chunk with data
    dst.data[2 * CHUNK + 12345] = 0x99
    assert compare(disk) == (2 * CHUNK + 12345, 2 * CHUNK)
    assert compare(disk, timeout=0) == (None, 0)
