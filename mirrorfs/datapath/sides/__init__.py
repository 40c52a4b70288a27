"""What a side is asked to do, and the two kinds of side; both modes build on this room.

    commands.py        what a side is asked to do: Read, Write, Zero, Trim, Flush (offset, length, flags)
    backend.py         one side over NBD: the verbs (pread, pwrite, ..., run/start a command) on a
                       pool of libnbd handles; the one connect path
    memory.py          one side in a bytearray, with the same verbs, and failures to order (tests)
    resend.py          the one loop that sends a command again on a new connection, and how long a
                       lost connection is waited for; the largest payload-free change
    sideio.py          a side's verbs with resend and splitting (the evacuation's requests)
    copy.py            the one extent-aware copy of a range from one side to another: in chunks,
                       paced, stoppable; for the copier, the hydrator and the base copy
    stats.py           per-side counters: errors, the last error, latencies (status, metrics)
"""
