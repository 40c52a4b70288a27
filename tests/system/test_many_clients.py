"""Many clients at once: they queue for the backends' connections instead of failing, and both
sides end identical."""

import threading

import nbd

from lib.images import images_identical, qemu_io

CLIENTS = 200
WRITES = 4
CHUNK = 64 * 1024


def client(uri, number, ready, errors):
    h = nbd.NBD()
    try:
        try:
            h.connect_uri(uri)
        except nbd.Error:
            ready.abort()               # the others would wait for this one in vain
            raise
        ready.wait()                    # every client connected: now all write at once
        cookies = [h.aio_pwrite(bytes([number % 251 + 1]) * CHUNK, (number * WRITES + k) * CHUNK)
                   for k in range(WRITES)]
        for c in cookies:
            while not h.aio_command_completed(c):
                h.poll(-1)
        h.flush()
    except (nbd.Error, threading.BrokenBarrierError) as e:
        errors.append((number, str(e)))
    finally:
        if h.aio_is_ready():
            h.shutdown()


def test_two_hundred_clients_writing_at_once_all_succeed(chains, serve):
    disk = serve(chains.source, chains.dest)
    ready = threading.Barrier(CLIENTS, timeout=120)
    errors = []
    threads = [threading.Thread(target=client, args=(disk.uri, n, ready, errors))
               for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} clients failed, e.g. {errors[:3]}"
    assert disk.stop() == 0, disk.stderr
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    for n in (0, 1, CLIENTS // 2, CLIENTS - 1):
        qemu_io(chains.dest, f"read -P {n % 251 + 1} {n * WRITES * CHUNK} {WRITES * CHUNK}",
                fmt="qcow2")
