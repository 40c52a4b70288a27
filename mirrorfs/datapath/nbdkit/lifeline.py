"""The data path ends with its supervisor: killed by the kernel, in the same instant as the storage
daemons are told to stop.

The supervisor starts nbdkit with PR_SET_PDEATHSIG=SIGKILL (mirrorfs.system.children), but nbdkit
1.32 sets its own parent-death signal, SIGTERM, at start-up (strace shows the prctl without
--exit-with-parent on its command line), and the data path ignores SIGTERM (on it nbdkit answers the requests it holds
with ESHUTDOWN; see mirrorfs.datapath.nbdkit.callbacks). So `arm()` sets SIGKILL again, from nbdkit's main
thread (the kernel keeps the setting per thread, and this one lives as long as the process).

Why SIGKILL, and why at that instant: when the supervisor dies, the kernel signals all its children
at once, under one lock: the storage daemons get SIGTERM, drop their NBD connections and close their
images; nbdkit gets SIGKILL and runs no more code. Had nbdkit lived on for even a few milliseconds
(it did: a thread waited on a pidfd of the supervisor, then quiesced the disk for up to 2 s), a write
the source had done and the destination lost with its connection failed under `--on-dest-error
fail`, and the client got EINVAL (nbdkit's wire errno for ENOTCONN): QEMU passes that to its guest
as an I/O error, where a request left unanswered is sent again to whatever serves the socket next
(`tests/system/test_supervisor_death.py`). Killed, nbdkit answers nothing. Nothing a client was told is
lost: a change is acknowledged only after both sides answered, a flush only after both sides
flushed, and the storage daemons close their images cleanly on their SIGTERM; a change that reached
one side only is covered by the write intent (docs/GUARANTEES.md).

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def arm(parent_pid):
    """Be killed (SIGKILL) when the supervisor `parent_pid` dies; at once if it already has. Call it
    from nbdkit's main thread, after nbdkit's own start-up (the plugin's after_fork)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    # A supervisor that died before the prctl sent its signal (nbdkit's SIGTERM, ignored) already:
    # we were reparented, which getppid() tells.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
