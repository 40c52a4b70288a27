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
import os
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
    """The mode a daemon serving `image` (an ImageInfo) runs in: `requested`, with auto resolved."""
    check_cache(requested)
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


def file_node(path, cache, **options):
    """A `file` block node for `path` in cache mode `cache` (none or writeback)."""
    node = {"driver": "file", "filename": os.fspath(path), **options}
    if cache == "none":
        node.update({"cache": {"direct": True}, "aio": "native"})
    return node


class StorageDaemon:
    """One image exported at `uri` from `start()` until `stop()` (which is safe to call twice)."""

    def __init__(self, image, rundir, name, readonly=False, cache="auto", listener=None,
                 backing=None):
        """`listener`: a listening socket to export on (a disk's own socket, which outlives this
        daemon: `mirrorfs export`); by default the daemon gets a socket of its own in `rundir`.
        `backing`: an image (ImageInfo, with its chain) opened read-only as the image's backing
        while the daemon runs, never written to the image's header: an evacuation hydrating in
        place (see `drop_backing`, and docs/EVACUATION.md)."""
        self.image = image
        self.backing = backing
        self.name = name
        self.readonly = readonly
        self.cache = cache_mode(image, cache)
        self.listener = listener
        rundir = Path(rundir)
        self.nbd_socket = Path(listener.getsockname()) if listener else rundir / f"{name}.sock"
        self.qmp_socket = rundir / f"{name}.qmp"
        self._child = Child(
            f"qemu-storage-daemon ({name}: {image.path})", [], rundir / f"{name}.log",
            pidfile=rundir / f"{name}.pid",
            env=rbd.environment() if isinstance(image, rbd.RbdImage) else None)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.nbd_socket}"

    def _blockdevs(self):
        # Both layers named, so that QMP can later reopen the image node with another backing.
        # discard=unmap on both so a client's trim really deallocates, identically on both sides.
        options = {"node-name": FILE_NODE, "discard": "unmap", "read-only": self.readonly}
        if isinstance(self.image, rbd.RbdImage):
            image_file = rbd.file_node(self.image, self.cache, **options)
        else:
            image_file = file_node(self.image.path, self.cache, **options)
        node = {"driver": self.image.format, "node-name": NODE, "file": FILE_NODE,
                "discard": "unmap", "read-only": self.readonly, **format_options(self.cache)}
        backing = []
        if self.backing is not None:
            backing = ["--blockdev", json.dumps(self._backing_node())]
            node["backing"] = SOURCE_NODE
        return ["--blockdev", json.dumps(image_file), *backing, "--blockdev", json.dumps(node)]

    def _backing_node(self):
        cache = cache_mode(self.backing) if self.cache == "none" else "writeback"
        return {"driver": self.backing.format, "node-name": SOURCE_NODE, "read-only": True,
                **format_options(cache),
                "file": file_node(self.backing.path, cache, **{"read-only": True})}

    def start(self):
        nbd = self.listener or sockets.bind_unix(self.nbd_socket)
        qmp = sockets.bind_unix(self.qmp_socket)
        try:
            export = {"type": "nbd", "id": "export0", "node-name": NODE, "name": "",
                      "writable": not self.readonly}
            self._child.argv = [
                "qemu-storage-daemon", *self._blockdevs(),
                "--nbd-server", f"addr.type=fd,addr.str={nbd.fileno()}",
                "--export", json.dumps(export),
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
            "driver": backing.format, "node-name": BACKING_NODE, "read-only": True,
            **format_options(cache), "file": file_node(backing.path, cache, **{"read-only": True})})
        self.qmp("blockdev-reopen", options=[{
            "driver": self.image.format, "node-name": NODE, "file": FILE_NODE,
            "backing": BACKING_NODE, "discard": "unmap", **format_options(self.cache)}])
        self.qmp("change-backing-file", device=NODE, **{
            "image-node-name": NODE, "backing-file": os.fspath(backing.path)})

    def drop_backing(self):
        """The image holds everything now: close its runtime backing (the evacuated source chain)
        while the export keeps serving. Nothing was written to the image's header, so it stands
        alone on disk whatever happens next."""
        if self.backing is None:
            return
        self.qmp("blockdev-reopen", options=[{
            "driver": self.image.format, "node-name": NODE, "file": FILE_NODE,
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
