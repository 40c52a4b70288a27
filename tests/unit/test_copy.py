"""The one copy of a range (mirrorfs.datapath.sides.copy), between memory sides, as ovirt-imageio
tests its copy between memory backends and a failing one: data, zeros and holes, chunk boundaries,
the sides' maxima, a stop between two chunks, the pacer outside the guard, a failing side. Every
copier of mirrorfs (the mirror's copier, the hydrator, the base copy) is this loop.

No mocks: memory backends (mirrorfs.datapath.sides.memory), the real pacer.
"""

import errno
import threading
import time

import pytest

from mirrorfs.common.pacing import Pacer
from mirrorfs.datapath.sides import resend as resend_module
from mirrorfs.datapath.sides.copy import PIECE, SideFailure, copy_range
from mirrorfs.datapath.sides.memory import EXTENT, MemoryBackend

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB


def pattern(n, seed=1):
    return (bytes(range(seed, 256)) + bytes(range(1, seed))) * (n // 255 + 1)


def sides(**dest_capabilities):
    """A source with data at [0, 100K), [300K, 300K + 5), [1M - 4K, 1M + 64K), [3M - 100K, 4M), zeros
    elsewhere; a destination full of 0xff, so a byte the copy skips shows."""
    src = MemoryBackend("source", SIZE)
    for lo, hi in ((0, 100 * KiB), (300 * KiB, 300 * KiB + 5), (MiB - 4 * KiB, MiB + 64 * KiB),
                   (3 * MiB - 100 * KiB, SIZE)):
        src.data[lo:hi] = pattern(hi - lo, lo % 251 + 1)[:hi - lo]
    dst = MemoryBackend("destination", SIZE, **dest_capabilities)
    dst.data[:] = b"\xff" * SIZE
    return src, dst


def data_bytes(side, lo, hi):
    """Bytes in [lo, hi) the side's block status calls data (whole EXTENTs that are not all zero)."""
    return sum(n for _, n, zero in side.allocation(lo, hi) if not zero)


def test_data_is_read_and_zeros_and_holes_become_zero_requests():
    src, dst = sides()
    done = copy_range(src, dst, 0, SIZE)
    assert dst.data == src.data
    data = (100 + 4 + 68 + 1024 + 100) * KiB            # whole EXTENTs: 5 bytes are 4 KiB of data
    assert done == (data, SIZE - data, SIZE)
    # Read in pieces of PIECE at most (the extent of 1M + 100K is two), zeros in one request each.
    assert src.commands["read"] == dst.commands["write"] == 5
    assert dst.commands["zero"] == 3 and src.commands["extents"] == 1


def test_a_destination_known_zero_gets_no_zero_request():
    src, dst = sides()
    done = copy_range(src, dst, 0, SIZE, dest_zero=True)
    assert done.zeroed == 0 and dst.commands["zero"] == 0
    for offset, length, zero in src.allocation(0, SIZE):
        expected = b"\xff" * length if zero else src.data[offset:offset + length]
        assert dst.data[offset:offset + length] == expected


def test_chunks_cover_the_range_once_in_order_and_data_across_a_boundary_is_whole():
    """A range that starts and ends inside data, in chunks of 64 KiB: the extent across the 1 MiB
    boundary is copied whole, bytes outside the range are not touched, and each chunk is guarded
    (entered and left) and handed to `after` once, after its guard was left."""
    src, dst = sides()
    start, end = 50 * KiB, MiB + 10 * KiB
    events = []

    class Guard:
        def __init__(self, lo, hi):
            self.span = (lo, hi)

        def __enter__(self):
            events.append(("enter", self.span))

        def __exit__(self, *exc):
            events.append(("leave", self.span))

    done = copy_range(src, dst, start, end, chunk=64 * KiB, guard=Guard,
                      after=lambda lo, hi, read, zeroed: events.append(("after", (lo, hi))))
    assert done.end == end
    assert dst.data[start:end] == src.data[start:end]
    assert set(dst.data[:start]) == set(dst.data[end:]) == {0xff}
    spans = [(lo, min(lo + 64 * KiB, end)) for lo in range(start, end, 64 * KiB)]
    assert events == [(what, s) for s in spans for what in ("enter", "leave", "after")]
    assert done.read == data_bytes(src, start, end) and done.read + done.zeroed == end - start


def test_reads_and_writes_are_split_at_the_smaller_sides_maximum():
    src, dst = sides(block_size=(1, 4096, 64 * KiB))
    assert PIECE > 64 * KiB
    done = copy_range(src, dst, 3 * MiB, SIZE)
    assert dst.data[3 * MiB:] == src.data[3 * MiB:] and done.read == MiB
    assert src.commands["read"] == dst.commands["write"] == MiB // (64 * KiB)


def test_a_stop_between_two_chunks_ends_the_copy_there():
    src, dst = sides()
    stop = threading.Event()
    done = copy_range(src, dst, 3 * MiB, SIZE, chunk=256 * KiB, stop=stop,
                      after=lambda *chunk: stop.set())
    assert done.end == 3 * MiB + 256 * KiB and done.read == 256 * KiB
    assert dst.data[3 * MiB:done.end] == src.data[3 * MiB:done.end]
    assert set(dst.data[done.end:]) == {0xff}


def test_a_paced_chunk_waits_for_its_rate_outside_the_guard_and_a_stop_ends_the_wait():
    """At 1 byte/s the first chunk goes at once (the pacer's burst) and the second waits for its
    rate: with no guard held (a client write to those bytes must not wait for the rate), until the
    stop. Only data is paid for."""
    src, dst = sides()
    pacer, stop = Pacer(1), threading.Event()
    inside = []

    class Guard:
        def __init__(self, lo, hi):
            pass

        def __enter__(self):
            inside.append(1)

        def __exit__(self, *exc):
            inside.pop()

    copier = threading.Thread(target=lambda: result.append(copy_range(
        src, dst, MiB - 64 * KiB, SIZE, chunk=MiB, smallest=128 * KiB, pacer=pacer, stop=stop,
        guard=Guard)), daemon=True)
    result = []
    copier.start()
    try:
        deadline = time.monotonic() + 10
        while dst.commands["write"] + dst.commands["zero"] == 0:
            assert time.monotonic() < deadline, "the first chunk was not copied"
            time.sleep(0.005)
        time.sleep(0.05)
        assert copier.is_alive() and inside == [], "the chunk waiting for its rate holds the guard"
    finally:
        stop.set()
        copier.join(10)
    (done,) = result
    assert done.end == MiB + 64 * KiB                   # 128 KiB: the smallest chunk
    assert pacer.paid == done.read == data_bytes(src, MiB - 64 * KiB, MiB + 64 * KiB)
    assert dst.data[MiB - 64 * KiB:done.end] == src.data[MiB - 64 * KiB:done.end]


def test_a_failing_read_names_the_source_and_its_chunk_and_writes_nothing_of_it():
    src, dst = sides()
    src.fail("read", errno.EIO, start=3 * MiB + 300 * KiB, end=3 * MiB + 301 * KiB)
    left = []

    class Guard:
        def __init__(self, lo, hi):
            pass

        def __enter__(self):
            pass

        def __exit__(self, kind, exc, tb):
            left.append(kind)

    pacer = Pacer(1 << 40)
    with pytest.raises(SideFailure) as failed:
        copy_range(src, dst, 3 * MiB, SIZE, chunk=256 * KiB, pacer=pacer, guard=Guard)
    e = failed.value
    assert (e.side, e.op, e.offset, e.length, e.errno) == (src, "read", 3 * MiB + 256 * KiB,
                                                           256 * KiB, errno.EIO)
    assert left == [None, SideFailure]                  # the guard saw the chunk fail
    assert dst.data[3 * MiB:3 * MiB + 256 * KiB] == src.data[3 * MiB:3 * MiB + 256 * KiB]
    assert set(dst.data[3 * MiB + 256 * KiB:]) == {0xff}
    assert pacer.paid == 256 * KiB                      # the failed chunk is given back


def test_a_failing_block_status_or_write_names_its_side():
    src, dst = sides()
    src.fail("extents", errno.EIO, times=1)
    with pytest.raises(SideFailure) as failed:
        copy_range(src, dst, 0, MiB)
    assert (failed.value.side, failed.value.op) == (src, "extents")
    dst.fail("zero", errno.ENOSPC)
    with pytest.raises(SideFailure) as failed:
        copy_range(src, dst, 0, MiB)
    assert (failed.value.side, failed.value.op, failed.value.errno) == (dst, "write", errno.ENOSPC)


def test_a_lost_connection_is_sent_again_only_when_asked(monkeypatch):
    monkeypatch.setattr(resend_module, "RESEND_EVERY", 0.001)
    src, dst = sides()
    dst.fail("write", errno.ECONNRESET, times=1)
    with pytest.raises(SideFailure) as failed:
        copy_range(src, dst, 0, MiB)
    assert failed.value.cause.lost
    dst.fail("write", errno.ECONNRESET, times=1)
    src.fail("read", errno.ENOTCONN, times=1)
    done = copy_range(src, dst, 0, MiB, resend=True)
    assert dst.data[:MiB] == src.data[:MiB] and done.end == MiB


def test_the_memory_sides_block_status_is_what_these_tests_assume():
    src, _ = sides()
    assert EXTENT == 4096
    assert list(src.allocation(0, 400 * KiB)) == [
        (0, 100 * KiB, False), (100 * KiB, 200 * KiB, True), (300 * KiB, 4 * KiB, False),
        (304 * KiB, 96 * KiB, True)]
