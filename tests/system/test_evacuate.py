"""`mirrorfs serve --copy full --switch-first`: the destination takes every write from the first
second, the source is only read, and a background hydration copies the rest (docs/EVACUATION.md).

Every test checks bytes: the destination ends as the source's content plus every acknowledged
write, and the source image's file is byte-for-byte what it was (its SHA-256 before and after).
Writers write at odd offsets and sizes, each in stripes of its own, with FUA, so every
acknowledged write must survive even a `kill -9` of the destination's storage daemon; a reader
checks reads of regions nobody writes (hydrated or not) against the source meanwhile.

Seeded: `pytest tests/system/test_evacuate.py -k 'nbdkit-2'` reruns one case.
"""

import os
import random
import shutil
import subprocess
import time

import nbd
import psutil
import pytest

from lib.commands import MIRRORFS, run
from lib.evacuation import Clients, Model, raw_bytes, saved_hydrated
from lib.failures import serve_fails
from lib.control import saved_state, status_of
from lib.images import MiB, make_full_pair, sha256
from lib.waits import wait_until

SIZE = 64 * MiB
RATE = "12M"
KILL_RATE = "4M"


def settle(model, read):
    """After a kill: each write that was in flight holds, byte by byte, its old or its new data;
    from now on the model expects what is there (`read(offset, length)`)."""
    for offset, data in model.maybe.values():
        got = read(offset, len(data))
        old = model.expected[offset:offset + len(data)]
        assert all(g in (o, d) for g, o, d in zip(got, old, data)), \
            f"the write in flight at {offset} left neither old nor new bytes"
        model.expected[offset:offset + len(data)] = got
    model.maybe.clear()


def read_through(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return lambda offset, length: h.pread(length, offset)


def check(workdir, src, dst, model, source_hash):
    assert sha256(src) == source_hash, "the source image changed"
    final = raw_bytes(workdir, dst, "dst")
    settle(model, lambda offset, length: final[offset:offset + length])
    if final != model.expected:
        first = next(i for i, (a, b) in enumerate(zip(final, model.expected)) if a != b)
        raise AssertionError(f"the destination differs from the expected disk at {first}")
    chain = run("qemu-img", "info", "-U", "--backing-chain", dst).stdout
    assert str(src) not in chain, chain


def serve(workdir, src, dst, *extra, rate=RATE):
    out = workdir / "serve.out"
    out.write_text("")
    proc = psutil.Popen([*MIRRORFS, "serve", "--copy", "full", "--switch-first", "--state-dir",
                         workdir / "state", src, dst, "--socket", workdir / "d.sock",
                         "--rate", rate, *extra],
                        stdout=open(out, "w"), stderr=open(workdir / "serve.err", "a"))
    deadline = time.monotonic() + 120
    while "control" not in out.read_text():
        assert proc.poll() is None, (workdir / "serve.err").read_text()
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.02)
    return proc


def uri_of(workdir):
    return f"nbd+unix:///?socket={workdir / 'd.sock'}"


def status(workdir):
    return status_of(workdir / "d.sock.ctl")


def hydrated_bytes(workdir):
    return status(workdir)["hydration"]["bytes_done"]


def wait_hydrated(workdir):
    return wait_until(lambda: (s := status(workdir))["phase"] == "hydrated" and s, "hydrated",
                      timeout=300)


def stop(proc):
    proc.terminate()
    assert proc.wait(60) == 0


# Two ways to hydrate: in place (an empty qcow2 destination: its daemon copies from the source,
# its runtime backing) and through nbdkit (any other destination; a raw one here).
MODES = {"in-place": True, "through-nbdkit": False}


@pytest.fixture(params=list(MODES))
def pair(workdir, request):
    src, dst = make_full_pair(workdir, SIZE)
    if not MODES[request.param]:
        dst.unlink()
        dst = workdir / "dst.img"          # not dst.raw: raw_bytes() writes that
        run("qemu-img", "create", "-q", "-f", "raw", dst, str(SIZE))
    return src, dst, sha256(src), raw_bytes(workdir, src, "src")


def in_place(workdir):
    return status(workdir)["datapath"]["hydration"]["in_place"]


