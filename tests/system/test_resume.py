"""Full mode and crash-safe resume: kill -9 at seeded points of the copy or of the mirroring, with
writers busy, restart on the same state, and check that every acknowledged write is on both sides
and that the sides are identical. Where the kill lands is a condition the test waits for (bytes
copied, writes acknowledged) and then asserts from the saved state, not a sleep.

Property style, seeded: `pytest tests/system/test_resume.py -k 'seed-3'` reruns one case. The rule these
exercise under load is tested deterministically, one held write at a time, in test_intent.py.
"""

import random
import signal
import threading
import time

import psutil
import pytest

from lib.commands import MIRRORFS
from lib.control import saved_state, status_of
from lib.images import images_identical, make_full_pair
from lib.processes import kill_mirrorfs
from lib.waits import wait_until
from lib.writers import SIZE, WRITERS, Model, acknowledged, lost_blocks, writer

def make_pair(workdir):
    return make_full_pair(workdir, SIZE)


def serve(workdir, src, dst, *extra):
    out = open(workdir / "serve.out", "w")
    err = open(workdir / "serve.err", "a")
    proc = psutil.Popen([*MIRRORFS, "serve", "--copy", "full", "--state-dir", workdir / "state",
                         "--region", "1M", src, dst, "--socket", workdir / "d.sock", *extra],
                        stdout=out, stderr=err)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "control" in (workdir / "serve.out").read_text():
            return proc
        assert proc.poll() is None, (workdir / "serve.err").read_text()
        time.sleep(0.02)
    raise AssertionError("not ready")


def uri_of(workdir):
    return f"nbd+unix:///?socket={workdir / 'd.sock'}"


def status(workdir):
    return status_of(workdir / "d.sock.ctl")


def wait_synchronized(workdir):
    return wait_until(lambda: (s := status(workdir))["phase"] == "synchronized" and s,
                      "synchronized")


def writers_then_kill(uri, pid, seed, model, ready, before_kill=lambda: None):
    """Writers on `uri` until `ready()` says the moment has come (and at least 50 writes were
    acknowledged), then `before_kill()` (to check where the kill lands) and kill -9 of mirrorfs and
    nbdkit while they write. A write that failed before the kill fails the test."""
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(uri, random.Random(seed * 10 + i), i, model, stop))
               for i in range(WRITERS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: model.errors or (model.writes >= 50 and ready()), "ready to kill")
        assert not model.errors, model.errors
        before_kill()
    finally:
        model.killing.set()
        kill_mirrorfs(pid)                  # also when the test failed: nothing is left running
        stop.set()
        for t in threads:
            t.join()
    assert not model.errors, model.errors


def check(workdir, src, dst, model):
    same, detail = images_identical(src, dst)
    assert same, detail
    bad = lost_blocks(src, acknowledged(model), workdir)
    assert not bad, f"{len(bad)} acknowledged writes lost, e.g. blocks {bad[:5]}"


@pytest.mark.parametrize("seed", range(8), ids=lambda s: f"seed-{s}")
def test_kill_during_copy_and_writes_then_resume(workdir, seed):
    print(f"seed={seed}")
    rng = random.Random(seed)
    src, dst = make_pair(workdir)
    model = Model()
    # The kill lands once the first pass has copied a seeded part of the disk, with writes racing
    # it. The rate limit leaves the test a second or more to get there before the copy ends; if a
    # busy machine takes longer, the saved state says so below and the test fails, never passes
    # without having killed mid-copy.
    proc = serve(workdir, src, dst, "--rate", "12M")
    point = int(SIZE * rng.uniform(0.05, 0.5))

    def copied_enough():
        return status(workdir)["datapath"]["copy"]["first_pass_bytes"] >= point

    writers_then_kill(uri_of(workdir), proc.pid, seed, model, copied_enough)
    proc.wait()
    state = saved_state(workdir / "state")
    assert state["phase"] == "copying" and state["cursor"] < SIZE, "the kill was not mid-copy"

    proc = serve(workdir, src, dst)
    s = status(workdir)
    assert s["mirror"]["resumed"] is True
    wait_synchronized(workdir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    check(workdir, src, dst, model)


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed-{s}")
def test_kill_while_mirroring_after_the_copy_then_resume(workdir, seed):
    """Once synchronized, only write intent protects the sides: kill in the middle of writes."""
    print(f"seed={seed}")
    rng = random.Random(seed)
    src, dst = make_pair(workdir)
    model = Model()
    proc = serve(workdir, src, dst)
    wait_synchronized(workdir)
    enough = model.writes + rng.randrange(50, 2000)

    def mirroring():
        assert status(workdir)["phase"] == "synchronized"

    writers_then_kill(uri_of(workdir), proc.pid, seed, model, lambda: model.writes >= enough,
                      mirroring)
    proc.wait()
    state = saved_state(workdir / "state")
    assert state["phase"] == "synchronized", "the kill was not while mirroring"
    assert state["dirty"], "writes were in flight, yet no region was marked"

    proc = serve(workdir, src, dst)
    wait_synchronized(workdir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    check(workdir, src, dst, model)
