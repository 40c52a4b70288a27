"""Seeded writers through libnbd, and the model of what the disk must hold afterwards: every
acknowledged write, or (for a write in flight when the server died) either value."""

import threading

import nbd

from lib.commands import run
from lib.images import MiB

SIZE = 64 * MiB
BLOCK = 4096
WRITERS = 3


class Model:
    """What the disk must hold: per 4 KiB block, the last acknowledged byte pattern, and the
    patterns of writes that were in flight when the server died (either may be there)."""

    def __init__(self):
        self.acked = {}
        self.maybe = {}
        self.writes = 0                 # acknowledged, in all
        self.errors = []                # failures while the server was up: each fails the test
        self.killing = threading.Event()    # set just before the kill: failures after it are expected
        self.lock = threading.Lock()


def writer(uri, rng, index, model, stop, size=SIZE):
    """Writes its own blocks only (block % WRITERS == index), one at a time, so the last
    acknowledged value of each block is well defined. Only the kill may make a write fail."""
    h = nbd.NBD()
    blocks = size // BLOCK
    try:
        h.connect_uri(uri)
        while not stop.is_set():
            block = rng.randrange(index, blocks, WRITERS)
            value = rng.randrange(1, 256)
            with model.lock:
                model.maybe[block] = value
            h.pwrite(bytes([value]) * BLOCK, block * BLOCK)
            with model.lock:
                model.acked[block] = value
                model.writes += 1
                del model.maybe[block]
    except nbd.Error as e:
        if not model.killing.is_set():
            model.errors.append(f"writer {index}: {e}")
        # else: the server was killed under us; the write in flight is "maybe"


def acknowledged(model):
    """{block: the byte values it may hold}: its last acknowledged write's, or that of the write
    in flight at the kill."""
    return {b: {v, model.maybe.get(b, v)} for b, v in model.acked.items()}


def lost_blocks(image, expected, workdir):
    """The blocks of `image` (any format qemu-img reads) whose 4 KiB hold none of the values
    `expected[block]` allows: acknowledged writes the image lost."""
    raw = workdir / "lost-blocks.raw"
    run("qemu-img", "convert", "-O", "raw", image, raw)
    data = raw.read_bytes()
    raw.unlink()
    return [b for b, values in expected.items()
            if not any(data[b * BLOCK:(b + 1) * BLOCK] == bytes([v]) * BLOCK for v in values)]