def test_evacuation_with_clients_writing(workdir, pair):
    src, dst, source_hash, content = pair
    model = Model(content)
    proc = serve(workdir, src, dst)
    try:
        first = status(workdir)
        assert first["phase"] == "hydrating", first
        assert first["datapath"]["hydration"]["in_place"] == (dst.suffix == ".qcow2")
        assert first["serving"] is None or first["serving"] != "source"
        clients = Clients(uri_of(workdir), 1, model)
        try:
            s = wait_until(lambda: (s := status(workdir))["hydration"]["percent"] > 30 and s,
                           "hydrating")
            assert s["hydration"]["bytes_total"] == SIZE
            assert s["hydration"]["bytes_on_source_only"] == SIZE - s["hydration"]["bytes_done"]
            assert s["hydration"]["bytes_at_risk"] == 0
            # No cancel, no pivot: the source lacks the writes, the destination already serves.
            for command in ("cancel", "pivot"):
                res = run(*MIRRORFS, command, "--control", workdir / "d.sock.ctl", check=False)
                assert res.returncode == 1 and "switch-first" in res.stderr, res.stderr
            done = wait_hydrated(workdir)
            assert done["serving"] == "destination"
        finally:
            clients.join()
        assert model.writes > 50 and model.reads > 5, (model.writes, model.reads)
        events = [e.get("phase") for e in done["events"]]
        assert "hydrated" in events, done["events"]
        assert saved_state(workdir / "state")["phase"] == "switched"
    finally:
        stop(proc)
    check(workdir, src, dst, model, source_hash)
    # The same command line after the end serves the destination alone.
    proc = serve(workdir, src, dst)
    try:
        assert status(workdir)["phase"] == "hydrated"
    finally:
        stop(proc)
    assert sha256(src) == source_hash


def _mentions(proc, workdir):
    try:
        return os.fspath(workdir) in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _victims(proc, which):
    children = proc.children(recursive=True)
    if which == "supervisor":
        return [proc]
    if which == "nbdkit":
        return [p for p in children if p.name() == "nbdkit"]
    name = {"source-daemon": "src.pid", "destination-daemon": "dst.pid"}[which]
    return [p for p in children if name in " ".join(p.cmdline())]


@pytest.mark.parametrize("victim,seed", [(v, s) for v in ("nbdkit", "supervisor",
                                                         "destination-daemon", "source-daemon")
                                         for s in (1, 2)], ids=lambda x: str(x))
@pytest.mark.parametrize("pair", ["in-place"], indirect=True)
def test_kill_9_during_hydration_resumes(workdir, pair, victim, seed):
    kill_9_and_resume(workdir, pair, victim, seed)


# serial: through nbdkit, each client write into a region not hydrated yet hydrates it whole; on a
# loaded machine the clients hydrate the rest of the disk between the seeded point seen and the
# kill, and the kill lands after the end (seen twice in 3 parallel runs, never alone).
@pytest.mark.serial
@pytest.mark.parametrize("victim", ["supervisor", "destination-daemon"])
@pytest.mark.parametrize("pair", ["through-nbdkit"], indirect=True)
def test_kill_9_during_hydration_through_nbdkit_resumes(workdir, pair, victim):
    kill_9_and_resume(workdir, pair, victim, 3)


