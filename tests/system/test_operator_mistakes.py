"""Issue #26's operator mistakes, each through the real CLI: a file that is not a disk image, a size
or rate that does not say what it means, a state directory that cannot be one, the wrong socket.
Each is one line on stderr naming the problem, a non-zero exit, no process left, and every file
under the work directory as it was (content and mtime).

Then the chains a migration leaves (raw and qcow2 bases through start, copy, pivot, stop, hand-back
and a second migration): every chain opens with `qemu-img info --backing-chain`, passes `qemu-img
check`, and holds the bytes the client wrote; and a cancel after a resume removes what it says."""

import json
import os
import socket
import subprocess

import pytest

from lib.commands import EXIT_ERROR, EXIT_USAGE, MIRRORFS, run
from lib.control import ctl, status_of
from lib.failures import TIMEOUT, snapshot
from lib.images import MiB, images_identical, make_base, qemu_io
from lib.processes import kill_mirrorfs, our_processes
from lib.served import Process
from lib.waits import wait_until

CASES = {}


def case(status=EXIT_USAGE):
    """Register a builder: (workdir) → (mirrorfs arguments, expected substrings)."""
    def register(build):
        CASES[build.__name__] = build, status
        return build
    return register


def _images(w):
    """src/a.qcow2 with data, dst/ empty; notes.txt, the text file an operator mistakes for a disk."""
    (w / "src").mkdir()
    (w / "dst").mkdir()
    make_base(w / "src" / "a.qcow2", 16 * MiB)
    (w / "notes.txt").write_text("buy milk\nmigrate vm1 on friday\n")
    return w / "src" / "a.qcow2"


def _sock(w):
    return ["--socket", w / "d.sock"]


# A file that is not a disk image (issue #26 point 7: a 20-byte text file was served as a raw disk).

@case(EXIT_ERROR)
def export_text_file(w):
    _images(w)
    return ["export", w / "notes.txt", *_sock(w)], [f"{w}/notes.txt", "not a disk image", "sectors"]


@case(EXIT_ERROR)
def start_text_file(w):
    _images(w)
    return ["start", w / "notes.txt", "--dest-dir", w / "dst", *_sock(w)], \
        [f"{w}/notes.txt", "not a disk image"]


@case(EXIT_ERROR)
def serve_text_file_as_source(w):
    _images(w)
    run("qemu-img", "create", "-q", "-f", "qcow2", w / "dst" / "a.qcow2", str(16 * MiB))
    return ["serve", w / "notes.txt", w / "dst" / "a.qcow2", *_sock(w)], [f"{w}/notes.txt", "not a disk image"]


@case(EXIT_ERROR)
def serve_text_file_as_dest(w):
    src = _images(w)
    return ["serve", src, w / "notes.txt", *_sock(w)], [f"{w}/notes.txt", "not a disk image"]


@case(EXIT_ERROR)
def export_text_of_whole_sectors(w):
    _images(w)
    (w / "notes.txt").write_text(("a line of text\n" * 100)[:1024])
    return ["export", w / "notes.txt", *_sock(w)], [f"{w}/notes.txt", "first sector is text"]


@case(EXIT_ERROR)
def export_empty_file(w):
    _images(w)
    (w / "empty.img").write_bytes(b"")
    return ["export", w / "empty.img", *_sock(w)], [f"{w}/empty.img", "empty file"]


# Sizes and rates (one parser: mirrorfs/common/sizes.py).

@case()
def serve_rate_without_unit(w):
    src = _images(w)
    run("qemu-img", "create", "-q", "-f", "qcow2", w / "dst" / "a.qcow2", str(16 * MiB))
    return ["serve", "--copy", "full", src, w / "dst" / "a.qcow2", *_sock(w), "--rate", "100"], \
        ["--rate '100': a rate needs a unit", "100M"]


@case()
def serve_rate_below_one_byte(w):
    src = _images(w)
    run("qemu-img", "create", "-q", "-f", "qcow2", w / "dst" / "a.qcow2", str(16 * MiB))
    return ["serve", "--copy", "full", src, w / "dst" / "a.qcow2", *_sock(w), "--rate", "0.5"], \
        ["--rate '0.5': below 1 byte/s"]


