"""nbdkit's callbacks, mapped onto `Disk`.

`plugin/mirrorfs_nbdkit.py` is the script nbdkit loads; it imports everything from here. nbdkit calls
these functions by name, so this module holds the only state nbdkit needs between callbacks: one
`Plugin` object, built from the `key=value` arguments and connected in get_ready.

Configuration (all given by `mirrorfs serve`, which also starts the storage daemons):
  source=URI    the read side and first write side (required)
  dest=URI      the mirror's destination (optional: without it, a plain proxy of the source)
"""

import errno
import logging
import sys

import nbdkit

from mirrorfs.backend import BackendError, NbdBackend
from mirrorfs.disk import Disk, RequestError

API_VERSION = 2

log = logging.getLogger("mirrorfs")


class Plugin:
    KEYS = ("source", "dest")

    def __init__(self):
        self.config = {}
        self.disk = None

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

    def close(self):
        if self.disk is None:
            return
        for side in self.disk.writers:
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
    return disk.reader.is_rotational


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
    return nbdkit.CACHE_NATIVE if disk.reader.can_cache else nbdkit.CACHE_NONE


def can_extents(disk):
    return disk.reader.can_extents


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
    "API_VERSION", "thread_model", "config", "config_complete", "get_ready", "cleanup", "open",
    "get_size", "block_size", "is_rotational", "can_write", "can_flush", "can_fua", "can_trim",
    "can_zero", "can_fast_zero", "can_multi_conn", "can_cache", "can_extents", "pread", "pwrite",
    "zero", "trim", "flush", "cache", "extents",
]
