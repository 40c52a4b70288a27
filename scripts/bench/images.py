"""The images the targets serve (a fully written base, fresh overlays per target: Disk) and the
qemu-storage-daemon exports of them. HOST_CACHE is every storage daemon's cache mode for the
run (`--cache`; set once by the bench that runs, read as `images.HOST_CACHE`)."""

import json
import shutil
import tempfile
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from mirrorfs.system import sockets
from mirrorfs.daemons import storage
from mirrorfs.system.children import Child

from .common import BenchError, MiB, run_tool


def qemu_img(*args):
    run_tool(["qemu-img", *args], timeout=120)


def make_base(path, size):
    """The disk's data, every byte of it written (a different pattern per 64 MiB): reads are of real
    data, and an overlay's partial-cluster writes copy real data up from it."""
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    chunk = min(64 * MiB, size)
    commands = []
    for i, offset in enumerate(range(0, size, chunk)):
        commands += ["-c", f"write -q -P {0x11 + i % 0xee} {offset} {min(chunk, size - offset)}"]
    out = run_tool(["qemu-io", "-f", "qcow2", *commands, path], timeout=600)
    if out.strip():         # qemu-io reports a failed command on stdout and still exits 0
        raise BenchError(f"qemu-io could not write {path}: {out.strip()}")
    return Path(path)


def make_overlay(path, backing, size=None):
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path,
             *([size] if size else []))
    return Path(path)


class Disk:
    """One target's fresh overlays on the shared base: the source the client uses and the
    destination a mirror writes to. Sockets and logs of the target live in the same directory."""

    def __init__(self, directory, base, size=None):
        self.dir = Path(directory)
        self.dir.mkdir()
        self.base = base
        self.source = make_overlay(self.dir / "src.qcow2", base, size)
        self.dest = make_overlay(self.dir / "dst.qcow2", base, size)

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# The host cache mode of every storage daemon in the run (--cache): mirrorfs's daemons get it too.
HOST_CACHE = "none"


def resolve_cache(parent, cache):
    """--cache as the daemons take it: auto is none where `parent` allows O_DIRECT (a tmpfs does
    not), else writeback."""
    if cache != "auto":
        return cache
    with tempfile.NamedTemporaryFile(dir=parent) as probe:
        return "none" if storage.direct_io_supported(probe.name) else "writeback"


def qcow2_node(name, path, backing=None, readonly=False):
    """A qcow2 block node with the options mirrorfs's own daemons use (mirrorfs/daemons/storage.py), in
    the run's cache mode, so that the targets differ only in what sits between the client and
    qcow2. Without `backing` the chain in the image header is opened."""
    node = {"driver": "qcow2", "node-name": name, "discard": "unmap", "read-only": readonly,
            **storage.format_options(HOST_CACHE),
            "file": storage.file_node(path, HOST_CACHE, discard="unmap", **{"read-only": readonly})}
    if backing is not None:
        node["backing"] = backing
    return node


# The processes of the targets.

class StorageExport:
    """qemu-storage-daemon exporting one node of a block graph over NBD (a unix socket), with a QMP
    monitor if asked. Ready when its pidfile appears."""

    def __init__(self, rundir, name, blockdevs, export_node, writable=True, monitor=False):
        self.socket = sockets.check_unix_path(Path(rundir) / f"{name}.sock")
        self.qmp_socket = Path(rundir) / f"{name}.qmp" if monitor else None
        pidfile = Path(rundir) / f"{name}.pid"
        argv = ["qemu-storage-daemon"]
        for node in blockdevs:
            argv += ["--blockdev", json.dumps(node)]
        export = {"type": "nbd", "id": "export0", "node-name": export_node, "name": "",
                  "writable": writable}
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.socket}",
                 "--export", json.dumps(export)]
        if monitor:
            argv += ["--chardev", f"socket,id=qmp0,path={self.qmp_socket},server=on,wait=off",
                     "--monitor", "chardev=qmp0"]
        argv += ["--pidfile", pidfile]
        self.child = Child(f"qemu-storage-daemon ({name})", argv, Path(rundir) / f"{name}.log",
                           pidfile=pidfile)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"

    def start(self):
        self.child.start()

    def stop(self):
        self.child.stop()

    def monitor(self):
        """A connected QMP client (use it in a with block)."""
        qmp = QEMUMonitorProtocol(str(self.qmp_socket))
        qmp.connect()
        return qmp