@case()
def evacuation_rate_below_one_byte(w):
    src = _images(w)
    return ["start", src, "--dest-dir", w / "dst", "--switch-first", "--state-dir", w / "st",
            *_sock(w), "--rate", "0.5"], ["--rate '0.5': below 1 byte/s"]


@case()
def copy_rate_below_one_byte(w):
    _images(w)
    return ["copy", "--control", w / "d.sock.ctl", "--rate", "0.5"], ["--rate '0.5': below 1 byte/s"]


@case()
def copy_rate_without_unit(w):
    _images(w)
    return ["copy", "--control", w / "d.sock.ctl", "--rate", "100"], ["a rate needs a unit", "100M"]


@case()
def rate_command_below_one_byte(w):
    _images(w)
    return ["rate", "0.5", "--control", w / "d.sock.ctl"], ["rate '0.5': below 1 byte/s", "'none'"]


@case()
def budget_below_one_byte(w):
    _images(w)
    return ["budget", "set", "0.5", "--run-dir", w / "run"], ["budget set '0.5': below 1 byte/s"]


@case()
def budget_zero(w):
    _images(w)
    return ["budget", "set", "0", "--run-dir", w / "run"], ["budget set '0': below 1 byte/s", "'none'"]


@case()
def budget_floor_without_unit(w):
    _images(w)
    return ["budget", "set", "--floor", "64", "--run-dir", w / "run"], ["--floor '64': a rate needs a unit"]


# State directories (a traceback, or "does not exist" for a path through a file).

@case()
def state_dir_in_proc(w):
    src = _images(w)
    run("qemu-img", "create", "-q", "-f", "qcow2", w / "dst" / "a.qcow2", str(16 * MiB))
    return ["serve", src, w / "dst" / "a.qcow2", *_sock(w), "--state-dir", "/proc/mfs-nonexistent"], \
        ["/proc/mfs-nonexistent", "cannot create"]


@case()
def state_dir_is_proc(w):
    # It exists and is a directory; only writing the state there fails.
    src = _images(w)
    run("qemu-img", "create", "-q", "-f", "qcow2", w / "dst" / "a.qcow2", str(16 * MiB))
    return ["serve", src, w / "dst" / "a.qcow2", *_sock(w), "--state-dir", "/proc"], \
        ["cannot write the state in /proc"]


@case()
def start_state_dir_in_proc(w):
    src = _images(w)
    return ["start", src, "--dest-dir", w / "dst", *_sock(w), "--state-dir", "/proc/mfs-x"], \
        ["/proc/mfs-x", "cannot create"]


@case()
def state_dir_through_a_file(w):
    src = _images(w)
    return ["start", src, "--dest-dir", w / "dst", *_sock(w), "--state-dir", w / "notes.txt" / "sub"], \
        [f"{w}/notes.txt is not a directory"]


@case()
def state_dir_is_a_file(w):
    src = _images(w)
    run("qemu-img", "create", "-q", "-f", "qcow2", w / "dst" / "a.qcow2", str(16 * MiB))
    return ["serve", src, w / "dst" / "a.qcow2", *_sock(w), "--state-dir", w / "notes.txt"], \
        [f"{w}/notes.txt: not a directory"]


# Sockets that are not a control socket.

@case(EXIT_ERROR)
def control_is_a_text_file(w):
    _images(w)
    return ["status", "--control", w / "notes.txt"], [f"{w}/notes.txt is not a socket", "regular file"]


@case(EXIT_ERROR)
def control_is_a_directory(w):
    _images(w)
    return ["pivot", "--control", w / "dst"], [f"{w}/dst is not a socket", "directory"]


@case(EXIT_ERROR)
def control_nobody_listens(w):
    _images(w)
    with socket.socket(socket.AF_UNIX) as s:       # bound, never listened on, closed: stale
        s.bind(os.fspath(w / "stale.ctl"))
    return ["cancel", "--control", w / "stale.ctl"], [f"nothing listens on {w}/stale.ctl"]


def _state(root):
    """Every entry under `root` (lib.failures.snapshot), and every file's mtime."""
    found = snapshot(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root) + "@mtime"] = os.lstat(path).st_mtime_ns
    return found


