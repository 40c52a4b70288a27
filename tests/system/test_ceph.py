"""A disk moves to Ceph and back (issue #13): `rbd:` SOURCE and DEST against a real one-node cluster
(tests/lib/ceph.py, the session's `ceph_cluster`), bad input on the Ceph side, an OSD that goes away
during the copy, and a pool that fills up. Bytes are compared with qemu-img compare on the `rbd:`
specs; nothing here reads mirrorfs's logs to decide whether data arrived."""

import hashlib
import json
import os
import subprocess
import time

import nbd
import pytest

from lib.commands import EXIT_ERROR, EXIT_USAGE, MIRRORFS, run
from lib.failures import snapshot
from lib.images import MiB, images_identical, qemu_io
from lib.nbdservers import PausableFront
from lib.processes import our_processes
from lib.readme import check_commands

pytestmark = pytest.mark.ceph

SIZE = 64 * MiB


def make_source(path, size=SIZE, every=2):
    """A qcow2 with a pattern in every `every`-th MiB of its first half (0x30, 0x31, ...)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    qemu_io(path, *[f"write -P {0x30 + i % 0x40} {i * every * MiB} {MiB}"
                    for i in range(size // (2 * every * MiB))], fmt="qcow2")
    return path


def status(control):
    return json.loads(run(*MIRRORFS, "status", "--json", "--control", control).stdout)


def wait_for(control, done, what, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        s = status(control)
        if done(s):
            return s
        assert time.monotonic() < deadline, f"never {what}: {s}"
        time.sleep(0.2)


def synchronized(control, timeout=90):
    return wait_for(control, lambda s: s["phase"] == "synchronized", "synchronized", timeout)


def write(uri, *writes):
    """(offset, length, byte) writes through the served disk, as a client would."""
    h = nbd.NBD()
    h.connect_uri(uri)
    for offset, length, byte in writes:
        h.pwrite(bytes([byte]) * length, offset)
    h.flush()
    h.shutdown()


def apply(image, *writes, fmt="qcow2"):
    """The same writes on an image file, to build the content the other side must now have."""
    qemu_io(image, *[f"write -P {byte} {offset} {length}" for offset, length, byte in writes],
            fmt=fmt)


def mirrorfs_argv(argv):
    argv = [str(a) for a in argv]
    return ["mirrorfs", *argv[len(MIRRORFS):]] if argv[:len(MIRRORFS)] == MIRRORFS else argv


# docs/USING.md's section "Moving a disk to Ceph", as it is written.

def test_a_disk_moves_to_ceph_and_back(ceph_cluster, workdir, serve, monkeypatch):
    # docs/USING.md relies on librados's default configuration; here that is CEPH_CONF.
    monkeypatch.setenv("CEPH_CONF", str(ceph_cluster.conf))
    disk_file = make_source(workdir / "disk.qcow2")
    ran = []

    create = ["rbd", "create", "--size", "64M", "rbd/vm1"]
    run(*create)
    served = serve("--copy", "full", "--state-dir", workdir / "state", "--rate", "32M",
                   disk_file, "rbd:rbd/vm1", name="vm1")
    during = [(3 * MiB + 512, 8192, 0x61), (40 * MiB, MiB, 0x62)]
    write(served.uri, *during)                    # while the copier runs (2 s at 32M/s)
    status_cmd = [*MIRRORFS, "status", "--json", "--control", served.control]
    s = synchronized(served.control)
    assert json.loads(run(*status_cmd).stdout)["phase"] == "synchronized"
    pivot = [*MIRRORFS, "pivot", "--control", served.control]
    assert "switched" in run(*pivot).stdout
    after = [(5 * MiB, 4096, 0x63), (63 * MiB, MiB, 0x64)]
    write(served.uri, *after)                     # only the RBD image has these now
    assert served.stop() == 0
    assert s["datapath"]["requests"].get("write", 0) >= 2
    ran += [create, served.argv, status_cmd, pivot]

    apply(disk_file, *after)                      # `during` reached both sides through mirrorfs
    same, detail = images_identical(disk_file, "rbd:rbd/vm1")
    assert same, detail

    # And back: the RBD image is the source, a new qcow2 file the destination.
    back = workdir / "back" / "disk.qcow2"
    back.parent.mkdir()
    create_back = ["qemu-img", "create", "-f", "qcow2", back, "64M"]
    run(*create_back)
    served = serve("--copy", "full", "rbd:rbd/vm1", back, name="vm1")
    synchronized(served.control)
    pivot_back = [*MIRRORFS, "pivot", "--control", served.control]
    assert "switched" in run(*pivot_back).stdout
    assert served.stop() == 0
    ran += [create_back, served.argv, pivot_back]
    same, detail = images_identical(disk_file, back)
    assert same, detail

    check_commands("Moving a disk to Ceph", {
        "/srv/vm1/disk.qcow2": str(disk_file), "/var/lib/mirrorfs/vm1": str(workdir / "state"),
        "/run/vm1.sock": str(workdir / "vm1.sock"), "/srv/back": str(back.parent), "10G": "64M",
        "500M": "32M"}, [mirrorfs_argv(a) for a in ran])


def test_rbd_specs_with_conf_and_id(ceph_cluster, workdir, serve):
    """conf= and id= in the spec, no CEPH_CONF: RBD on both sides, the copy and a pivot."""
    for name in ("pair-src", "pair-dst"):
        ceph_cluster.rbd("create", "--size", "64M", f"rbd/{name}")
    source = f"{ceph_cluster.spec('pair-src')}:id=admin"
    dest = f"{ceph_cluster.spec('pair-dst')}:id=admin"
    assert "CEPH_CONF" not in os.environ
    qemu_io(source, "write -P 0x71 0 3M", "write -P 0x72 20M 1M")
    served = serve("--copy", "full", source, dest)
    synchronized(served.control)
    write(served.uri, (2 * MiB, 4096, 0x73))
    assert "switched" in run(*MIRRORFS, "pivot", "--control", served.control).stdout
    assert served.stop() == 0
    qemu_io(source, "write -P 0x73 2M 4k")
    same, detail = images_identical(source, dest)
    assert same, detail


# Bad input on the Ceph side: one line, the exit status below, nothing changed, nothing left running.

@pytest.fixture(scope="module")
def bad_input_images(ceph_cluster):
    ceph_cluster.rbd("create", "--size", "32M", "rbd/small")
    ceph_cluster.rbd("create", "--size", "64M", "rbd/fine")
    # client.bob has a keyring, but not the key the cluster knows (it knows no bob at all).
    ceph_cluster.run("ceph-authtool", "--create-keyring",
                     ceph_cluster.root / "keyrings" / "client.bob.keyring", "--gen-key",
                     "-n", "client.bob")
    # A configuration whose monitor address nobody answers on.
    dead = ceph_cluster.root / "dead.conf"
    dead.write_text(ceph_cluster.conf.read_text().replace(f":{ceph_cluster.port}", ":9"))
    return {"small": "small", "fine": "fine", "dead": dead}


# (build, expected text, exit status). README ("Exit status") calls all of these bad input (2);
# what is found when the image is opened exits 1 today, as in test_bad_input.py (OPENING_FAILS).
OPENING_FAILS = EXIT_ERROR
BAD_RBD = {
    "missing_pool": (lambda c, i: f"rbd:nopool/fine:conf={c.conf}",
                     "pool nopool does not exist", OPENING_FAILS),
    "missing_image": (lambda c, i: c.spec("nothing"), "image rbd/nothing does not exist", OPENING_FAILS),
    "wrong_key": (lambda c, i: f"{c.spec('fine')}:id=bob",
                  "the cluster refused the credentials of client.bob", OPENING_FAILS),
    "no_keyring": (lambda c, i: f"{c.spec('fine')}:id=carol", "no keyring for client.carol", OPENING_FAILS),
    "dest_smaller": (lambda c, i: c.spec("small"), "is smaller than source", EXIT_USAGE),
    "monitor_unreachable": (lambda c, i: f"rbd:rbd/fine:conf={i['dead']}",
                            "no Ceph monitor answered in 10s", OPENING_FAILS),
    "conf_missing": (lambda c, i: "rbd:rbd/fine:conf=/nonexistent/ceph.conf", "no such file", EXIT_USAGE),
    "bad_spec": (lambda c, i: "rbd:fine", "expected rbd:POOL/IMAGE", EXIT_USAGE),
    "unknown_option": (lambda c, i: f"{c.spec('fine')}:mon_host=1.2.3.4",
                       "unknown or empty option 'mon_host=1.2.3.4'", EXIT_USAGE),
}


@pytest.mark.parametrize("name", BAD_RBD)
def test_bad_rbd_destination(name, ceph_cluster, bad_input_images, workdir):
    build, expect, status = BAD_RBD[name]
    dest = build(ceph_cluster, bad_input_images)
    source = make_source(workdir / "src.qcow2")
    digests = {i: ceph_cluster.digest(i) for i in ("small", "fine")}
    before = snapshot(workdir)
    env = dict(os.environ, XDG_RUNTIME_DIR=os.fspath(workdir))
    started = time.monotonic()
    res = subprocess.run([*MIRRORFS, "serve", "--copy", "full", str(source), dest,
                          "--socket", str(workdir / "d.sock")], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, env=env, timeout=60)
    elapsed = time.monotonic() - started
    err = res.stderr
    assert res.returncode == status and "Traceback" not in err, (res.returncode, err)
    assert err.startswith("mirrorfs: error: ") and err.count("\n") == 1, f"not one line: {err!r}"
    assert expect in err, err
    # The monitor's wait is bounded (rbd.MON_TIMEOUT, 10 s): well under librados's 300 s.
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert not our_processes(os.fspath(workdir))
    assert snapshot(workdir) == before
    assert {i: ceph_cluster.digest(i) for i in digests} == digests


FULL_RATIOS = {"nearfull": "0.0005", "backfillfull": "0.0008", "full": "0.001"}
NORMAL_RATIOS = {"full": "0.97", "backfillfull": "0.95", "nearfull": "0.9"}


def make_full(ceph_cluster, how):
    """A pool `how` full, with an image in it: its quota reached, or the cluster's OSDs over their
    full ratio. Returns the pool, and the function that gives the room back."""
    if how == "quota":
        pool = "fullquota"
        ceph_cluster.ceph("osd", "pool", "create", pool, "8")
        ceph_cluster.rbd("pool", "init", pool)
        ceph_cluster.rbd("create", "--size", "64M", f"{pool}/img")
        ceph_cluster.ceph("osd", "pool", "set-quota", pool, "max_objects", "1")

        def room():
            ceph_cluster.ceph("osd", "pool", "set-quota", pool, "max_objects", "0")
    else:
        pool = "rbd"
        ceph_cluster.rbd("create", "--size", "64M", f"{pool}/img")
        for name, ratio in FULL_RATIOS.items():
            ceph_cluster.ceph("osd", f"set-{name}-ratio", ratio)

        def room():
            for name, ratio in NORMAL_RATIOS.items():
                ceph_cluster.ceph("osd", f"set-{name}-ratio", ratio)
    return pool, room


@pytest.mark.parametrize("how", ["quota", "cluster"])
def test_a_pool_full_before_serve_starts_is_refused_at_once(how, ceph_cluster, workdir):
    """Ceph holds a write to a full pool instead of failing it, and opening an image is a write:
    without asking the monitor first, `serve` would wait for its probe's bound and then blame the
    cluster for not answering. Either side's image: one line naming the pool and what is full,
    nothing served, nothing changed."""
    source = make_source(workdir / "src.qcow2")
    pool, room = make_full(ceph_cluster, how)
    try:
        ceph_cluster.wait_pool(pool, full=True)
        spec = ceph_cluster.spec("img", pool=pool)
        before = snapshot(workdir)
        env = dict(os.environ, XDG_RUNTIME_DIR=os.fspath(workdir))   # its run dir: our_processes
        for label, argv in (("destination", [source, spec]), ("source", [spec, source])):
            res = subprocess.run([*MIRRORFS, "serve", "--copy", "full", *map(str, argv),
                                  "--socket", str(workdir / "d.sock")], capture_output=True,
                                 text=True, stdin=subprocess.DEVNULL, env=env, timeout=120)
            err = res.stderr
            assert res.returncode == OPENING_FAILS, (res.returncode, err)     # README: bad input, 2
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert f"{label} {spec}: pool {pool} is full (" in err, err
            assert ("quota" in err) == (how == "quota"), err
        assert not our_processes(os.fspath(workdir))
        assert snapshot(workdir) == before
    finally:
        room()
    ceph_cluster.wait_pool(pool, full=False)
    # (Not read while full: a reader opening the image would be held too.) Still all zeros.
    assert ceph_cluster.digest("img", pool=pool) == hashlib.sha256(bytes(SIZE)).hexdigest()


def test_start_refuses_rbd_with_the_command_to_use(ceph_cluster, workdir):
    res = run(*MIRRORFS, "start", ceph_cluster.spec("fine"), "--dest-dir", workdir,
              "--socket", workdir / "d.sock", check=False)
    # README: bad input (2); it exits 1 today.
    assert res.returncode == EXIT_ERROR and res.stderr.count("\n") == 1, (res.returncode, res.stderr)
    assert "mirrorfs serve --copy full" in res.stderr


# Faults of the Ceph side during the copy.

def test_osd_stopped_during_the_copy_degrades_then_resyncs(ceph_cluster, workdir, serve):
    source = make_source(workdir / "src.qcow2", every=1)
    ceph_cluster.rbd("create", "--size", "64M", "rbd/osd-gone")
    dest = ceph_cluster.spec("osd-gone")
    served = serve("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
                   "--on-dest-error", "degrade", "--io-timeout", "2", "--rate", "16M",
                   source, dest)
    writes = []
    try:
        wait_for(served.control, lambda s: s["datapath"]["copy"]["first_pass_bytes"] > 0,
                 "the copy under way")
        ceph_cluster.stop_osd()           # RADOS now holds every write to the pool
        for i in range(4):                # each waits for --io-timeout, then is recorded
            w = (i * 7 * MiB + 4096, 65536, 0x41 + i)
            write(served.uri, w)
            writes.append(w)
        s = wait_for(served.control,
                     lambda s: s["datapath"]["sides"]["destination"]["errors"] > 0,
                     "a destination error")
        assert s["phase"] == "copying"
        assert s["datapath"]["sides"]["destination"]["degraded"] > 0
    finally:
        if "osd.0" not in ceph_cluster.daemons:
            ceph_cluster.start_osd()
    synchronized(served.control, timeout=120)
    assert served.stop() == 0
    same, detail = images_identical(source, dest)
    assert same, detail


def test_full_pool_degrades_then_resyncs_when_the_quota_is_raised(ceph_cluster, workdir, serve,
                                                                  qemu_nbd):
    """A pool at its quota does not fail writes: RADOS holds them until there is room (a Ceph client
    never sees ENOSPC for a full pool). So what reaches mirrorfs is a destination that stops
    answering: --io-timeout cuts it, the regions are recorded, and the copy resumes once the pool
    has room again.

    Nothing is left to timing: the copy's source is held (nbdkit's pause filter) until the monitor
    has flagged the pool full, so the copier's first writes meet a full pool. (Before, a quota
    reached *during* a rate-limited copy was flagged, in one CI run, only after the copy had
    finished.) The pool is filled by another image before the quota is set, so no write but the
    copier's is ever held."""
    ceph_cluster.ceph("osd", "pool", "create", "quota", "8")
    ceph_cluster.rbd("pool", "init", "quota")
    ceph_cluster.rbd("create", "--size", "64M", "quota/full")
    ceph_cluster.rbd("create", "--size", "16M", "quota/filler")
    dest = ceph_cluster.spec("full", pool="quota")
    source = make_source(workdir / "src.qcow2", every=1)
    export = qemu_nbd(source, "src-export")
    front = PausableFront(workdir, "src-front", export.socket)
    try:
        front.pause()                                   # the copier's first request waits here
        served = serve("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
                       "--io-timeout", "2", front.uri, dest)
        qemu_io(ceph_cluster.spec("filler", pool="quota"), f"write -P 0x7e 0 {12 * MiB}",
                fmt="raw")
        ceph_cluster.ceph("osd", "pool", "set-quota", "quota", "max_bytes", str(8 * MiB))
        ceph_cluster.wait_pool("quota", full=True)
        assert status(served.control)["datapath"]["copy"]["bytes_read"] == 0
        front.resume()
        # The copier's writes are held: cut after --io-timeout, counted as the side's timeouts
        # and the copy's failures, and retried with backoff. The side counts its timeout before
        # the copier hears of it: a status between the two shows the one and not yet the other.
        s = wait_for(served.control,
                     lambda s: s["datapath"]["sides"]["destination"]["timeouts"] > 0
                     and s["datapath"]["copy"]["failures"] > 0,
                     "a destination timeout, failing the copy", timeout=60)
        assert s["phase"] == "copying" and s["datapath"]["copy"]["failures"] > 0
        write(served.uri, (50 * MiB, MiB, 0x5f))        # the client is not held by the full pool
        assert "POOL_FULL" in ceph_cluster.ceph("health", "detail")
    finally:
        ceph_cluster.ceph("osd", "pool", "set-quota", "quota", "max_bytes", "0")
        front.resume()
    synchronized(served.control, timeout=120)
    assert served.stop() == 0
    front.stop()
    export.stop()
    same, detail = images_identical(source, dest)
    assert same, detail
