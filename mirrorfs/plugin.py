"""nbdkit's callbacks, mapped onto `Disk`.

`plugin/mirrorfs_nbdkit.py` is the script nbdkit loads; it imports everything from here. nbdkit calls
these functions by name, so this module holds the only state nbdkit needs between callbacks: one
`Plugin` object, built from the `key=value` arguments and connected in get_ready.

Configuration (all given by `mirrorfs serve`, which also starts the storage daemons):
  source=URI    the read side and first write side (required)
  dest=URI      the mirror's destination (optional: without it, a plain proxy of the source)
  control=PATH  a unix socket for mirrorfs's supervisor: status, and switching sides (optional)
"""

import logging
import os
import socket
import sys

import nbdkit

from mirrorfs import jsonlines
from mirrorfs.backend import BackendError, NbdBackend
from mirrorfs.disk import Disk, RequestError
from mirrorfs.inflight import DrainTimeout

API_VERSION = 2

log = logging.getLogger("mirrorfs")


class Plugin:
    KEYS = ("source", "dest", "control")

    def __init__(self):
        self.config = {}
        self.disk = None
        self.control = None

    def configure(self, key, value):
        if key not in self.KEYS:
            raise ValueError(f"unknown parameter {key!r} (expected one of {', '.join(self.KEYS)})")
        self.config[key] = value

    def check(self):
        if "source" not in self.config:
            raise ValueError("missing parameter: source=URI")

    def connect(self):
        try:
            source = NbdBackend(self.config["source"], "source")
            dest = NbdBackend(self.config["dest"], "destination") if "dest" in self.config else None
        except BackendError as e:
            raise RuntimeError(str(e)) from None
        if dest is not None and dest.size < source.size:
            raise RuntimeError(f"destination is smaller than source ({dest.size} < {source.size} bytes)")
        self.disk = Disk(source, dest)

    def serve_control(self):
        path = self.config.get("control")
        if path is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)            # a socket file is created 0777 & ~umask: 0600
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(8)
        self.control = jsonlines.Server(sock, self.handle, "datapath control").start()

    def handle(self, request):
        """The data path's control commands (see mirrorfs.datapath for the client side)."""
        cmd = request["cmd"]
        if cmd == "status":
            return {"status": self.disk.status()}
        if cmd == "switch":
            by_name = {b.name: b for b in self.disk.backends}
            try:
                reader = by_name[request["reader"]]
                writers = [by_name[name] for name in request["writers"]]
                timeout = float(request.get("timeout", 10))
            except (KeyError, TypeError, ValueError) as e:
                raise jsonlines.ControlError(f"switch: bad arguments: {e}") from None
            try:
                stall = self.disk.switch(reader, writers, timeout)
            except DrainTimeout as e:
                raise jsonlines.ControlError(f"switch refused: {e}") from None
            log.info("switched: reads from %s, writes to %s; clients held %.1f ms", reader.name,
                     ", ".join(w.name for w in writers), stall * 1000)
            return {"stall_ms": stall * 1000}
        if cmd == "quiesce":
            try:
                self.disk.quiesce(float(request.get("timeout", 10)))
            except DrainTimeout as e:
                raise jsonlines.ControlError(f"quiesce: {e}") from None
            return {}
        raise jsonlines.ControlError(f"unknown command {cmd!r}")

    def close(self):
        if self.control is not None:
            self.control.stop()
        if self.disk is None:
            return
        for side in set(self.disk.writers):
            try:
                if side.can_flush:
                    side.call(lambda h: h.flush())
            except Exception as e:      # shutting down: report, go on closing the others
                log.error("%s: flush on exit failed: %s", side.name, e)
            side.close()


_plugin = Plugin()


def _fail(e):
    nbdkit.set_error(e.errno)
    raise e


# Configuration and lifetime.

def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    _plugin.configure(key, value)


def config_complete():
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="mirrorfs[nbdkit]: %(levelname)s: %(message)s")
    _plugin.check()


def get_ready():
    _plugin.connect()


def after_fork():
    # Threads must start after nbdkit's fork (if it forks), so the control socket starts here.
    _plugin.serve_control()


def cleanup():
    _plugin.close()


# Per connection. The handle is the shared disk: all state lives there.

def open(readonly):
    return _plugin.disk


def get_size(disk):
    return disk.size


def block_size(disk):
    return disk.block_size()


def is_rotational(disk):
    return disk.is_rotational()


def can_write(disk):
    return disk.can_write()


def can_flush(disk):
    return disk.can_flush()


def can_fua(disk):
    if disk.can_fua():
        return nbdkit.FUA_NATIVE
    return nbdkit.FUA_EMULATE if disk.can_flush() else nbdkit.FUA_NONE


def can_trim(disk):
    return disk.can_trim()


def can_zero(disk):
    return disk.can_zero()


def can_fast_zero(disk):
    return disk.can_fast_zero()


def can_multi_conn(disk):
    return disk.can_multi_conn()


def can_cache(disk):
    return nbdkit.CACHE_NATIVE if disk.can_cache() else nbdkit.CACHE_NONE


def can_extents(disk):
    return disk.can_extents()


# Data.

def pread(disk, buf, offset, flags):
    try:
        disk.pread(buf, offset)
    except RequestError as e:
        _fail(e)


def pwrite(disk, buf, offset, flags):
    try:
        disk.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except RequestError as e:
        _fail(e)


def zero(disk, count, offset, flags):
    try:
        disk.zero(count, offset, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
                  fua=bool(flags & nbdkit.FLAG_FUA), fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
    except RequestError as e:
        _fail(e)


def trim(disk, count, offset, flags):
    try:
        disk.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except RequestError as e:
        _fail(e)


def flush(disk, flags):
    try:
        disk.flush()
    except RequestError as e:
        _fail(e)


def cache(disk, count, offset, flags):
    try:
        disk.cache(count, offset)
    except RequestError as e:
        _fail(e)


def extents(disk, count, offset, flags):
    try:
        return disk.extents(count, offset, req_one=bool(flags & nbdkit.FLAG_REQ_ONE))
    except RequestError as e:
        _fail(e)


# What the entry script re-exports: exactly the callbacks nbdkit looks up by name.
__all__ = [
    "API_VERSION", "thread_model", "config", "config_complete", "get_ready", "after_fork", "cleanup",
    "open",
    "get_size", "block_size", "is_rotational", "can_write", "can_flush", "can_fua", "can_trim",
    "can_zero", "can_fast_zero", "can_multi_conn", "can_cache", "can_extents", "pread", "pwrite",
    "zero", "trim", "flush", "cache", "extents",
]
