"""Clients of an evacuation's tests (tests/system/test_evacuate*.py): writers at odd offsets and sizes in
stripes of their own, with FUA, a reader of regions nobody writes, and the model of what the disk
must read (the source's bytes, then every acknowledged write)."""

import base64
import json
import random
import threading
import time
import zlib

import nbd
import psutil

from lib.commands import MIRRORFS, run
from lib.images import MiB

STRIPE = 256 * 1024
WRITERS = 3


class Model:
    """The disk as it must read: the source's bytes, then every acknowledged write; and each
    writer's write in flight (it may or may not be there after a kill)."""

    def __init__(self, content, written=None):
        self.expected = bytearray(content)
        self.size = len(content)
        self.written = written or self.size * 3 // 4    # writers stay below; the reader checks above
        self.maybe = {}
        self.writes = 0
        self.reads = 0
        self.errors = []
        self.killing = threading.Event()
        self.lock = threading.Lock()


def writer(uri, rng, index, model, stop):
    h = nbd.NBD()
    stripes = model.written // STRIPE
    try:
        h.connect_uri(uri)
        while not stop.is_set():
            stripe = rng.randrange(index, stripes, WRITERS)
            offset = stripe * STRIPE + rng.randrange(0, STRIPE - 1)
            length = rng.randrange(1, min(70000, stripe * STRIPE + STRIPE - offset) + 1)
            data = rng.randbytes(length)
            with model.lock:
                model.maybe[index] = (offset, data)
            h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
            with model.lock:
                model.expected[offset:offset + length] = data
                del model.maybe[index]
                model.writes += 1
            if rng.random() < 0.2:          # read back part of the own stripe
                a = stripe * STRIPE + rng.randrange(0, STRIPE - 1)
                b = rng.randrange(a + 1, stripe * STRIPE + STRIPE + 1)
                got = h.pread(b - a, a)
                if got != bytes(model.expected[a:b]):
                    model.errors.append(f"writer {index}: read [{a}, {b}) differs")
                    return
    except nbd.Error as e:
        if not model.killing.is_set():
            model.errors.append(f"writer {index}: {e}")


def reader(uri, rng, model, stop):
    """Reads of the part nobody writes, across region boundaries, at odd offsets."""
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        while not stop.is_set():
            a = rng.randrange(model.written, model.size - 1)
            b = rng.randrange(a + 1, min(model.size, a + 3 * MiB) + 1)
            if h.pread(b - a, a) != bytes(model.expected[a:b]):
                model.errors.append(f"reader: [{a}, {b}) differs from the source")
                return
            model.reads += 1
    except nbd.Error as e:
        if not model.killing.is_set():
            model.errors.append(f"reader: {e}")


class Clients:
    def __init__(self, uri, seed, model):
        self.model = model
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=writer, args=(uri, random.Random(seed * 10 + i), i,
                                                              model, self.stop))
                        for i in range(WRITERS)]
        self.threads.append(threading.Thread(target=reader, args=(uri, random.Random(seed), model,
                                                                  self.stop)))
        for t in self.threads:
            t.start()

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(120)
        assert not self.model.errors, self.model.errors


def raw_bytes(workdir, image, name):
    out = workdir / f"{name}.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


def serve_switch_first(workdir, source, dest, *extra):
    """`mirrorfs serve --copy full --switch-first` with its state in workdir/state, on
    workdir/d.sock, until its control socket is up; its output in workdir/serve.{out,err}."""
    out = workdir / "serve.out"
    out.write_text("")
    proc = psutil.Popen([*MIRRORFS, "serve", "--copy", "full", "--switch-first", "--state-dir",
                         workdir / "state", source, dest, "--socket", workdir / "d.sock", *extra],
                        stdout=open(out, "w"), stderr=open(workdir / "serve.err", "a"))
    deadline = time.monotonic() + 120
    while "control" not in out.read_text():
        assert proc.poll() is None, (workdir / "serve.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.02)
    return proc


def saved_hydrated(state_dir):
    """(region size, the regions the saved hydration map in `state_dir` names hydrated): what a
    restart would take as on the destination, read from the file, not from status."""
    saved = json.loads((state_dir / "hydration.map").read_text())
    bits = zlib.decompress(base64.b64decode(saved["bits"]))
    return saved["region_size"], {r for r in range(len(bits) * 8) if bits[r >> 3] & (1 << (r & 7))}