def kill_9_and_resume(workdir, pair, victim, seed):
    """kill -9 of one process at a seeded point of the hydration while clients write; the same
    command line resumes; at the end every acknowledged write is on the destination, every other
    byte is the source's, and the source did not change."""
    src, dst, source_hash, content = pair
    rng = random.Random(seed)
    model = Model(content)
    # Slow enough that the rest of the hydration after the seeded point (30% of the disk at least)
    # takes seconds: on a loaded machine, at RATE, it ended between the point seen and the kill.
    proc = serve(workdir, src, dst, rate=KILL_RATE)
    clients = Clients(uri_of(workdir), seed, model)
    try:
        at = rng.randrange(10, 70) * SIZE // 100
        wait_until(lambda: model.errors or (model.writes >= 30 and hydrated_bytes(workdir) >= at),
                   "ready to kill")
        assert not model.errors, model.errors
    finally:
        model.killing.set()
        victims = _victims(proc, victim)
        assert victims, victim
        for p in victims:
            p.kill()
        proc.wait(60)
        # What the kill left of this test's tree (not the session's Ceph cluster, also our child).
        kill_rest = [p for p in psutil.Process().children(recursive=True)
                     if p.is_running() and _mentions(p, workdir)]
        psutil.wait_procs(kill_rest, timeout=30)
        clients.stop.set()
        for t in clients.threads:
            t.join(120)
    assert not model.errors, model.errors
    assert saved_state(workdir / "state")["phase"] == "hydrating"
    assert sha256(src) == source_hash
    # Resume, with clients writing again.
    model.killing.clear()
    proc = serve(workdir, src, dst, rate=KILL_RATE)
    try:
        # The kill landed during hydration: the rest may go at full speed.
        run(*MIRRORFS, "rate", "none", "--control", workdir / "d.sock.ctl")
        settle(model, read_through(uri_of(workdir)))
        clients = Clients(uri_of(workdir), seed + 100, model)
        try:
            wait_hydrated(workdir)
        finally:
            clients.join()
    finally:
        stop(proc)
    check(workdir, src, dst, model, source_hash)


def test_source_on_a_full_file_system(workdir):
    """The case the mode is for: the source's file system is full (no write could succeed there);
    the disk moves with a client writing, and no write fails."""
    mount = workdir / "full"
    mount.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", mount)
    try:
        src, dst = make_full_pair(workdir, 16 * MiB)
        shutil.move(src, mount / "src.qcow2")
        src = mount / "src.qcow2"
        filler = mount / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\xff" * MiB)
                    f.flush()
            except OSError:
                pass
        assert os.statvfs(mount).f_bavail == 0
        source_hash = sha256(src)
        content = raw_bytes(workdir, src, "src")
        model = Model(content)
        proc = serve(workdir, src, dst)
        try:
            clients = Clients(uri_of(workdir), 7, model)
            try:
                wait_hydrated(workdir)
            finally:
                clients.join()
        finally:
            stop(proc)
        assert model.writes > 10
        assert sha256(src) == source_hash
        final = raw_bytes(workdir, dst, "dst")
        assert final == model.expected
    finally:
        subprocess.run(["umount", "-l", os.fspath(mount)])


def test_failing_source(workdir, qemu_nbd):
    """The source starts failing every read during hydration (nbdkit's error filter): hydrated
    regions and writes that need no source data keep working, a read of a region not hydrated
    fails with the source's errno and is counted with its offset, status says how many bytes
    exist on the failing source alone; once the source answers again, hydration finishes."""
    from lib.nbdservers import NbdkitFilter
    src, dst = make_full_pair(workdir, SIZE)
    source_hash = sha256(src)
    content = raw_bytes(workdir, src, "src")
    backend = qemu_nbd(src, "srcnbd")
    trigger = workdir / "fail-now"
    front = NbdkitFilter(workdir, "failing", backend.socket, "--filter=error", "error=EIO",
                         "error-pread-rate=1", f"error-file={trigger}")
    region = MiB
    try:
        proc = psutil.Popen([*MIRRORFS, "serve", "--copy", "full", "--switch-first", "--state-dir",
                             workdir / "state", front.uri, dst, "--socket", workdir / "d.sock",
                             "--rate", "4M"], stdout=open(workdir / "serve.out", "w"),
                            stderr=open(workdir / "serve.err", "w"))
        try:
            wait_until(lambda: "control" in (workdir / "serve.out").read_text(), "ready")
            # A quarter, and the first region among it, saved (its hydrators run in parallel: on
            # a loaded machine the one that took region 0 may still be copying it).
            wait_until(lambda: hydrated_bytes(workdir) >= SIZE // 4
                       and 0 in saved_hydrated(workdir / "state")[1], "a quarter hydrated")
            trigger.touch()
            s = wait_until(lambda: (s := status(workdir))["hydration"]["unreadable"] and s,
                           "the hydrator sees the failure")
            done = s["hydration"]["bytes_done"]
            assert done < SIZE - 4 * region, "hydrated too fast for the test"
            h = nbd.NBD()
            h.connect_uri(uri_of(workdir))
            expected = bytearray(content)
            # A partial write into a hydrated region, and a read of it.
            h.pwrite(b"\x77" * 1000, 4097, nbd.CMD_FLAG_FUA)
            expected[4097:5097] = b"\x77" * 1000
            assert h.pread(region, 0) == bytes(expected[:region])
            # A write of a whole region not hydrated needs nothing of the source.
            last = SIZE - region
            h.pwrite(b"\x88" * region, last, nbd.CMD_FLAG_FUA)
            expected[last:] = b"\x88" * region
            assert h.pread(region, last) == bytes(expected[last:])
            # A read of a region that is not hydrated fails with the source's errno.
            before = status(workdir)["hydration"]["source_read_errors"]
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, last - region + 12288)
            assert e.value.errno == "EIO"
            s = status(workdir)["hydration"]
            assert s["source_read_errors"] == before + 1
            assert any(f["offset"] <= last - region + 12288 < f["offset"] + f["length"]
                       for f in s["failed_reads"]), s["failed_reads"]
            assert s["source_failing"]
            assert s["bytes_at_risk"] == SIZE - s["bytes_done"] > 0
            text = run(*MIRRORFS, "status", "--control", workdir / "d.sock.ctl").stdout
            assert "at risk" in text, text
            # The source answers again: hydration retries and finishes.
            trigger.unlink()
            h.shutdown()
            wait_hydrated(workdir)
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        front.stop()
    backend.stop()
    assert sha256(src) == source_hash
    assert raw_bytes(workdir, dst, "dst") == expected


