"""An evacuation (`serve --switch-first`) whose source fails every read (nbdkit's error filter, a
trigger file), through real processes (docs/EVACUATION.md, "A failing source"):

- a write of part of a region not hydrated (odd offset and size, across a region boundary)
  succeeds although the rest of the region exists only on the failing source: its bytes read
  back, the rest of the region fails with EIO; it survives kill -9 of nbdkit and the same
  command line; once the source answers, hydration copies around it and ends;
- in place (the source an image *file* whose reads fail: nbdfuse over the error filter), a
  failed read of a region not hydrated is the source's: counted with its offset, and at risk;
- --copy-on-read: the regions a client read are hydrated before the hydrator gets there, so
  reads of them go on when the source fails.

Every test ends with the destination's bytes against the source's content plus the writes, and
the source image's SHA-256 against what it was.
"""

import json
import random
import threading
import time

import nbd
import psutil
import pytest

from lib.commands import MIRRORFS, run
from lib.control import ctl, status as status_over
from lib.evacuation import STRIPE, raw_bytes, serve_switch_first
from lib.images import MiB, make_full_pair, sha256
from lib.nbdservers import FuseFile, NbdkitFilter
from lib.waits import wait_until
from mirrorfs.datapath.sides.resend import RESEND_FOR

SIZE = 64 * MiB
REGION = MiB
# The hydrator's first batches (4 workers, 8 regions each) go at once; at 1M/s the next ones wait
# for half a minute, so the regions from 40 MiB on are not hydrated while a test runs.
RATE = "1M"


class FailingSource:
    """src.qcow2 (data in every other MiB) behind qemu-nbd and nbdkit's error filter: `uri` fails
    every read and block status while `trigger` exists (`fail()`, `recover()`): a dead source,
    which cannot even say where its zeros are."""

    def __init__(self, workdir, qemu_nbd):
        self.image, self.empty_qcow2 = make_full_pair(workdir, SIZE)
        self.hash = sha256(self.image)
        self.content = raw_bytes(workdir, self.image, "src")
        self.trigger = workdir / "fail-now"
        backend = qemu_nbd(self.image, "srcnbd")
        self.front = NbdkitFilter(workdir, "failing", backend.socket, "--filter=error",
                                  "error=EIO", "error-pread-rate=1", "error-extents-rate=1",
                                  f"error-file={self.trigger}")
        self.uri = self.front.uri

    def fail(self):
        self.trigger.touch()

    def recover(self):
        self.trigger.unlink()


@pytest.fixture
def source(workdir, qemu_nbd):
    s = FailingSource(workdir, qemu_nbd)
    yield s
    s.front.stop()


def raw_dest(workdir):
    dst = workdir / "dst.img"
    run("qemu-img", "create", "-q", "-f", "raw", dst, str(SIZE))
    return dst


def status(workdir):
    return status_over(workdir / "d.sock.ctl")


def saved_map(workdir):
    return json.loads((workdir / "state" / "hydration.map").read_text())


def client(workdir):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={workdir / 'd.sock'}")
    return h


def fails_with_eio(h, length, offset, errno="EIO"):
    with pytest.raises(nbd.Error) as e:
        h.pread(length, offset)
    assert errno is None or e.value.errno == errno, e.value


def wait_hydrated(workdir):
    wait_until(lambda: status(workdir)["phase"] == "hydrated", "hydrated", timeout=300)


def stop(proc):
    proc.terminate()
    assert proc.wait(60) == 0


def finish(workdir, proc, source, dest, expected, gone=None):
    """The source answers again: hydration ends; the destination is `expected`, the source
    image unchanged, and the saved map has no `gone` ranges ("held", "holes") left."""
    source.recover()
    try:
        # What is left may go at full speed (--rate kept it from finishing during the test).
        ctl(workdir / "d.sock.ctl", "rate", "none")
        wait_hydrated(workdir)
    finally:
        stop(proc)
    assert sha256(source.image) == source.hash, "the source image changed"
    final = raw_bytes(workdir, dest, "dst")
    if final != expected:
        first = next(i for i, (a, b) in enumerate(zip(final, expected)) if a != b)
        raise AssertionError(f"the destination differs from the expected disk at {first}")
    if gone is not None:
        assert gone not in saved_map(workdir)


