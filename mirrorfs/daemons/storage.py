"""qemu-storage-daemon exporting one image (with its backing chain) over NBD.

QEMU owns qcow2: every image mirrorfs serves or writes goes through a storage daemon it starts here, and
the data path only ever speaks NBD to it. Each daemon also has a QMP monitor, used by the migration
workflow to change an overlay's backing file while it is open.

How a daemon uses the host's page cache (`--cache`):
- `none`: O_DIRECT with Linux native AIO (QEMU's cache=none,aio=native), what VM hosts run
  production disks with. A migration then does not fill the host's memory with hundreds of GiB read
  once, and each write costs the daemon one io_submit instead of a hand-off to a worker thread that
  then queues on the file's inode lock behind its siblings: on the project's 2-core machine, two
  daemons mirroring 4 KiB random writes spend 2.5x the CPU per write through the page cache (see
  docs/PERFORMANCE.md).
- `writeback`: through the host's page cache (QEMU's default): for file systems without O_DIRECT.
- `auto` (the default): `none` when every file of the image's chain can be opened with O_DIRECT.
Durability is the same in every mode: the data path flushes both sides, and a flush reaches the disk.
"""

import errno
import json
import logging
import os
import signal
import time
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from mirrorfs.sides import rbd
from mirrorfs.system import sockets
from mirrorfs.errors import ImageError, ProcessError, UsageError
from mirrorfs.system.children import Child

NODE = "top"
FILE_NODE = "top-file"
BACKING_NODE = "new-backing"
# An evacuation's source chain, the runtime backing of the destination while it hydrates in place.
SOURCE_NODE = "evacuated"
CACHE_MODES = ("auto", "none", "writeback")
# How long a shared daemon may take to close a released side's export (SharedStorageDaemon).
RELEASE_TIMEOUT = 10.0
# Writing an overlay's backing into its header (a block-stream with nothing to copy): milliseconds.
JOB_TIMEOUT = 30.0

log = logging.getLogger("mirrorfs")


def direct_io_supported(path):
    """Whether the file system holding `path` accepts O_DIRECT (tmpfs before Linux 6.6 does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def check_cache(requested):
    """The one check of `--cache` (serve, start, export and the Python API all come through it)."""
    if requested not in CACHE_MODES:
        raise UsageError(f"--cache {requested!r}: expected one of {', '.join(CACHE_MODES)}")
    return requested


def cache_mode(image, requested="auto"):
    """The mode a daemon serving `image` (an ImageInfo) runs in: `requested`, with auto resolved.
    `requested` was checked where the operator gave it (check_cache: ServeOptions, the export,
    HostOptions), once, not again at every daemon's start."""
    if requested != "auto":
        return requested
    if isinstance(image, rbd.RbdImage):
        return "none"       # no host page cache on the way; librbd's own cache off (rbd.file_node)
    return "none" if all(direct_io_supported(p) for p in image.chain) else "writeback"


def format_options(cache):
    """Options of an image's format node (qcow2, raw) in cache mode `cache` (none or writeback):
    the backing files QEMU opens from the image's header inherit cache.direct from this node, and
    use QEMU's default thread pool for their I/O."""
    return {"cache": {"direct": True}} if cache == "none" else {}


def file_node(path, cache, aio=None, **options):
    """A `file` block node for `path` in cache mode `cache` (none or writeback). `aio`: QEMU's I/O
    engine; by default Linux native AIO with O_DIRECT, QEMU's thread pool otherwise.

    Why a named disk's daemon takes io_uring instead (mirrorfs.host.service): each native AIO
    context reserves 2048 of the host's fs.aio-max-nr (65536 by default), so one host runs at most
    ~30 idle daemons on native AIO; io_uring has no such host-wide limit."""
    node = {"driver": "file", "filename": os.fspath(path), **options}
    if cache == "none":
        node.update({"cache": {"direct": True}, "aio": aio or "native"})
    elif aio:
        node["aio"] = aio
    return node


