"""Python thread states kept across requests (mirrorfs/datapath/nbdkit/threadstate.py): deleted when their client
leaves, and nbdkit survives its connections whether requests run on worker threads or not."""

import hashlib
import subprocess

import nbd
import psutil

from lib.images import MiB
from lib.nbdservers import wait_for_pidfile
from lib.waits import wait_until
from mirrorfs.datapath import NBDKIT_SCRIPT as PLUGIN


def parallel_reads(uri, requests=64, length=64 * 1024):
    """Many reads in flight at once, so that many of nbdkit's worker threads serve this client.
    Returns the open handle and a digest of what was read."""
    h = nbd.NBD()
    h.connect_uri(uri)
    buffers = [nbd.Buffer(length) for _ in range(requests)]
    pending = {h.aio_pread(b, i * length) for i, b in enumerate(buffers)}
    while pending:
        # A completed command is retired by the call that reports it: ask about each once.
        pending = {c for c in pending if not h.aio_command_completed(c)}
        if pending:
            h.poll(-1)
    digest = hashlib.sha256(b"".join(b.to_bytearray() for b in buffers)).hexdigest()
    return h, digest


def nbdkit_rss(disk):
    procs = [p for p in psutil.Process(disk.proc.pid).children(recursive=True) if p.name() == "nbdkit"]
    assert len(procs) == 1 and procs[0].status() != psutil.STATUS_ZOMBIE
    return procs[0].memory_info().rss


def clients_in_turn(uri, n):
    """`n` clients one after the other, each with reads on many of nbdkit's worker threads.
    Returns the set of digests they read."""
    digests = set()
    for _ in range(n):
        h, digest = parallel_reads(uri)
        digests.add(digest)
        h.shutdown()
        del h
    return digests


def test_thread_states_do_not_pile_up_over_many_connections(chains, serve):
    """Each client's worker threads keep a thread state (and its Python data stack) while it is
    connected; close() deletes them. Without that, each connection would leave up to 16 behind:
    150 clients, about 12 MiB (measured by disabling the deletion)."""
    disk = serve(chains.source, chains.dest)
    first = clients_in_turn(disk.uri, 10)           # warm up: allocator pools, the handle pools
    before = nbdkit_rss(disk)
    later = clients_in_turn(disk.uri, 150)
    grown = nbdkit_rss(disk) - before
    assert grown < 6 * MiB, f"nbdkit grew by {grown / MiB:.1f} MiB over 150 connections"
    assert len(first) == 1 and later == first       # and every client read the same data
    assert disk.stop() == 0


def settled_threads(process, samples=10, interval=0.05):
    """The thread count of `process` once it has not changed for `samples` samples in a row: nbdkit
    and the plugin start some of their threads after the pidfile is written."""
    seen = []

    def settled():
        seen.append(process.num_threads())
        return len(seen) >= samples and len(set(seen[-samples:])) == 1 and seen[-1]

    return wait_until(settled, "a steady thread count", timeout=30, interval=interval)


def test_one_worker_thread_per_connection(chains, qemu_nbd, workdir):
    """nbdkit --threads 1 runs requests on the connection's own thread, which also runs close():
    the kept state is given back there instead of deleted (deleting it would kill the process)."""
    source = qemu_nbd(chains.source, "src")
    dest = qemu_nbd(chains.dest, "dst")
    socket = workdir / "one.sock"
    pidfile = workdir / "one.pid"
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--threads", "1", "-U", socket, "--pidfile", pidfile, "python", PLUGIN,
         f"source={source.uri}", f"dest={dest.uri}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for_pidfile(proc, pidfile, timeout=30), proc.stderr.read()
        nbdkit = psutil.Process(proc.pid)
        idle = settled_threads(nbdkit)
        uri = f"nbd+unix:///?socket={socket}"
        digests = set()
        for i in range(5):
            h = nbd.NBD()
            h.connect_uri(uri)
            h.pwrite(bytes([i]) * MiB, i * MiB)
            h.shutdown()
            del h
            h, digest = parallel_reads(uri, requests=20, length=256 * 1024)   # the first 5 MiB
            digests.add(digest)
            h.shutdown()
            del h
        # nbdkit closes a client's socket before it calls the plugin's close(): the last close()
        # has run once that connection's thread is gone (the process is back to its idle threads).
        wait_until(lambda: proc.poll() is not None or nbdkit.num_threads() <= idle,
                   "every connection's thread gone, close() run", timeout=30)
        assert proc.poll() is None, proc.stderr.read()
        assert len(digests) == 5    # each pass saw the previous writes
    finally:
        proc.kill()             # nbdkit ignores SIGTERM (mirrorfs.datapath.nbdkit.callbacks.after_fork)
        proc.wait(30)
        proc.stderr.close()
