"""An evacuation (`serve --switch-first`) whose destination is full: its errors are the
destination's, not the source's (docs/EVACUATION.md, "A full or failing destination").

The destination is a raw image behind qemu-nbd and nbdkit's error filter, which answers every
write and zero with ENOSPC while a trigger file exists: a destination out of room. While it is:
- status says the destination fails (`destination_failing`, the regions it cannot take with
  ENOSPC), and **not** the source (`source_failing` false, nothing `at risk`), in JSON and text;
- a client's write fails with ENOSPC, counted against the destination;
- the source, healthy, still serves reads of regions not hydrated.
Once there is room again the hydration ends by itself, and the destination holds the source's
bytes plus the client's write.
"""

import nbd
import pytest

from lib.commands import run
from lib.control import ctl, status as status_over
from lib.evacuation import raw_bytes, serve_switch_first
from lib.images import MiB, make_full_pair, sha256
from lib.nbdservers import NbdkitFilter
from lib.waits import wait_until

SIZE = 32 * MiB
WRITTEN = b"\x5a" * 65536


@pytest.fixture
def full_dest(workdir, qemu_nbd):
    dst = workdir / "dst.img"
    run("qemu-img", "create", "-q", "-f", "raw", dst, str(SIZE))
    backend = qemu_nbd(dst, "dstnbd", fmt="raw")
    trigger = workdir / "full-now"
    trigger.touch()
    front = NbdkitFilter(workdir, "full", backend.socket, "--filter=error", "error=ENOSPC",
                         "error-pwrite-rate=1", "error-zero-rate=1", f"error-file={trigger}")
    yield dst, front.uri, trigger
    front.stop()


def test_a_full_destination_is_reported_as_the_destinations_failure(workdir, full_dest):
    dst, uri, trigger = full_dest
    src, _ = make_full_pair(workdir, SIZE)
    source_hash = sha256(src)
    content = raw_bytes(workdir, src, "src")
    proc = serve_switch_first(workdir, src, uri, "--region", "1M")
    control = workdir / "d.sock.ctl"
    try:
        wait_until(lambda: status_over(control)["hydration"]["destination_failing"],
                   "the destination failing", timeout=60)
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={workdir / 'd.sock'}")
        with pytest.raises(nbd.Error) as e:
            h.pwrite(WRITTEN, 3 * MiB)
        assert e.value.errno == "ENOSPC", e.value
        # The source is healthy: a region not hydrated reads its data.
        assert h.pread(MiB, 4 * MiB) == content[4 * MiB:5 * MiB]

        s = status_over(control)
        hydration = s["hydration"]
        assert hydration["destination_failing"], hydration
        assert not hydration["source_failing"], hydration
        assert hydration["bytes_at_risk"] == 0 and hydration["unreadable"] == [], hydration
        assert hydration["source_read_errors"] == 0, hydration
        assert hydration["unwritable"] and all(
            u["side"] == "destination" and u["errno"] == "ENOSPC"
            for u in hydration["unwritable"]), hydration["unwritable"]
        assert hydration["destination_errors"] > 0, hydration
        sides = s["datapath"]["sides"]
        assert sides["destination"]["errors"] > 0 and sides["source"]["errors"] == 0, sides
        text = ctl(control, "status").stdout
        assert "failing:    the destination (ENOSPC)" in text, text
        assert "at risk:" not in text and "the source fails" not in text, text

        trigger.unlink()                # room again
        h.pwrite(WRITTEN, 3 * MiB)
        wait_until(lambda: status_over(control)["phase"] == "hydrated", "hydrated", timeout=300)
        h.shutdown()
    finally:
        proc.terminate()
        proc.wait(60)
    expected = bytearray(content)
    expected[3 * MiB:3 * MiB + len(WRITTEN)] = WRITTEN
    assert raw_bytes(workdir, dst, "dst") == bytes(expected)
    assert sha256(src) == source_hash
