"""What runs inside nbdkit: the served disk's request routing, its backends, the copier, the state.

Everything in this subpackage is loaded by nbdkit's embedded interpreter (Debian's /usr/bin/python3)
and imports only the standard library, `nbd` (libnbd) and `nbdkit`: never the supervisor beside it,
never a PyPI package (tests/unit/test_layers.py checks it in a clean interpreter). The supervisor may import
from here: the constants both halves must agree on live here, once.

Its rooms, each with its module map in its own docstring:

    nbdkit/            the nbdkit process: the script, the callbacks, the service that assembles a mode
    sides/             what a side is asked to do, the NBD and memory sides, resend, copy, statistics
    mirror/            the mirror: the mirrored disk, the dirty map, the copier, the lag
    evacuation/        the evacuation: the evacuating disk, the hydration map, hydrator, copy-on-read

and the pieces both modes share, beside them:

    served.py          the served disk's contract (Disk and Evacuee implement it): capabilities
                       computed once, in flight, statistics, the status skeleton, quiesce, stop;
                       above sides/ (its statistics are theirs), below both modes
    background.py      the background copy's contract (Copier and Hydrator implement it):
                       workers, pacer, rate, status, stop
    options.py         the data path's parameters: to_params / from_params side by side, each rule checked once
    errors.py          the data path's exception tree (DataPathError: SideError, RequestError, ...)
    inflight.py        requests in flight: counted, range-locked, holdable for a switch
    histogram.py       a latency histogram, no lock on the request path (metrics)
    state.py           the state journal in the state directory: what survives kill -9
    statedir.py        the state directory as a whole: every file of it, and whose it is (refused if
                       not); above both modes, since it reads each mode's files

`mirror/` and `evacuation/` never import each other; a room imports only from the rooms below it
(tests/unit/test_layers.py).
"""

from pathlib import Path

# The script nbdkit's python plugin loads (`nbdkit python SCRIPT key=value...`).
NBDKIT_SCRIPT = Path(__file__).resolve().parent / "nbdkit" / "script.py"

