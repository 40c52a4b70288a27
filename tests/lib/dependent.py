"""A writer whose writes depend on each other across disks (issue #27): step k writes block k to
disk A, and once A acknowledged it, block k to disk B, then to C. A record on B (k at a slot) thus
names a write acknowledged on A before it. Any image of the group taken at one instant (what a
crash leaves, what a group switch must serve, what a committed group snapshot holds) has, at every
slot, A >= B >= C; a group whose members stopped at different instants (some on the old storage,
some on the new) breaks that as soon as a write came after the earlier one.

Block k, at slot k % SLOTS of a region past the bases' data, is the 8-byte k repeated: a torn block
is seen as one. Every write is FUA (acknowledged means durable). libnbd clients, no
reconnection: the writer stops at the first failure (a kill), and
what it had acknowledged is what each disk must still hold."""

import struct
import threading
import time

import nbd

SLOTS = 512
BLOCK = 4096
REGION = 48 << 20          # past the data the tests put in the bases


def block(k):
    return struct.pack("<Q", k) * (BLOCK // 8)


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


class DependentWriter:
    def __init__(self, sockets, spacing=0.002):
        self.sockets = list(sockets)
        self.handles = []
        for sock in self.sockets:
            h = nbd.NBD()
            h.connect_uri(uri(sock))
            self.handles.append(h)
        # acked[d][slot]: the last k disk d acknowledged at that slot.
        self.acked = [[0] * SLOTS for _ in self.sockets]
        self.steps = 0
        self.error = None
        self._spacing = spacing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        k = 0
        while not self._stop.is_set():
            k += 1
            slot = k % SLOTS
            for d, h in enumerate(self.handles):
                try:
                    # FUA: acknowledged means durable. A storage daemon killed with SIGKILL takes
                    # what it acknowledged but had not flushed with it (GUARANTEES.md), so only a
                    # durable write can be asked of the side that serves afterwards.
                    h.pwrite(block(k), REGION + slot * BLOCK, nbd.CMD_FLAG_FUA)
                except nbd.Error as e:
                    self.error = str(e)
                    return
                self.acked[d][slot] = k
            self.steps = k
            self._stop.wait(self._spacing)

    def wait_steps(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while self.steps < n and self.error is None:
            assert time.monotonic() < deadline, f"only {self.steps} steps"
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        self._thread.join(60)
        for h in self.handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self.handles = []


def read_slots(target):
    """The k of every slot of `target` (a socket path, or an image file opened read-only)."""
    h = nbd.NBD()
    if str(target).endswith(".sock"):
        h.connect_uri(uri(target))
    else:
        fmt = "qcow2" if str(target).endswith(".qcow2") else "raw"
        # Debian 12's qemu-nbd has no --force-share: the top's lock is turned off instead.
        h.connect_systemd_socket_activation([
            "qemu-nbd", "-r", "--image-opts",
            f"driver={fmt},file.driver=file,file.filename={target},file.locking=off"])
    try:
        data = h.pread(SLOTS * BLOCK, REGION)
    finally:
        h.shutdown()
    slots = []
    for s in range(SLOTS):
        piece = data[s * BLOCK:(s + 1) * BLOCK]
        k = struct.unpack_from("<Q", piece)[0]
        assert piece == block(k), f"slot {s} is torn"
        slots.append(k)
    return slots


def check(disks, acked=None):
    """`disks`: the slots of A, B, C...: every dependency holds (A >= B >= C at every slot), and
    every acknowledged write is there (`acked`, the writer's)."""
    for s in range(SLOTS):
        values = [d[s] for d in disks]
        assert values == sorted(values, reverse=True), \
            f"slot {s}: {values}: a later disk holds a write its predecessor does not"
        if acked is not None:
            for d, a in zip(disks, acked):
                assert d[s] >= a[s], f"slot {s}: {d[s]} < acknowledged {a[s]}"