def abort(proc):
    """A test failed while mirrorfs serves: stop it (its whole tree) before the fixtures go."""
    proc.terminate()
    try:
        proc.wait(60)
    except psutil.TimeoutExpired:
        for p in [proc, *proc.children(recursive=True)]:
            p.kill()


def kill_nbdkit(proc):
    """kill -9 of the data path's nbdkit; the supervisor and its children end after it."""
    tree = proc.children(recursive=True)
    victims = [p for p in tree if p.name() == "nbdkit"]
    assert victims
    for p in victims:
        p.kill()
    proc.wait(60)
    psutil.wait_procs(tree, timeout=30)


# A write across the boundary of regions 60 (data in the source) and 61 (zeros in the source).
OFFSET = 61 * MiB - 30001
LENGTH = 70001


@pytest.mark.parametrize("kill", [False, True], ids=["answered", "nbdkit-killed"])
def test_a_partial_write_while_the_source_fails(workdir, source, kill):
    dest = raw_dest(workdir)
    command = (source.uri, dest, "--rate", RATE)
    expected = bytearray(source.content)
    data = random.Random(19).randbytes(LENGTH)
    proc = serve_switch_first(workdir, *command)
    try:
        source.fail()
        h = client(workdir)
        h.pwrite(data, OFFSET, nbd.CMD_FLAG_FUA)
        expected[OFFSET:OFFSET + LENGTH] = data
        assert h.pread(LENGTH, OFFSET) == data
        assert h.pread(7, OFFSET + 5) == data[5:12]
        fails_with_eio(h, 4096, 60 * MiB)            # the rest of the regions: the source's
        fails_with_eio(h, 1, OFFSET + LENGTH)
        h.shutdown()
        s = status(workdir)["hydration"]
        assert s["bytes_held"] == LENGTH and s["held_changes"] == 1, s
        assert s["bytes_on_source_only"] == SIZE - s["bytes_done"] - LENGTH, s
        saved = saved_map(workdir)
        assert saved["held"] == {"60": [[OFFSET, 61 * MiB]], "61": [[61 * MiB, OFFSET + LENGTH]]}
        if kill:
            kill_nbdkit(proc)
            proc = serve_switch_first(workdir, *command)    # the source still fails
            h = client(workdir)
            assert h.pread(LENGTH, OFFSET) == data
            fails_with_eio(h, 4096, 60 * MiB)
            h.shutdown()
    except BaseException:
        abort(proc)
        raise
    finish(workdir, proc, source, dest, expected, gone="held")


@pytest.fixture(params=["through-nbdkit", "in-place"])
def failing_sides(request, workdir, source):
    """(source spec, destination, in place?): the failing source as a URI into a raw image
    (through nbdkit), or as an image file into an empty qcow2 (in place)."""
    if request.param == "through-nbdkit":
        yield source.uri, raw_dest(workdir), False
        return
    f = FuseFile(workdir, "srcfile", source.uri)
    yield f.path, source.empty_qcow2, True
    f.stop()


def test_clients_write_at_odd_offsets_while_the_source_fails(workdir, source, failing_sides):
    """Three clients write at odd offsets and sizes (each in stripes of its own, with FUA) while
    the source fails every read: no write fails, each reads back, and the held ranges (through
    nbdkit) or holes (in place) they leave, many in a region, are copied around once the source
    answers."""
    spec, dest, in_place = failing_sides
    expected = bytearray(source.content)
    lock = threading.Lock()
    errors, writes = [], [0]
    stop = threading.Event()

    def write(index):
        rng = random.Random(1900 + index)
        h = client(workdir)
        stripes = SIZE // STRIPE
        try:
            while not stop.is_set():
                stripe = rng.randrange(index, stripes, 3)
                offset = stripe * STRIPE + rng.randrange(0, STRIPE - 1)
                length = rng.randrange(1, min(70000, (stripe + 1) * STRIPE - offset) + 1)
                data = rng.randbytes(length)
                h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
                with lock:
                    expected[offset:offset + length] = data
                    writes[0] += 1
                if h.pread(length, offset) != data:
                    errors.append(f"client {index}: [{offset}, {offset + length}) differs")
                    return
        except nbd.Error as e:
            errors.append(f"client {index}: {e}")
        finally:
            h.shutdown()

    proc = serve_switch_first(workdir, spec, dest, "--rate", RATE)
    try:
        assert status(workdir)["datapath"]["hydration"]["in_place"] == in_place
        source.fail()
        threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: errors or writes[0] >= 300, "300 writes")
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(120)
        assert not errors, errors
        s = status(workdir)["hydration"]
        if in_place:
            assert s["written_around"] > 50 and s["bytes_in_holes"] > 0, s
        else:
            assert s["held_changes"] > 50 and s["bytes_held"] > 0, s
    except BaseException:
        stop.set()
        abort(proc)
        raise
    finish(workdir, proc, source, dest, expected)


