"""A state directory that is not this disk's is refused in one line, before any process starts
(docs/OPERATING.md, "Nothing resets silently"; mirrorfs/datapath/statedir.py).

Two evacuations (`serve --switch-first`, the hydration through nbdkit to a raw destination, held at
1 MiB/s so it is far from done) are stopped after a FUA write at 40 MiB, a region not hydrated:
that write exists on the destination alone. Then each case of the table damages, removes or swaps a
state file, or replaces the destination, and the same command line must:
- exit 2 with one line naming the file (or image) and what is wrong;
- start nothing: `qemu-storage-daemon` and `nbdkit` are found on PATH as wrappers that log every
  start, and the log stays empty; no process is left that names the work directory;
- change nothing: every file under the work directory (images, state files) as it was.
After the table, the files put back, the same command line resumes, and the write at 40 MiB reads
back through the disk (the destination's, not the source's bytes).
"""

import hashlib
import json
import os
import shutil
import subprocess

import nbd

from lib.commands import EXIT_USAGE, MIRRORFS, run
from lib.control import ctl, status
from lib.failures import TIMEOUT, snapshot
from lib.images import MiB, make_full_pair
from lib.processes import our_processes
from lib.served import Served
from lib.waits import wait_until

SIZE = 64 * MiB
AT = 40 * MiB                   # a region the hydrator (1 MiB/s, from 0) does not reach meanwhile
WRITTEN = b"\xa5" * 4096


class Evacuation:
    """An evacuation of <root>/src.qcow2 to <root>/dst.img, its state in <root>/state."""

    def __init__(self, root, state="state"):
        self.root = root
        root.mkdir(exist_ok=True)
        if not (root / "src.qcow2").exists():
            make_full_pair(root, SIZE)
            run("qemu-img", "create", "-q", "-f", "raw", root / "dst.img", str(SIZE))
        self.src, self.dst, self.state = root / "src.qcow2", root / "dst.img", root / state
        self.args = ["--copy", "full", "--switch-first", "--region", "1M", "--rate", "1M",
                     "--state-dir", self.state, self.src, self.dst, "--socket", root / "d.sock"]

    def serve(self):
        return Served(self.root, *self.args, name="d")

    def write_and_stop(self):
        """A FUA write at AT, on the destination alone; then a stop (SIGTERM)."""
        disk = self.serve()
        try:
            h = nbd.NBD()
            h.connect_uri(disk.uri)
            h.pwrite(WRITTEN, AT, nbd.CMD_FLAG_FUA)
            h.shutdown()
        finally:
            disk.stop()
        with open(self.dst, "rb") as f:
            f.seek(AT)
            assert f.read(len(WRITTEN)) == WRITTEN


def wrappers(workdir):
    """A PATH whose qemu-storage-daemon and nbdkit log each start to workdir/started.log."""
    bindir = workdir / "bin"
    bindir.mkdir()
    log = workdir / "started.log"
    for tool in ("qemu-storage-daemon", "nbdkit"):
        real = shutil.which(tool)
        (bindir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {real} "$@"\n')
        (bindir / tool).chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}", log


