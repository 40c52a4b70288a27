"""How long a side's lost connection is waited for, how large a payload-free change may be, and the
one loop that sends a command again on a new connection: one rule for every caller that sends a
command to a side (the mirror's authoritative side, datapath.mirror.disk; the evacuation's side
I/O, datapath.sides.sideio, and its copies, datapath.sides.copy).

    again(side, lambda: side.run(cmd), "write")          # try, and send again while lost
    again(side, lambda: side.run(cmd), "write", lost=e)  # e: the first try's failure, already had

Only a lost connection is worth sending again (SideError.lost: the side may be restarting, or the
whole tree is going down); a side that answered with an error has answered. Sending a change twice
is harmless only because every caller holds the change's range lock: nothing else touched those
bytes meanwhile.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import logging
import time

from mirrorfs.datapath.errors import SideError, lost_again

log = logging.getLogger("mirrorfs")

# Zeroes and trims carry no payload: the advertised maximum (a payload limit, nbdkit's blocksize
# filter's "maxdata" as against "maxlen") does not bind them, qemu-storage-daemon takes them at any
# 32-bit length, and QEMU's own NBD client sends discards of up to 2 GiB, which pieces of 32 MiB would
# turn into 64 round trips. They are split at this larger unit instead.
MAX_EFFECT = 1 << 30
# A request whose authoritative side lost its connection (not: refused the request) is sent again on
# a new connection for this long before the client hears of it. The side may be restarting; or the
# whole process tree is going down (a restart), and then the client must get
# no answer at all rather than an error: a reconnecting client sends the request again to whatever
# serves the socket next (QEMU's reconnect-delay), but passes an error on to its guest.
RESEND_FOR = 30.0
RESEND_EVERY = 0.2


def again(side, attempt, what, lost=None):
    """attempt() until it succeeds; returns what it returns. `lost`: the SideError of a first try
    the caller made itself (the mirror's disk sends to every side at once, then resends to one).

    A failure whose connection was lost is tried again on a new connection, every RESEND_EVERY
    (or once the side's connect backoff ends, `side.down_until`), for RESEND_FOR seconds from the
    first loss. Raises the SideError that ends it: a failure that is not a lost connection (the
    side's answer), one that lost a connection made after the first loss too (`lost_again`: the
    server drops connections on this command, so waiting would only delay the answer), or the
    last one once RESEND_FOR has passed."""
    lost_at = deadline = None
    failure = lost
    while True:
        if failure is None:
            try:
                return attempt()
            except SideError as e:
                failure = e
        e, failure = failure, None
        if not e.lost:
            raise e
        if lost_at is not None and lost_again(e, lost_at):
            log.warning("%s: a new connection was lost under the %s too: failing it", side.name,
                        what)
            raise e
        now = time.monotonic()
        if lost_at is None:
            lost_at, deadline = now, now + RESEND_FOR
            log.warning("%s: connection lost; sending the %s again", side.name, what)
        if now >= deadline:
            raise e
        time.sleep(max(RESEND_EVERY, min(side.down_until - now, deadline - now)))
