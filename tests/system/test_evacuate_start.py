"""`mirrorfs start --switch-first` (and with `--take-over`): a disk's chain evacuated into one new
image in --dest-dir, which serves every write from the first second (control/evacuation.py).

Every test checks bytes: the destination ends as the source chain's content plus every
acknowledged write (`qemu-img compare` against a reference built from both), stands alone (no
backing file), and every file of the source chain is byte-for-byte what it was (SHA-256 before
and after).
"""

import os
import json

import nbd
import psutil
import pytest

from lib.commands import MIRRORFS, run
from lib.control import ctl, status
from lib.evacuation import Clients, Model, raw_bytes
from lib.images import MiB, make_base, make_overlay, qemu_io, sha256
from lib.processes import our_processes
from lib.reconnecting import BLOCK, ReconnectingWriter
from lib.served import Process
from lib.waits import wait_until

SIZE = 64 * MiB


def chain(workdir):
    """a/vm1.qcow2 on a/base.qcow2: the base's patterns (some 30 MiB of data), and the overlay's
    own 3 MiB."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    base = make_base(workdir / "a" / "base.qcow2", SIZE)
    qemu_io(base, f"write -P 0x5c {40 * MiB} {20 * MiB}", fmt="qcow2")     # more to hydrate
    top = make_overlay(workdir / "a" / "vm1.qcow2", base)
    qemu_io(top, f"write -P 0x6b {5 * MiB + 4096} {3 * MiB}", fmt="qcow2")
    return top, {p: sha256(p) for p in (base, top)}


def backing_chain(image):
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", "--backing-chain",
                          image).stdout)
    return [layer["filename"] for layer in info]


def same_as_reference(workdir, image, content):
    """`qemu-img compare` of `image` against a raw file holding `content`."""
    reference = workdir / "reference.raw"
    reference.write_bytes(content)
    res = run("qemu-img", "compare", "-U", "-f", "raw", reference, image, check=False)
    reference.unlink()
    assert res.returncode == 0, res.stdout + res.stderr


def holders(paths):
    """Our processes that have one of `paths` open."""
    names = {str(p) for p in paths}
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(f.path in names for f in p.open_files()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def check_source(hashes):
    for path, digest in hashes.items():
        assert sha256(path) == digest, f"the source file {path} changed"


@pytest.fixture
def started():
    procs = []

    def start(workdir, name, *args):
        p = Process(workdir, name, *args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def test_start_switch_first_with_clients_writing(workdir, started):
    """Clients write (FUA, odd offsets and sizes, across regions) and read while the chain
    hydrates; no pivot, no cancel, no copy; at the end the new image stands alone and holds the
    chain's content plus every acknowledged write, and the chain did not change."""
    top, hashes = chain(workdir)
    content = raw_bytes(workdir, top, "src")
    model = Model(content)
    sock = workdir / "d.sock"
    argv = ("start", "--switch-first", top, "--dest-dir", workdir / "b", "--state-dir",
            workdir / "state", "--socket", sock, "--rate", "12M")
    m = started(workdir, "m", *argv)
    dest = workdir / "b" / "vm1.qcow2"
    first = status(m.control)
    assert first["phase"] == "hydrating" and first["destination"]["spec"] == str(dest), first
    assert backing_chain(dest) == [str(dest)]
    assert not (workdir / "a" / "vm1-snap.qcow2").exists()
    clients = Clients(f"nbd+unix:///?socket={sock}", 3, model)
    try:
        wait_until(lambda: status(m.control)["hydration"]["percent"] > 20, "hydrating")
        # Held at 1K/s while the four refusals run, so that hydration cannot end under them on a
        # slow machine (each command is a process start: at 12M the rest took as little as 4 s).
        ctl(m.control, "rate", "1K")
        for command, says in (("pivot", "switch-first"), ("cancel", "switch-first"),
                              ("copy", "nothing to copy"), ("hand-back", "while hydrating")):
            res = ctl(m.control, command, check=False)
            assert res.returncode == 1 and says in res.stderr, (command, res.stderr)
        assert status(m.control)["phase"] == "hydrating"
        ctl(m.control, "rate", "12M")
        wait_until(lambda: status(m.control)["phase"] == "hydrated", "hydrated", timeout=300)
    finally:
        clients.join()
    assert model.writes > 50 and model.reads > 5, (model.writes, model.reads)
    done = status(m.control)
    assert done["serving"] == "destination" and done["hydration"]["bytes_on_source_only"] == 0
    assert done["datapath"]["hydration"]["in_place"] is True
    # Released: no process of ours holds a file of the source chain open any more (the
    # destination's daemon had it as its runtime backing).
    assert wait_until(lambda: not holders(hashes), "the source released")
    # Not taken over from an export: nothing to hand back to.
    res = ctl(m.control, "hand-back", check=False)
    assert res.returncode == 1 and "did not take the disk over" in res.stderr, res.stderr
    assert m.stop() == 0
    check_source(hashes)
    assert backing_chain(dest) == [str(dest)]
    same_as_reference(workdir, dest, bytes(model.expected))
    # The same command line after the end serves the destination alone.
    again = started(workdir, "again", *argv)
    assert status(again.control)["phase"] == "hydrated"
    assert again.stop() == 0
    check_source(hashes)