def refused(workdir, path, log, args, expect, command="serve"):
    """`mirrorfs serve ARGS` refuses in one line naming `expect`, starting and changing nothing."""
    before = snapshot(workdir)
    env = dict(os.environ, PATH=path, XDG_RUNTIME_DIR=os.fspath(workdir))
    res = subprocess.run([*MIRRORFS, command, *map(str, args)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, cwd=workdir, env=env, timeout=TIMEOUT)
    err = res.stderr
    assert res.returncode == EXIT_USAGE, f"exit status {res.returncode}; stderr: {err!r}"
    assert err.startswith("mirrorfs: error: ") and err.count("\n") == 1, f"not one line: {err!r}"
    for text in [expect] if isinstance(expect, str) else expect:
        assert text in err, f"{text!r} not in {err!r}"
    assert not log.exists(), f"started: {log.read_text()}"
    assert not our_processes(os.fspath(workdir)), "processes left running"
    assert snapshot(workdir) == before, "the work directory changed"
    return err


def files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def put_back(directory, saved):
    for p in directory.iterdir():
        if p.name not in saved:
            p.unlink()
    for name, data in saved.items():
        (directory / name).write_bytes(data)


def test_a_state_directory_that_is_not_this_evacuations_is_refused_before_anything_starts(
        workdir, monkeypatch):
    a, b = Evacuation(workdir / "a"), Evacuation(workdir / "b")
    path, log = wrappers(workdir)
    # An earlier evacuation of a's very images, with its own state directory, then the current one:
    # while the earlier directory is there, a new one is refused (below); moved away, it is
    # stale, and the current evacuation takes the images (and marks them). It comes back later.
    earlier = Evacuation(workdir / "a", state="earlier")
    earlier.write_and_stop()
    typo = workdir / "a" / "typo"
    refused(workdir, path, log,
            [*a.args[:a.args.index("--state-dir")], "--state-dir", typo,
             *a.args[a.args.index("--state-dir") + 2:]],
            ["belongs to migration", f"whose state is in {earlier.state} (phase hydrating)"])
    os.rename(earlier.state, workdir / "earlier.aside")
    a.write_and_stop()
    os.rename(workdir / "earlier.aside", earlier.state)
    b.write_and_stop()
    sa, sb = files(a.state), files(b.state)
    assert sorted(sa) == ["hydration.map", "owner.json", "state.json"], sorted(sa)

    def swap_dirs():
        os.rename(a.state, workdir / "tmp")
        os.rename(b.state, a.state)
        os.rename(workdir / "tmp", b.state)

    def replace_dest():
        os.rename(a.dst, workdir / "dst.aside")
        run("qemu-img", "create", "-q", "-f", "raw", a.dst, str(SIZE))

    def format_1():
        # What a mirrorfs before the owner wrote: the sides by path and size, no migration id.
        fields = {"format": 1, "copy": "full", "switch_first": True, "source": {"image": str(a.src)},
                  "dest": {"image": str(a.dst)}, "size": SIZE, "region_size": MiB,
                  "phase": "hydrating", "cursor": 0, "dirty": []}
        checksum = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        (a.state / "state.json").write_text(json.dumps({**fields, "checksum": checksum}))

    state, hmap, owner = (a.state / n for n in ("state.json", "hydration.map", "owner.json"))
    cases = [
        # What happens to the state directory, and what the refusal must name.
        ("hydration.map removed", lambda: hmap.unlink(),
         [f"{hmap} is missing", "hydrating again from zero would overwrite"]),
        ("hydration.map truncated", lambda: hmap.write_bytes(sa["hydration.map"][:40]),
         f"{hmap} is corrupt"),
        ("hydration.map empty", lambda: hmap.write_bytes(b""), f"{hmap} is corrupt"),
        ("state.json removed", lambda: state.unlink(), f"{state} is missing"),
        ("state.json truncated", lambda: state.write_bytes(sa["state.json"][:100]),
         f"{state} is corrupt"),
        ("state.json corrupted", lambda: state.write_bytes(
            sa["state.json"].replace(b'"hydrating"', b'"switched"')), f"{state} is corrupt"),
        ("state.json of format 1", format_1, "older mirrorfs (state format 1)"),
        ("owner.json removed", lambda: owner.unlink(), f"{owner} is missing"),
        ("owner.json corrupted", lambda: owner.write_bytes(sa["owner.json"][:-20]),
         f"{owner} is corrupt"),
        ("hydration.map of the other disk", lambda: hmap.write_bytes(sb["hydration.map"]),
         f"{hmap} belongs to another migration"),
        ("state.json of the other disk", lambda: state.write_bytes(sb["state.json"]),
         f"{state} belongs to another migration"),
        ("hydration.map of the earlier evacuation of the same images",
         lambda: hmap.write_bytes((earlier.state / "hydration.map").read_bytes()),
         f"{hmap} belongs to another migration"),
        ("state directories of the two disks swapped", swap_dirs,
         f"belongs to another source: {b.src}"),
        ("the destination created afresh at the same path", replace_dest,
         [f"the destination {a.dst}", "now holds another file"]),
        ("only a map left (another evacuation's, handed back)",
         lambda: (state.unlink(), owner.unlink()), "belongs to another evacuation"),
    ]
    for name, damage, expect in cases:
        damage()
        try:
            refused(workdir, path, log, a.args, expect)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
        if (workdir / "dst.aside").exists():
            os.rename(workdir / "dst.aside", a.dst)
        if name.startswith("state directories"):
            swap_dirs()
        put_back(a.state, sa)
        assert files(b.state) == sb

    # The earlier evacuation's whole directory, for the same images: the destination carries the
    # current evacuation's mark.
    refused(workdir, path, log, earlier.args, ["a later migration", "has taken it since"])

    # Everything put back: the same command line resumes (through the wrappers, which do log the
    # starts), and the write is there.
    monkeypatch.setenv("PATH", path)
    disk = Served(a.root, *a.args, name="d")
    try:
        assert log.exists()             # the wrappers do log a start
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        assert h.pread(len(WRITTEN), AT) == WRITTEN
        h.shutdown()
    finally:
        disk.stop()


def test_a_migrations_state_directory_that_is_not_its_own_is_refused_before_anything_starts(
        workdir, migration):
    """`mirrorfs start --state-dir`: the same rules for a Mirrored-Snapshot migration's state."""
    state = workdir / "state"
    migration.start("--state-dir", state)
    h = nbd.NBD()
    h.connect_uri(migration.disk.uri)
    h.pwrite(WRITTEN, AT, nbd.CMD_FLAG_FUA)
    h.shutdown()
    assert migration.disk.stop() == 0
    path, log = wrappers(workdir)
    saved = files(state)
    assert sorted(saved) == ["owner.json", "state.json"], sorted(saved)
    args = [migration.base, "--dest-dir", workdir / "dst", "--state-dir", state,
            "--socket", workdir / "disk.sock"]

    def replace_overlay():
        overlay = migration.dest_overlay
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", migration.base, "-F", "qcow2",
            workdir / "fresh.qcow2")
        os.rename(overlay, workdir / "overlay.aside")
        os.rename(workdir / "fresh.qcow2", overlay)

    cases = [
        ("state.json removed", lambda: (state / "state.json").unlink(),
         f"{state / 'state.json'} is missing"),
        ("state.json corrupted", lambda: (state / "state.json").write_bytes(
            saved["state.json"].replace(b'"synchronized"', b'"switched"')), "is corrupt"),
        ("owner.json removed", lambda: (state / "owner.json").unlink(), "owner.json is missing"),
        ("the destination overlay made afresh", replace_overlay,
         [f"the destination {migration.dest_overlay}", "now holds another file"]),
    ]
    for name, damage, expect in cases:
        damage()
        try:
            refused(workdir, path, log, args, expect, command="start")
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
        if (workdir / "overlay.aside").exists():
            os.rename(workdir / "overlay.aside", migration.dest_overlay)
        put_back(state, saved)

    # Put back: the same command line resumes, and the write is there.
    disk = migration.start("--state-dir", state)
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    assert h.pread(len(WRITTEN), AT) == WRITTEN
    h.shutdown()
    assert disk.stop() == 0