@pytest.fixture
def fuse_source(workdir, source):
    """The failing source as an image file (raw, read-only), so the evacuation hydrates in place
    into an empty qcow2."""
    f = FuseFile(workdir, "srcfile", source.uri)
    yield f
    f.stop()


def test_in_place_a_failed_read_is_the_sources(workdir, source, fuse_source):
    dest = source.empty_qcow2
    proc = serve_switch_first(workdir, fuse_source.path, dest, "--rate", RATE)
    try:
        assert status(workdir)["datapath"]["hydration"]["in_place"]
        source.fail()
        h = client(workdir)
        at = 50 * MiB + 8192
        # QEMU 7.2's NBD server drops the connection when a read fails (its log: "Disconnect
        # client, due to: Failed to send reply: reading from file failed"): the data path sends
        # the read again once, on a new connection, which is dropped too; so the read fails with
        # EIO at once (errors.lost_again), not after 30 s of resending with nbdkit's EINVAL.
        asked = time.monotonic()
        fails_with_eio(h, 4096, at)
        # A deadline, not a speed: sent again until RESEND_FOR, it would take 30 s at least.
        assert time.monotonic() - asked < RESEND_FOR / 2
        h.shutdown()
        s = status(workdir)
        hydration = s["hydration"]
        assert hydration["source_read_errors"] == 1, hydration
        assert any(f["offset"] <= at < f["offset"] + f["length"]
                   for f in hydration["failed_reads"]), hydration["failed_reads"]
        assert hydration["source_failing"]
        assert hydration["bytes_at_risk"] == SIZE - hydration["bytes_done"] > 0
        sides = s["datapath"]["sides"]
        assert sides["source"]["errors_by_op"].get("read", 0) >= 1, sides
        assert sides["destination"]["errors_by_op"].get("read", 0) == 0, sides
    except BaseException:
        abort(proc)
        raise
    finish(workdir, proc, source, dest, source.content)


# In place (the destination a qcow2 with 64 KiB clusters): a cluster the destination holds (a write
# made while the source answered) and the next one, which it does not hold; both with the source's
# data around them.
HELD_CLUSTER = 50 * MiB + 128 * 1024
NEXT_CLUSTER = HELD_CLUSTER + 64 * 1024