def test_take_over_switch_first_killed_resumed_handed_back(workdir, started):
    """An export's disk taken over for an evacuation while a reconnecting client writes; kill -9
    of the supervisor during hydration (the export keeps the socket); the same command line
    borrows it again and resumes; hand-back gives the export the new image, alone. No write
    fails; the final image is the chain's content plus every write."""
    top, _ = chain(workdir)
    sock = workdir / "vm1.sock"
    exported = started(workdir, "export", "export", top, "--socket", sock)
    writer = ReconnectingWriter(sock, blocks=SIZE // BLOCK, spacing=0.02)
    writer.wait_sent(30)
    argv = ("start", "--take-over", exported.control, "--switch-first", "--dest-dir",
            workdir / "b", "--state-dir", workdir / "state", "--rate", "4M")
    first = started(workdir, "first", *argv)
    assert status(exported.control)["phase"] == "lent"
    # From the take-over on, nothing writes the chain (the export wrote it until then).
    hashes = {p: sha256(p) for p in (top, workdir / "a" / "base.qcow2")}
    content = bytearray(raw_bytes(workdir, top, "src"))
    wait_until(lambda: status(first.control)["hydration"]["percent"] > 20, "hydrating")
    writer.wait_sent(writer.sent + 50)
    first.kill_tree()
    lent = status(exported.control)
    assert lent["phase"] == "lent" and lent["lent"]["alive"] is False, lent
    assert json.loads((workdir / "state" / "state.json").read_text())["phase"] == "hydrating"
    check_source(hashes)
    again = started(workdir, "again", *argv)
    resumed = status(again.control)
    assert resumed["phase"] == "hydrating" and 0 < resumed["hydration"]["percent"] < 100, resumed
    ctl(again.control, "rate", "none")      # resumed under way: the rest may go at full speed
    wait_until(lambda: status(again.control)["phase"] == "hydrated", "hydrated", timeout=300)
    writer.wait_sent(writer.sent + 30)
    assert "handed back" in ctl(again.control, "hand-back").stdout
    assert again.proc.wait(30) == 0
    dest = workdir / "b" / "vm1.qcow2"
    assert status(exported.control)["source"]["spec"] == str(dest)
    writer.wait_sent(writer.sent + 30)
    written = writer.stop()
    assert exported.stop() == 0
    check_source(hashes)
    assert backing_chain(dest) == [str(dest)]
    for i in range(written):
        content[i * BLOCK:(i + 1) * BLOCK] = bytes([i % 250 + 1]) * BLOCK
    same_as_reference(workdir, dest, bytes(content))


def test_start_switch_first_copy_on_read(workdir, started):
    """--copy-on-read reaches the data path from `start`: a region a client read is hydrated
    (in place, one NBD_CMD_CACHE) while the hydrator, held back by --rate, is elsewhere."""
    top, hashes = chain(workdir)
    content = raw_bytes(workdir, top, "src")
    sock = workdir / "d.sock"
    m = started(workdir, "m", "start", "--switch-first", top, "--dest-dir", workdir / "b",
                "--state-dir", workdir / "state", "--socket", sock, "--rate", "1M",
                "--copy-on-read")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    at = len(content) - 2 * MiB
    assert h.pread(MiB, at) == content[at:at + MiB]
    h.shutdown()
    s = wait_until(lambda: (s := status(m.control)["hydration"])["bytes_copied_on_read"] and s,
                   "hydrated by copy-on-read")
    assert s["bytes_copied_on_read"] == MiB and s["copy_on_read"], s
    assert m.stop() == 0
    check_source(hashes)


def _fails(workdir, *args, status_, text):
    res = run(*MIRRORFS, *map(str, args), check=False, timeout=120)
    assert res.stderr.startswith("mirrorfs: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert text in res.stderr and res.returncode == status_, (res.returncode, res.stderr)
    # Ours only: the session's Ceph cluster (lib.ceph) is a child of pytest too.
    assert not our_processes(os.fspath(workdir))


def test_bad_inputs(workdir):
    top, hashes = chain(workdir)
    b = workdir / "b"
    common = ("start", "--switch-first", top, "--dest-dir", b, "--socket", workdir / "d.sock")
    state = ("--state-dir", workdir / "state")
    _fails(workdir, *common, status_=2, text="--switch-first needs --state-dir")
    _fails(workdir, *common, *state, "--overlay-name", "x.qcow2", status_=2, text="no overlay")
    _fails(workdir, "start", top, "--dest-dir", b, "--socket", workdir / "d.sock", *state,
           "--rate", "1M", status_=2, text="--rate limits the hydration")
    _fails(workdir, "start", top, "--dest-dir", b, "--socket", workdir / "d.sock", *state,
           "--copy-on-read", status_=2, text="--copy-on-read hydrates the regions a client reads")
    _fails(workdir, *common[:3], "--dest-dir", workdir / "a", "--socket", workdir / "d.sock",
           *state, status_=2, text="is the source's directory")
    (b / "vm1.qcow2").write_bytes(b"")
    _fails(workdir, *common, *state, status_=2, text="already exists")
    (b / "vm1.qcow2").unlink()
    # What an evacuation handed back leaves in its state directory is not reused for another.
    (workdir / "state").mkdir()
    (workdir / "state" / "hydration.map").write_text("{}")
    _fails(workdir, *common, *state, status_=2, text="belongs to another evacuation")
    assert not (b / "vm1.qcow2").exists()
    check_source(hashes)