def test_a_new_state_directory_does_not_take_images_another_state_still_holds(workdir, serve):
    """After a switch, the same images with a new (or mistyped) --state-dir: refused, since a new
    full copy would put the stale source over the destination that holds the disk. The right
    directory serves the destination alone, which may then be the source of the next migration."""
    src, dst = make_full_pair(workdir, SIZE)
    state = workdir / "state"
    disk = serve("--copy", "full", "--state-dir", state, src, dst)
    wait_until(lambda: status(disk.control)["phase"] == "synchronized", "synchronized", timeout=120)
    assert "switched" in ctl(disk.control, "pivot").stdout
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(WRITTEN, AT, nbd.CMD_FLAG_FUA)        # on the destination alone
    h.shutdown()
    assert disk.stop() == 0
    path, log = wrappers(workdir)
    args = ["--copy", "full", src, dst, "--socket", workdir / "again.sock"]
    refused(workdir, path, log, [*args, "--state-dir", workdir / "stat"],
            [f"the source {src} belongs to migration",
             f"whose state is in {state} (phase switched)", f"--state-dir {state}"])
    again = serve("--copy", "full", "--state-dir", state, src, dst, name="again")
    assert status(again.control)["serving"] == "destination"
    h = nbd.NBD()
    h.connect_uri(again.uri)
    assert h.pread(len(WRITTEN), AT) == WRITTEN
    h.shutdown()
    assert again.stop() == 0
    # The destination holds the disk now: it may be the source of the next migration (B -> C),
    # with a state directory of its own, while the first one's is still there.
    run("qemu-img", "create", "-q", "-f", "qcow2", workdir / "next.qcow2", str(SIZE))
    onward = serve("--copy", "full", "--state-dir", workdir / "next", dst, workdir / "next.qcow2",
                   name="next")
    h = nbd.NBD()
    h.connect_uri(onward.uri)
    assert h.pread(len(WRITTEN), AT) == WRITTEN
    h.shutdown()
    assert onward.stop() == 0
