# An nbdkit Python plugin: a disk with a volatile write cache, over a raw file. A write, zero or
# trim stays in this process's memory until a flush (every cached block written to the file and
# fsync'd) or its own FUA (its blocks written through); reads see the cache over the file. So
# `kill -9` of this nbdkit is a power loss: the file holds what was flushed or FUA, nothing more.
# Rules of the form "saved only after the destination was flushed" are tested against it
# (tests/lib/nbdservers.LossyDisk, tests/system/test_power_loss.py): a raw file served by a storage
# daemon keeps every write across kill -9, so it cannot tell a save before the flush from one after.
#
# How to run:
#
#   nbdkit -U /tmp/lossy.sock python tests/lib/lossy_plugin.py file=/tmp/disk.img
#
# Requests are serialized (nbdkit's default for the python plugin): this is a test's disk, not a
# fast one.

import os

import nbdkit

API_VERSION = 2
BLOCK = 4096

path = None
fd = -1
size = 0
cache = {}                      # block number -> its bytes, not on the file yet


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    path = value


def config_complete():
    if path is None:
        raise RuntimeError("file=PATH is required")


def open(readonly):
    global fd, size
    if fd < 0:
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
    return 1


def get_size(h):
    return size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_zero(h):
    return True


def can_multi_conn(h):
    return True                 # one cache for every connection: a flush covers them all


def _block(n):
    got = cache.get(n)
    if got is not None:
        return got
    data = os.pread(fd, BLOCK, n * BLOCK)
    return data + bytes(BLOCK - len(data))


def pread(h, buf, offset, flags):
    pos, end = offset, offset + len(buf)
    while pos < end:
        n, skip = divmod(pos, BLOCK)
        take = min(BLOCK - skip, end - pos)
        buf[pos - offset:pos - offset + take] = _block(n)[skip:skip + take]
        pos += take


def _change(data, offset, flags):
    pos, end = offset, offset + len(data)
    touched = []
    while pos < end:
        n, skip = divmod(pos, BLOCK)
        take = min(BLOCK - skip, end - pos)
        block = bytearray(_block(n))
        block[skip:skip + take] = data[pos - offset:pos - offset + take]
        cache[n] = bytes(block)
        touched.append(n)
        pos += take
    if flags & nbdkit.FLAG_FUA:
        for n in touched:
            _write_back(n)
        os.fdatasync(fd)


def _write_back(n):
    block = cache.pop(n)
    length = min(BLOCK, size - n * BLOCK)
    os.pwrite(fd, block[:length], n * BLOCK)


def pwrite(h, buf, offset, flags):
    _change(bytes(buf), offset, flags)


def zero(h, count, offset, flags):
    _change(bytes(count), offset, flags)


def flush(h, flags):
    for n in sorted(cache):
        _write_back(n)
    os.fdatasync(fd)