def mistake(workdir, *args, expect, status, env=None):
    """`mirrorfs ARGS` must fail cleanly: one line naming `expect`, exit `status`, no new process
    left running, nothing changed under `workdir` (contents and mtimes)."""
    before = _state(workdir)
    running = {p.pid for p in our_processes(os.fspath(workdir))}
    env = dict(env or os.environ, XDG_RUNTIME_DIR=os.fspath(workdir))
    res = subprocess.run([*MIRRORFS, *map(str, args)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, cwd=workdir, env=env, timeout=TIMEOUT)
    err = res.stderr
    assert res.returncode == status, f"exit status {res.returncode}, not {status}; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert err.startswith("mirrorfs: error: ") and err.count("\n") == 1, f"not one line: {err!r}"
    for text in expect:
        assert text in err, f"{text!r} not in {err!r}"
    left = [" ".join(p.cmdline()) for p in our_processes(os.fspath(workdir)) if p.pid not in running]
    assert not left, f"processes left running: {left}"
    assert _state(workdir) == before, "the work directory changed"
    return err


@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_mistake(name, workdir):
    build, status = CASES[name]
    args, expect = build(workdir)
    mistake(workdir, *args, expect=expect, status=status)


# The wrong socket, with a disk being served: its NBD socket, and its export's control socket.

def test_the_wrong_socket_is_named_for_what_it_is(workdir):
    src = _images(workdir)
    export = Process(workdir, "export", "export", src, "--socket", workdir / "d.sock")
    try:
        err = mistake(workdir, "pivot", "--control", workdir / "d.sock", status=EXIT_ERROR,
                      expect=[f"{workdir}/d.sock is an NBD socket", f"use {workdir}/d.sock.ctl"])
        assert "connection lost" not in err
        mistake(workdir, "status", "--control", workdir / "d.sock", status=EXIT_ERROR,
                expect=["is an NBD socket"])
        mistake(workdir, "pivot", "--control", export.control, status=EXIT_ERROR,
                expect=[f"{export.control} controls an export", "which has no pivot",
                        "mirrorfs start --take-over"])
        # Once a migration borrowed the disk, the refusal names the migration's control socket.
        migration = Process(workdir, "migration", "start", "--take-over", export.control,
                            "--dest-dir", workdir / "dst")
        try:
            mistake(workdir, "pivot", "--control", export.control, status=EXIT_ERROR,
                    expect=["controls an export", f"the migration's control socket is "
                                                  f"{migration.control}"])
            assert status_of(migration.control)["phase"] == "mirroring"
        finally:
            assert migration.stop() == 0
    finally:
        assert export.stop() == 0


# Raw layers keep their format (issue #26 point 3).

def _check_chain(top, formats):
    """`top`'s chain opens, has these formats top first, passes `qemu-img check` on every qcow2
    layer, and every layer names its backing's real format."""
    layers = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain", top).stdout)
    assert [layer["format"] for layer in layers] == formats, layers
    for upper, lower in zip(layers, layers[1:]):
        assert upper["full-backing-filename"] == lower["filename"], (upper, lower)
        assert upper["backing-filename-format"] == lower["format"], upper
    for layer in layers:
        if layer["format"] == "qcow2":
            run("qemu-img", "check", "-q", layer["filename"])


def _migrate(workdir, top, dest_dir, name, seed, *, take_over=None):
    """start (or start --take-over) → a client write → copy → pivot → a client write; returns the
    process, still running and switched, and the writes (offset, pattern)."""
    dest_dir.mkdir()
    if take_over is None:
        args = ["start", top, "--dest-dir", dest_dir, "--socket", workdir / f"{name}.sock"]
    else:
        args = ["start", "--take-over", take_over, "--dest-dir", dest_dir]
    proc = Process(workdir, name, *args)
    uri = status_of(proc.control)["uris"][0]
    writes = [(1 * MiB + 512 * seed, 0x60 + seed), (13 * MiB + 4096 * seed, 0x70 + seed)]
    qemu_io(uri, f"write -P {writes[0][1]} {writes[0][0]} 4096")
    ctl(proc.control, "copy")
    ctl(proc.control, "pivot")
    qemu_io(uri, f"write -P {writes[1][1]} {writes[1][0]} 4096")
    assert status_of(proc.control)["phase"] == "switched"
    return proc, writes


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_every_layer_keeps_its_format_through_two_migrations(workdir, fmt):
    """start → copy → pivot → stop of a raw (or qcow2) base; then `mirrorfs export` of the chain it
    left (which could not open it), a second migration by take-over, hand-back. After each, every
    chain opens with its layers' real formats, passes qemu-img check, and holds the bytes the
    client wrote (qemu-img compare with a reference written the same way)."""
    (workdir / "src").mkdir()
    base = make_base(workdir / "src" / f"disk.{'img' if fmt == 'raw' else 'qcow2'}", 16 * MiB, fmt=fmt)
    reference = workdir / "reference.raw"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", base, reference)

    def written(writes):
        for offset, pattern in writes:
            qemu_io(reference, f"write -P {pattern} {offset} 4096")

    proc, writes = _migrate(workdir, base, workdir / "d1", "one", 1)
    assert proc.stop() == 0
    written(writes)
    top1 = workdir / "d1" / f"{base.stem}-snap.qcow2"
    _check_chain(top1, ["qcow2", fmt])
    same, detail = images_identical(top1, reference)
    assert same, detail

    export = Process(workdir, "export", "export", top1, "--socket", workdir / "x.sock")
    try:
        proc, writes = _migrate(workdir, None, workdir / "d2", "two", 2, take_over=export.control)
        ctl(proc.control, "hand-back")
        assert proc.proc.wait(60) == 0
        written(writes)
        res = run("qemu-img", "compare", "-f", "raw", "-F", "raw",
                  f"nbd+unix:///?socket={workdir}/x.sock", reference, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        assert export.stop() == 0
    top2 = workdir / "d2" / f"{top1.stem}-snap.qcow2"
    _check_chain(top2, ["qcow2", "qcow2"])      # the base copy flattened top1's chain into one qcow2
    same, detail = images_identical(top2, reference)
    assert same, detail
    # The chains the migrations left behind open too: their sources were only read.
    _check_chain(workdir / "src" / f"{base.stem}-snap.qcow2", ["qcow2", fmt])
    _check_chain(workdir / "d1" / f"{top1.stem}-snap.qcow2", ["qcow2", "qcow2", fmt])


# Cancel removes what it says (issue #26 point 7).

def test_cancel_after_a_resume_removes_the_destination_overlay(workdir):
    src = _images(workdir)
    args = ["start", src, "--dest-dir", workdir / "dst", "--socket", workdir / "d.sock",
            "--state-dir", workdir / "st"]
    first = Process(workdir, "first", *args)
    ctl(first.control, "copy")
    overlay, dest_base = workdir / "dst" / "a-snap.qcow2", workdir / "dst" / "a.qcow2"
    assert overlay.exists() and dest_base.exists()
    kill_mirrorfs(first.proc.pid)
    again = Process(workdir, "again", *args)
    try:
        res = ctl(again.control, "cancel")
        assert not overlay.exists(), "cancel left the destination overlay"
        assert f"removed {overlay}" in res.stdout, res.stdout
        # The base may be mirrorfs's copy or a manager's: kept, and said so.
        assert dest_base.exists() and f"kept {dest_base}" in res.stdout, res.stdout
        destination = status_of(again.control)["destination"]
        assert destination["removed"] is True and destination["base_exists"] is True, destination
        # The disk is the source's chain, with the source's bytes.
        uri = status_of(again.control)["uris"][0]
        res = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, src, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        assert again.stop() == 0


# The time left of a rate-limited copy (issue #26 point 7: 7 minutes shown for four days).

def test_the_time_left_is_never_shorter_than_the_limit_allows(workdir):
    """A paced copy's first piece goes at once, so its measured rate starts far above its limit;
    the ETA must still be at least what is left at the limit."""
    src = _images(workdir)
    migration = Process(workdir, "migration", "start", src, "--dest-dir", workdir / "dst",
                        "--socket", workdir / "d.sock")
    try:
        ctl(migration.control, "copy", "--rate", "64K", "--background")
        copy = wait_until(lambda: (c := status_of(migration.control).get("copy", {})).get("bytes_done")
                          and c.get("eta_seconds") is not None and c, "copying")
        left = copy["bytes_total"] - copy["bytes_done"]
        assert copy["eta_seconds"] >= left / (64 * 1024) - 1, copy
        ctl(migration.control, "cancel")
    finally:
        assert migration.stop() == 0
