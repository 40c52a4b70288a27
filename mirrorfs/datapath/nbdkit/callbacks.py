"""nbdkit's callbacks, mapped onto the served disk's contract (`mirrorfs.datapath.served`), which
the mirror's Disk and the evacuation's Evacuee both implement.

`plugin/mirrorfs_nbdkit.py` is the script nbdkit loads; it imports everything from here. nbdkit calls
these functions by name, so this module holds the only state nbdkit needs between callbacks: one
`DataPath`, built from the `key=value` arguments and connected in get_ready.
"""

import logging
import signal
import sys

import nbdkit

from mirrorfs.datapath.nbdkit.service import DataPath
from mirrorfs.datapath.errors import RequestError
from mirrorfs.datapath.nbdkit.threadstate import ThreadStates

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
    # nbdkit ends only by SIGKILL: its supervisor's once the data path is quiesced, or the kernel's
    # when the supervisor dies (start_threads sets it back as nbdkit's death signal, see
    # mirrorfs.datapath.nbdkit.lifeline). SIGTERM, which nbdkit asks the kernel for at start-up, would make
    # nbdkit answer the requests it holds with ESHUTDOWN: a reconnecting client passes that to its
    # guest, where an unanswered request is simply sent again. (Here, not earlier: nbdkit installs
    # its own handlers after config_complete.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Threads must start after nbdkit's fork (if it forks). This is nbdkit's main thread.
    _plugin.start_threads()


def cleanup():
    _plugin.close()


# Per connection. The handle holds the shared disk, where all state lives, and the thread states of
# the connection's worker threads (see mirrorfs.threadstate: the first line of each data callback).

class Connection:
    __slots__ = ("disk", "threads")

    def __init__(self, disk):
        self.disk = disk
        self.threads = ThreadStates()


def open(readonly):
    return Connection(_plugin.disk)


def close(conn):
    conn.threads.release()


def get_size(conn):
    return conn.disk.size


# What the client is told at connect time: computed once by the disk (datapath.served).

def block_size(conn):
    return conn.disk.capabilities.block_size


def is_rotational(conn):
    return conn.disk.capabilities.rotational


def can_write(conn):
    return conn.disk.capabilities.write


def can_flush(conn):
    return conn.disk.capabilities.flush


def can_fua(conn):
    if conn.disk.capabilities.fua:
        return nbdkit.FUA_NATIVE
    return nbdkit.FUA_EMULATE if conn.disk.capabilities.flush else nbdkit.FUA_NONE


def can_trim(conn):
    return conn.disk.capabilities.trim


def can_zero(conn):
    return conn.disk.capabilities.zero


def can_fast_zero(conn):
    return conn.disk.capabilities.fast_zero


def can_multi_conn(conn):
    return conn.disk.capabilities.multi_conn


def can_cache(conn):
    return nbdkit.CACHE_NATIVE if conn.disk.capabilities.cache else nbdkit.CACHE_NONE


def can_extents(conn):
    return conn.disk.capabilities.extents


# Data.

def pread(conn, buf, offset, flags):
    conn.threads.keep()
    try:
        conn.disk.pread(buf, offset)
    except RequestError as e:
        _fail(e)


def pwrite(conn, buf, offset, flags):
    conn.threads.keep()
    try:
        conn.disk.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except RequestError as e:
        _fail(e)


def zero(conn, count, offset, flags):
    conn.threads.keep()
    try:
        conn.disk.zero(count, offset, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
                       fua=bool(flags & nbdkit.FLAG_FUA), fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
    except RequestError as e:
        _fail(e)


def trim(conn, count, offset, flags):
    conn.threads.keep()
    try:
        conn.disk.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except RequestError as e:
        _fail(e)


def flush(conn, flags):
    conn.threads.keep()
    try:
        conn.disk.flush()
    except RequestError as e:
        _fail(e)


def cache(conn, count, offset, flags):
    conn.threads.keep()
    try:
        conn.disk.cache(count, offset)
    except RequestError as e:
        _fail(e)


def extents(conn, count, offset, flags):
    conn.threads.keep()
    try:
        return conn.disk.extents(count, offset, req_one=bool(flags & nbdkit.FLAG_REQ_ONE))
    except RequestError as e:
        _fail(e)


# What the entry script re-exports: exactly the callbacks nbdkit looks up by name.
__all__ = [
    "API_VERSION", "thread_model", "config", "config_complete", "get_ready", "after_fork", "cleanup",
    "open", "close",
    "get_size", "block_size", "is_rotational", "can_write", "can_flush", "can_fua", "can_trim",
    "can_zero", "can_fast_zero", "can_multi_conn", "can_cache", "can_extents", "pread", "pwrite",
    "zero", "trim", "flush", "cache", "extents",
]
