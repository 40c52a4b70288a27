"""nbdkit's callbacks, mapped onto the data path (`mirrorfs.datapath`, `mirrorfs.disk`).

`plugin/mirrorfs_nbdkit.py` is the script nbdkit loads; it imports everything from here. nbdkit calls
these functions by name, so this module holds the only state nbdkit needs between callbacks: one
`DataPath`, built from the `key=value` arguments and connected in get_ready.
"""

import logging
import sys

import nbdkit

from mirrorfs.datapath import DataPath
from mirrorfs.disk import RequestError

API_VERSION = 2


_plugin = DataPath()


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
    # Threads must start after nbdkit's fork (if it forks).
    _plugin.start_threads()


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
