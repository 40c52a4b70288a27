"""qemu-storage-daemon exporting one image (with its backing chain) over NBD.

QEMU owns qcow2: every image mirrorfs serves or writes goes through a storage daemon it starts here, and
the data path only ever speaks NBD to it. Each daemon also has a QMP monitor, used by the migration
workflow to change an overlay's backing file while it is open.
"""

import json
import os
from pathlib import Path

from mirrorfs import sockets
from mirrorfs.processes import Child

NODE = "top"


class StorageDaemon:
    """`with StorageDaemon(image_info, rundir, "src") as d:` exports `d.uri` until the block ends."""

    def __init__(self, image, rundir, name, readonly=False):
        self.image = image
        self.name = name
        self.readonly = readonly
        rundir = Path(rundir)
        self.nbd_socket = rundir / f"{name}.sock"
        self.qmp_socket = rundir / f"{name}.qmp"
        self._child = Child(
            f"qemu-storage-daemon ({name}: {image.path})", [], rundir / f"{name}.log",
            pidfile=rundir / f"{name}.pid")

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.nbd_socket}"

    @property
    def pid(self):
        return self._child.pid

    def _blockdev(self):
        # discard=unmap on both layers so a client's trim really deallocates, identically on both sides.
        node = {
            "driver": self.image.format, "node-name": NODE, "discard": "unmap",
            "read-only": self.readonly,
            "file": {"driver": "file", "filename": os.fspath(self.image.path), "discard": "unmap"},
        }
        return json.dumps(node)

    def start(self):
        nbd = sockets.bind_unix(self.nbd_socket)
        qmp = sockets.bind_unix(self.qmp_socket)
        try:
            export = {"type": "nbd", "id": "export0", "node-name": NODE, "name": "",
                      "writable": not self.readonly}
            self._child.argv = [
                "qemu-storage-daemon",
                "--blockdev", self._blockdev(),
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
            nbd.close()
            qmp.close()

    def alive(self):
        return self._child.alive()

    def failure(self, what):
        return self._child.failure(what)

    def stop(self):
        self._child.stop()
        for path in (self.nbd_socket, self.qmp_socket):
            path.unlink(missing_ok=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