@pytest.mark.parametrize("kill", [False, True], ids=["answered", "nbdkit-killed"])
def test_in_place_a_partial_write_while_the_source_fails(workdir, source, fuse_source, kill):
    """In place, the destination's daemon fills the rest of a cluster a write touches from the
    source: while the source fails, the write is written around the bytes it cannot read (the
    cluster whole, zeros there, saved as holes first), which read from the source; what the
    destination held of such a cluster stays."""
    dest = source.empty_qcow2
    command = (fuse_source.path, dest, "--rate", RATE)
    expected = bytearray(source.content)
    rng = random.Random(1919)
    writes = []                             # (offset, data) in order
    proc = serve_switch_first(workdir, *command)
    try:
        assert status(workdir)["datapath"]["hydration"]["in_place"]
        h = client(workdir)

        def write(offset, data):
            h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
            expected[offset:offset + len(data)] = data
            writes.append((offset, data))

        write(HELD_CLUSTER + 10000, rng.randbytes(1000))     # the source answers: qcow2's fill
        source.fail()
        write(HELD_CLUSTER + 30000, rng.randbytes(64 * 1024 - 30000 + 5000))    # into the next
        h.zero(3000, 52 * MiB + 777)
        expected[52 * MiB + 777:52 * MiB + 3777] = bytes(3000)
        holes = {"50": [[NEXT_CLUSTER + 5000, NEXT_CLUSTER + 65536]],
                 "52": [[52 * MiB, 52 * MiB + 777], [52 * MiB + 3777, 52 * MiB + 65536]]}
        saved = saved_map(workdir)
        assert saved["holes"] == holes and saved["format"] == 4, saved
        write(NEXT_CLUSTER + 6000, rng.randbytes(100))      # into a hole: it is filled
        holes["50"] = [[NEXT_CLUSTER + 5000, NEXT_CLUSTER + 6000],
                       [NEXT_CLUSTER + 6100, NEXT_CLUSTER + 65536]]
        saved = saved_map(workdir)
        assert saved["holes"] == holes, saved
        s = status(workdir)["hydration"]
        assert s["written_around"] == 2, s
        assert s["bytes_in_holes"] == sum(b - a for v in holes.values() for a, b in v), s

        def check(h):
            # The whole cluster the destination held: the source's data, the first write, the
            # second: none of it needs the failing source.
            assert h.pread(65536, HELD_CLUSTER) == expected[HELD_CLUSTER:NEXT_CLUSTER]
            assert h.pread(5000, NEXT_CLUSTER) == expected[NEXT_CLUSTER:NEXT_CLUSTER + 5000]
            assert h.pread(100, NEXT_CLUSTER + 6000) == writes[-1][1]
            assert h.pread(3000, 52 * MiB + 777) == bytes(3000)
            for offset in (NEXT_CLUSTER + 5000, NEXT_CLUSTER + 6100, 52 * MiB + 3777,
                           52 * MiB, NEXT_CLUSTER + 65536):
                fails_with_eio(h, 1, offset)    # the holes, and what follows: the source's

        check(h)
        h.shutdown()
        if kill:
            kill_nbdkit(proc)
            # In place, a restart opens the source image (QEMU reads its header), which a source
            # that fails every read does not allow: it answers for the restart, then fails again.
            source.recover()
            proc = serve_switch_first(workdir, *command)
            source.fail()
            h = client(workdir)
            check(h)
            h.shutdown()
    except BaseException:
        abort(proc)
        raise
    finish(workdir, proc, source, dest, expected, gone="holes")


@pytest.fixture(params=["through-nbdkit", "in-place"])
def copy_on_read_sides(request, workdir, source):
    """(source spec, destination, the errno of a failed read) of an evacuation in each way to
    hydrate (in place, QEMU's server drops the connection instead, and the read fails with EIO
    all the same: see above)."""
    if request.param == "through-nbdkit":
        yield source.uri, raw_dest(workdir), "EIO"
        return
    f = FuseFile(workdir, "srcfile", source.uri)
    yield f.path, source.empty_qcow2, "EIO"
    f.stop()


def test_copy_on_read_hydrates_what_a_client_reads(workdir, source, copy_on_read_sides):
    spec, dest, failed_errno = copy_on_read_sides
    content = source.content
    proc = serve_switch_first(workdir, spec, dest, "--rate", RATE, "--copy-on-read")
    try:
        h = client(workdir)
        assert h.pread(2 * MiB, 56 * MiB) == content[56 * MiB:58 * MiB]     # two regions whole
        assert h.pread(1000, 59 * MiB + 777) == content[59 * MiB + 777:59 * MiB + 1777]  # a part
        s = wait_until(lambda: (s := status(workdir)["hydration"])["bytes_copied_on_read"]
                       >= 3 * REGION and s, "hydrated by copy-on-read")
        assert s["bytes_copied_on_read"] == 3 * REGION, s
        text = run(*MIRRORFS, "status", "--control", workdir / "d.sock.ctl").stdout
        assert "copy-on-read: 3.0 MiB" in text, text
        source.fail()
        # What the client read is on the destination now; what it did not read is not.
        assert h.pread(2 * MiB, 56 * MiB) == content[56 * MiB:58 * MiB]
        assert h.pread(REGION, 59 * MiB) == content[59 * MiB:60 * MiB]
        fails_with_eio(h, 4096, 58 * MiB, failed_errno)
        h.shutdown()
    except BaseException:
        abort(proc)
        raise
    finish(workdir, proc, source, dest, content)