# Bad input: one line, the exact exit status, nothing started, nothing changed.

def _fails(workdir, args, status_, text, command="serve", allowed=()):
    if command != "serve":
        res = subprocess.run([*MIRRORFS, command, *map(str, args)], capture_output=True, text=True,
                             timeout=120)
        assert res.stderr.startswith("mirrorfs: error: ") and res.stderr.count("\n") == 1, res.stderr
        assert text in res.stderr, res.stderr
    else:
        serve_fails(workdir, *args, expect=text, status=status_, allowed_pids=allowed)
        return
    assert res.returncode == status_, res.stderr


def test_bad_inputs(workdir, qemu_nbd):
    src, dst = make_full_pair(workdir, 8 * MiB)
    small = workdir / "small.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", small, str(4 * MiB))
    sock = ["--socket", workdir / "d.sock"]
    state = ["--state-dir", workdir / "state"]
    _fails(workdir, ["--copy", "full", "--switch-first", src, dst, *sock], 2,
           "--switch-first needs --state-dir")
    _fails(workdir, ["--switch-first", *state, src, dst, *sock], 2, "give --copy full")
    _fails(workdir, ["--copy", "full", "--switch-first", *state, src, small, *sock], 2,
           "smaller than source")
    _fails(workdir, ["--readonly", "--switch-first", *state, src, *sock], 2, "--readonly")
    # A source another process writes cannot be opened read-only (its write lock).
    holder = qemu_nbd(src, "holder")
    _fails(workdir, ["--copy", "full", "--switch-first", *state, src, dst, *sock], 1,
           "lock", allowed=(holder.proc.pid,))


def test_copy_on_read_with_clients_writing(workdir, pair):
    """--copy-on-read while clients write at odd offsets and read (their own stripes, and the
    regions nobody writes): regions hydrate from the clients' reads too, never over a write, and
    the destination ends as the source plus every acknowledged write."""
    src, dst, source_hash, content = pair
    model = Model(content)
    proc = serve(workdir, src, dst, "--copy-on-read")
    try:
        clients = Clients(uri_of(workdir), 5, model)
        try:
            done = wait_hydrated(workdir)
        finally:
            clients.join()
        assert model.writes > 50 and model.reads > 5, (model.writes, model.reads)
        assert done["hydration"]["copy_on_read"] and done["hydration"]["bytes_copied_on_read"] > 0
    finally:
        stop(proc)
    check(workdir, src, dst, model, source_hash)
