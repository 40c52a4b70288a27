"""systemd's readiness protocol (sd_notify), for `Type=notify` units: READY=1 once clients can
connect, STATUS= lines as the phase changes, STOPPING=1 when a stop begins.

Each message is one datagram to the unix socket named by $NOTIFY_SOCKET (a path, or "@name" for the
abstract namespace). Without that variable (not run by systemd) every call does nothing. A failure
to send is not an error of the disk's: it is ignored, as sd_notify(3) callers do.
"""

import os
import socket


def send(**fields):
    """Send `KEY=value` lines in one datagram; returns whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, address)
    except OSError:
        return False
    return True


def ready(status):
    return send(ready=1, status=status, mainpid=os.getpid())


def status(text):
    return send(status=text)


def stopping():
    return send(stopping=1, status="stopping")
