"""How long a side's lost connection is waited for, and how large a payload-free change may be: one
rule for every caller that sends a command to a side (the mirror's disk, the evacuation's side I/O).

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

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
