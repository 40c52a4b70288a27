"""The data path ends with its supervisor.

nbdkit gets SIGTERM from the kernel when mirrorfs dies (PR_SET_PDEATHSIG; nbdkit sets it itself,
overriding whatever signal its parent asked for), but nbdkit 1.32 with the python plugin does not
exit on SIGTERM while a client is connected and idle, and a VM's client always is. The orphan kept the
disk's socket, so the same command line was refused until the client happened to send something.

So the data path watches the supervisor itself: a thread blocks on a pidfd of the supervisor's
process (no polling) and, when it exits, ends nbdkit the way the supervisor would have: new requests
held, those in flight finished on both sides, both sides flushed (the storage daemons are being
stopped at the same moment, so this is best effort), then `_exit`. Nothing a client was told is lost
either way: a change is acknowledged only after both sides answered, a flush only after both sides
flushed, so every acknowledged change is already in both storage daemons, which close their images
cleanly on their own SIGTERM. Requests not yet acknowledged end as in any crash (docs/GUARANTEES.md).

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import logging
import os
import select
import threading

log = logging.getLogger("mirrorfs")

# nbdkit's exit status when its supervisor vanished (nobody reads it but a debugger).
EXIT_ORPHANED = 3


def watch(parent_pid, on_death):
    """Call `on_death()` in a thread of its own once process `parent_pid` has exited (at once if it
    already has), then end this process."""
    def run():
        try:
            fd = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            fd = None
        # A parent that died before the pidfd was opened, its pid maybe reused since: we were
        # reparented, so getppid() tells.
        if fd is not None and os.getppid() == parent_pid:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll():
                pass
        log.error("mirrorfs (pid %d) is gone: stopping the data path", parent_pid)
        try:
            on_death()
        except BaseException as e:      # whatever happens, this process must end
            log.error("stopping after the supervisor died: %s", e)
        finally:
            logging.shutdown()
            os._exit(EXIT_ORPHANED)

    threading.Thread(target=run, name="lifeline", daemon=True).start()