class StorageDaemon:
    """One image exported at `uri` from `start()` until `stop()` (which is safe to call twice)."""

    def __init__(self, image, rundir, name, readonly=False, cache="auto", listener=None,
                 backing=None, detached=False, aio=None):
        """`listener`: a listening socket to export on (a disk's own socket, which outlives this
        daemon: `mirrorfs export`); by default the daemon gets a socket of its own in `rundir`.
        `backing`: an image (ImageInfo, with its chain) opened read-only as the image's backing
        while the daemon runs, never written to the image's header: an evacuation hydrating in
        place (see `drop_backing`, and docs/EVACUATION.md). `detached`: the daemon outlives this
        process (no PDEATHSIG): a named disk's, which the next host service adopts (mirrorfs.host).
        `aio`: the image file's I/O engine (file_node)."""
        self.image = image
        self.backing = backing
        self.name = name
        self.readonly = readonly
        self.cache = cache_mode(image, cache)
        self.listener = listener
        self.aio = aio
        # Node and export names: SharedStorageDaemon gives each of its images its own.
        self.node, self.file_node, self.backing_node = NODE, FILE_NODE, BACKING_NODE
        self.export, self.export_id = "", "export0"
        rundir = Path(rundir)
        self.nbd_socket = Path(listener.getsockname()) if listener else rundir / f"{name}.sock"
        self.qmp_socket = rundir / f"{name}.qmp"
        self._child = Child(
            f"qemu-storage-daemon ({name}: {image.path})", [], rundir / f"{name}.log",
            pidfile=rundir / f"{name}.pid", pdeathsig=None if detached else signal.SIGTERM,
            env=rbd.environment() if isinstance(image, rbd.RbdImage) else None)

    @property
    def uri(self):
        return f"nbd+unix:///{self.export}?socket={self.nbd_socket}"

    def _blockdevs(self):
        # Both layers named, so that QMP can later reopen the image node with another backing.
        # discard=unmap on both so a client's trim really deallocates, identically on both sides.
        options = {"node-name": self.file_node, "discard": "unmap", "read-only": self.readonly}
        if isinstance(self.image, rbd.RbdImage):
            image_file = rbd.file_node(self.image, self.cache, **options)
        else:
            image_file = file_node(self.image.path, self.cache, aio=self.aio, **options)
        node = {"driver": self.image.format, "node-name": self.node, "file": self.file_node,
                "discard": "unmap", "read-only": self.readonly, **format_options(self.cache)}
        backing = []
        if self.backing is not None:
            backing = ["--blockdev", json.dumps(self._backing_node())]
            node["backing"] = SOURCE_NODE
        return ["--blockdev", json.dumps(image_file), *backing, "--blockdev", json.dumps(node)]

    def _export(self):
        export = {"type": "nbd", "id": self.export_id, "node-name": self.node, "name": self.export,
                  "writable": not self.readonly}
        if self.backing is not None:
            # Which layer holds each byte: the data path asks it before it writes around the
            # unreadable part of a cluster (datapath.evacuation.evacuee, "the rare path in place").
            export["allocation-depth"] = True
        return export

    def _backing_node(self):
        cache = cache_mode(self.backing) if self.cache == "none" else "writeback"
        return {"driver": self.backing.format, "node-name": SOURCE_NODE, "read-only": True,
                **format_options(cache),
                "file": file_node(self.backing.path, cache, **{"read-only": True})}

    def _images(self):
        """What this process exports: itself (SharedStorageDaemon: each of its sides)."""
        return [self]

    def start(self):
        nbd = self.listener or sockets.bind_unix(self.nbd_socket)
        qmp = sockets.bind_unix(self.qmp_socket)
        try:
            exported = self._images()
            self._child.argv = [
                "qemu-storage-daemon", *[a for one in exported for a in one._blockdevs()],
                "--nbd-server", f"addr.type=fd,addr.str={nbd.fileno()}",
                *[a for one in exported for a in ("--export", json.dumps(one._export()))],
                "--chardev", f"socket,id=qmp0,fd={qmp.fileno()},server=on,wait=off",
                "--monitor", "chardev=qmp0",
                "--pidfile", os.fspath(self._child.pidfile),
            ]
            self._child.pass_fds = (nbd.fileno(), qmp.fileno())
            self._child.start()
        except BaseException:
            self.stop()
            raise
        finally:
            if nbd is not self.listener:
                nbd.close()
            qmp.close()

    def died(self):
        return self._child.died()

    @property
    def pid(self):
        return self._child.pid

    def qmp(self, command, **arguments):
        """Run one QMP command on this daemon; a refusal becomes an ImageError naming the command."""
        monitor = QEMUMonitorProtocol(os.fspath(self.qmp_socket))
        try:
            monitor.connect()
            reply = monitor.cmd_raw(command, arguments or None)
        except (OSError, QMPError) as e:
            raise ProcessError(f"{self._child.name}: QMP {command}: {e}") from None
        finally:
            monitor.close()
        if "error" in reply:
            raise ImageError(f"{self.image.path}: {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def rebase(self, backing):
        """Point the open image at another backing image with the same content: the new backing is
        opened, the image node reopened on it, and the new name written to the image's header, all
        while the export keeps serving. The caller must have checked that the contents are equal."""
        cache = cache_mode(backing) if self.cache == "none" else "writeback"
        self.qmp("blockdev-add", **{
            "driver": backing.format, "node-name": self.backing_node, "read-only": True,
            **format_options(cache), "file": file_node(backing.path, cache, **{"read-only": True})})
        self.qmp("blockdev-reopen", options=[{
            "driver": self.image.format, "node-name": self.node, "file": self.file_node,
            "backing": self.backing_node, "discard": "unmap", **format_options(self.cache)}])
        self._write_backing(backing)

    def _write_backing(self, backing):
        """Write the name and format of the node's backing (already `backing_node`) into the
        image's header, while the export serves.

        Not with QMP's change-backing-file: QEMU (7.2, blockdev.c) writes the *image's* own format
        as the backing's, so a qcow2 overlay rebased onto a raw base recorded "qcow2" for it, and
        the chain could no longer be opened (`qemu-img info` nor a restarted daemon: "Image is not
        in qcow2 format"; issue #26 point 3). A block-stream whose base is the node already below
        has nothing to copy, and as it completes it writes the base's name and the base's own
        format (stream_prepare). It runs as a job: waited for, its error reported, dismissed."""
        job = f"{self.node}-backing"
        self.qmp("block-stream", **{"job-id": job, "device": self.node,
                                    "base-node": self.backing_node,
                                    "backing-file": os.fspath(backing.path),
                                    "auto-finalize": True, "auto-dismiss": False})
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            state = next((j for j in self.qmp("query-jobs") if j["id"] == job), None)
            if state is None or state["status"] == "concluded":
                break
            if time.monotonic() > deadline:
                self.qmp("job-cancel", id=job)
                raise ImageError(f"{self.image.path}: writing the backing file {backing.path} "
                                 f"took more than {JOB_TIMEOUT:g}s")
            time.sleep(0.01)
        if state is not None:
            self.qmp("job-dismiss", id=job)
            if state.get("error"):
                raise ImageError(f"{self.image.path}: writing the backing file {backing.path}: "
                                 f"{state['error']}")

    def drop_backing(self):
        """The image holds everything now: close its runtime backing (the evacuated source chain)
        while the export keeps serving. Nothing was written to the image's header, so it stands
        alone on disk whatever happens next."""
        if self.backing is None:
            return
        self.qmp("blockdev-reopen", options=[{
            "driver": self.image.format, "node-name": self.node, "file": self.file_node,
            "backing": None, "discard": "unmap", **format_options(self.cache)}])
        self.qmp("blockdev-del", **{"node-name": SOURCE_NODE})
        self.backing = None

    def failure(self, what):
        return self._child.failure(what)

    def stop(self):
        """SIGTERM: qemu-storage-daemon drops its clients' connections without answering what they
        wait for (a reconnecting client sends it again), drains, flushes and closes the images."""
        self._child.stop()
        self.qmp_socket.unlink(missing_ok=True)
        if self.listener is None:
            self.nbd_socket.unlink(missing_ok=True)


class SharedStorageDaemon:
    """Several images exported by one qemu-storage-daemon (`--one-daemon`): `sides[label]` is each
    one's StorageDaemon-like view (its own nodes and export name, this process's monitor), which the
    process tree uses as it uses a daemon of its own.

    Why: a mirrored write then wakes one daemon instead of two; on the project's 2-core machine that
    is 26% less CPU per 4 KiB write and 34% more IOPS on 4 connections (docs/PERFORMANCE.md, issue
    #21). Why not always: the sides share this process's failures. A source whose storage hangs
    can stall the destination's export with it, and one crash takes both sides, where two daemons
    let the mirror degrade to the side that lives; so an evacuation (whose source may be failing)
    never shares one."""

    def __init__(self, images, rundir, name, cache="auto"):
        """`images`: (label, ImageInfo or RbdImage, read-only) of each side, in the order the
        daemon opens them."""
        rundir = Path(rundir)
        self.name = name
        self.listener = None
        self.nbd_socket = rundir / f"{name}.sock"
        self.qmp_socket = rundir / f"{name}.qmp"
        self._child = Child(
            f"qemu-storage-daemon ({name}: {', '.join(str(i.path) for _, i, _ in images)})", [],
            rundir / f"{name}.log", pidfile=rundir / f"{name}.pid",
            env=rbd.environment() if any(isinstance(i, rbd.RbdImage) for _, i, _ in images) else None)
        self.sides = {label: _SharedSide(self, label, image, readonly, cache)
                      for label, image, readonly in images}
        self._serving = set(self.sides)

    def _images(self):
        return list(self.sides.values())

    start = StorageDaemon.start         # the same command line, with every side's nodes and export

    def died(self):
        return self._child.died()

    def release(self, side):
        """`side` is no longer used (the data path let it go, or the tree stops): its export is
        removed and its image closed while the others keep serving; the process stops with the
        last. Closing the image matters: the old source's qcow2 lock goes with it, as it would with
        a daemon of its own."""
        if side.name not in self._serving:
            return
        self._serving.discard(side.name)
        if not self._serving or not self._child.alive():
            self.stop()
            return
        try:
            side.qmp("block-export-del", id=side.export_id, mode="hard")
            deadline = time.monotonic() + RELEASE_TIMEOUT
            while any(e["id"] == side.export_id for e in side.qmp("query-block-exports")):
                if time.monotonic() > deadline:
                    raise ProcessError(f"{self._child.name}: export {side.export!r} still open "
                                       f"after {RELEASE_TIMEOUT:g}s")
                time.sleep(0.02)
            side.qmp("blockdev-del", **{"node-name": side.node})
            side.qmp("blockdev-del", **{"node-name": side.file_node})
        except (ProcessError, ImageError) as e:
            # The side is let go either way; its image closes at the latest with the process.
            log.warning("%s: could not close %s: %s", self._child.name, side.image.path, e)

    def stop(self):
        self._serving.clear()
        self._child.stop()
        self.qmp_socket.unlink(missing_ok=True)
        self.nbd_socket.unlink(missing_ok=True)


class _SharedSide(StorageDaemon):
    """One image of a SharedStorageDaemon: a StorageDaemon's nodes, export and QMP verbs (rebase,
    ...), on the shared process; `stop()` lets the image go (SharedStorageDaemon.release)."""

    def __init__(self, owner, label, image, readonly, cache):
        self._owner = owner
        self.image, self.backing, self.name, self.readonly = image, None, label, readonly
        self.cache = cache_mode(image, cache)
        self.listener = None
        self.aio = None
        self.node, self.file_node, self.backing_node = f"{label}-top", f"{label}-file", f"{label}-new-backing"
        self.export, self.export_id = label, f"export-{label}"
        self.nbd_socket, self.qmp_socket, self._child = owner.nbd_socket, owner.qmp_socket, owner._child

    def start(self):
        raise RuntimeError("a shared side starts with its SharedStorageDaemon")

    def stop(self):
        self._owner.release(self)
