"""A destination that loses power: what no flush or FUA covered is gone (tests/lib/lossy_plugin.py,
a raw file behind a volatile write cache in nbdkit's python plugin; kill -9 of it is the power
loss). A raw file served by a storage daemon keeps every write across kill -9, so only such a
destination tells a state saved after the destination's flush from one saved before it.

The rule (datapath/evacuation/hydration.py): a region is saved as hydrated only after the destination was
flushed with its copy on it. An evacuation through nbdkit hydrates at a limited rate while a
client writes with FUA at odd offsets; the destination and mirrorfs are killed at once; every
region the saved map names hydrated must hold, in the destination's file, the source's bytes and
the writes. Then the same command line resumes and the whole destination is compared.
"""

import random

import nbd
import psutil

from lib.commands import run
from lib.control import ctl, status as status_over
from lib.evacuation import saved_hydrated, raw_bytes, serve_switch_first
from lib.images import MiB, make_full_pair, sha256
from lib.nbdservers import LossyDisk
from lib.waits import wait_until

SIZE = 32 * MiB


def status(workdir):
    return status_over(workdir / "d.sock.ctl")


def kill_all(proc):
    """kill -9 of mirrorfs and every process under it, at once."""
    tree = [proc, *proc.children(recursive=True)]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def test_a_hydrated_region_survives_the_destinations_power_loss(workdir, qemu_nbd):
    src, _ = make_full_pair(workdir, SIZE)          # data in every other MiB
    src_hash = sha256(src)
    content = raw_bytes(workdir, src, "src")
    source = qemu_nbd(src, "srcnbd")
    dest = workdir / "dst.img"
    run("qemu-img", "create", "-q", "-f", "raw", dest, str(SIZE))
    lossy = LossyDisk(workdir, "dst", dest)
    command = (source.uri, lossy.uri, "--rate", "2M")
    expected = bytearray(content)
    rng = random.Random(29)
    proc = serve_switch_first(workdir, *command)
    try:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={workdir / 'd.sock'}")
        for r in (5, 12, 20, 27):                   # regions the hydrator has not reached
            offset, data = r * MiB + rng.randrange(1, MiB - 9000), rng.randbytes(8191)
            h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
            expected[offset:offset + len(data)] = data
        h.shutdown()
        wait_until(lambda: status(workdir)["hydration"]["bytes_done"] >= 10 * MiB,
                   "10 MiB hydrated", timeout=120)
    finally:
        lossy.power_loss()                          # the host loses power: both at once
        kill_all(proc)
    saved = HydrationBits(workdir)
    # The written regions, and regions of the source's data the hydrator copied (even MiBs).
    assert {5, 12, 20, 27} <= saved.hydrated, saved.hydrated
    assert len({r for r in saved.hydrated if r % 2 == 0}) >= 3, saved.hydrated
    after = dest.read_bytes()
    lost = [r for r in sorted(saved.hydrated)
            if after[r * MiB:(r + 1) * MiB] != expected[r * MiB:(r + 1) * MiB]]
    assert not lost, (f"regions {lost} are saved as hydrated but the destination lost their "
                      "copy: the map was saved before the destination's flush")
    # The same command line resumes over what the destination kept, and ends.
    lossy = LossyDisk(workdir, "dst", dest)
    proc = serve_switch_first(workdir, *command)
    try:
        ctl(workdir / "d.sock.ctl", "rate", "none")
        wait_until(lambda: status(workdir)["phase"] == "hydrated", "hydrated", timeout=300)
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            kill_all(proc)
        lossy.stop()
    assert sha256(src) == src_hash, "the source image changed"
    assert dest.read_bytes() == expected


class HydrationBits:
    """The regions the saved hydration map names hydrated."""

    def __init__(self, workdir):
        region_size, self.hydrated = saved_hydrated(workdir / "state")
        assert region_size == MiB, region_size
