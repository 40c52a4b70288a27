"""What runs inside nbdkit: the served disk's request routing, its backends, the copier, the state.

Everything in this subpackage is loaded by nbdkit's embedded interpreter (Debian's /usr/bin/python3)
and imports only the standard library, `nbd` (libnbd) and `nbdkit`: never the supervisor beside it,
never a PyPI package (tests/unit/test_layers.py checks it in a clean interpreter). The supervisor may import
from here: the constants both halves must agree on live here, once.

    nbdkit_script.py   the file nbdkit's python plugin loads (part of the installed package)
    callbacks.py       nbdkit's callbacks, mapped onto the service
    service.py         the data path assembled from its parameters; its control socket
    options.py         those parameters: validated once, to_params / from_params side by side
    disk.py            what happens to each request (read this to know what happens to a write)
    commands.py        what a side is asked to do: Read, Write, Zero, Trim, Flush (offset, length, flags)
    backend.py         one side over NBD: the verbs (pread, pwrite, ..., run/start a command) on a
                       pool of libnbd handles; the one connect path
    memory.py          one side in a bytearray, with the same verbs, and failures to order (tests)
    errors.py          the data path's exception tree (DataPathError: SideError, RequestError, ...)
    inflight.py        requests in flight: counted, range-locked, holdable for a switch
    dirtymap.py        what may differ between the sides, and the write-intent rule
    copier.py          copies what may differ (full mode's first pass, regions to copy again)
    state.py           the state journal in the state directory: what survives kill -9
    statedir.py        the state directory as a whole: every file of it, and whose it is (refused if not)
    compare.py         a mirror's sides compared under range locks (serve --copy none's pivot)
    threadstate.py     one Python thread state per nbdkit worker thread (speed)
    lifeline.py        nbdkit is killed with its supervisor, before a storage daemon stops
    histogram.py       a per-side latency histogram, no lock on the request path (metrics)
    evacuee.py         switch-first evacuation: what happens to each request (docs/EVACUATION.md)
    hydration.py       its crash-safe hydration map, with a group commit
    hydrator.py        its background hydration
    copyonread.py      its copy-on-read: a client's read of a region not hydrated hydrates it
    sideio.py          its side I/O, on the backends' verbs
"""

from pathlib import Path

# The script nbdkit's python plugin loads (`nbdkit python SCRIPT key=value...`).
NBDKIT_SCRIPT = Path(__file__).resolve().parent / "nbdkit_script.py"

