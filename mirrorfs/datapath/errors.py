"""The data path's exception tree: one root, and the difference between a side's failure and a
client's.

    DataPathError
    ├── SideError           a side failed a command; `errno` and `reason` say how
    │   ├── SideUnreachable     no connection to it: connect failed, backing off, closed
    │   ├── ConnectionLost      the connection went away under the command (it may have run or not)
    │   └── SideRefused         the side answered the command with an error (ENOSPC, EIO, ENOTSUP...)
    ├── RequestError        what the client's request gets: `errno` (mirrorfs.datapath.mirror.disk decides)
    ├── SwitchRefused       a switch that must not happen; nothing changed
    ├── DrainTimeout        requests still in flight when a pause gave up
    ├── CopyFailed          a copier chunk failed; it is tried again
    └── StateError          a state directory that cannot be used

The backends raise only SideError (never libnbd's nbd.Error): `Disk` and the copier decide what a
side's failure means for the client from its class alone. SideUnreachable and ConnectionLost are the
failures worth sending the command again for (see disk.RESEND_FOR); SideRefused is the side's answer.

The supervisor has its own tree (mirrorfs.errors); it turns a SideUnreachable from the one connect
path (backend.open_handle) into its BackendError.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import errno

# The errnos of a command that mean the connection went away, rather than the side refusing it.
CONNECTION_LOST = frozenset({errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE,
                             errno.ECONNREFUSED, errno.ECONNABORTED})


class DataPathError(Exception):
    """The root of every exception the data path raises on purpose."""


class SideError(DataPathError):
    """A side failed a command. `errno` is a number (what the client would get for it), `reason`
    the side's own words, without the side's name (str() of the exception is the whole message)."""

    lost = False                        # the connection is gone: worth sending again
    # When the connection the command failed on was made (time.monotonic(); 0: unknown). A
    # command sent again after a loss that loses a connection made after that loss too is not
    # unlucky: the server drops connections on it (see lost_again).
    connected_at = 0.0

    def __init__(self, message, err=errno.EIO, reason=None):
        super().__init__(message)
        self.errno = err
        self.reason = reason or message


class SideUnreachable(SideError):
    """No connection to the side: a connect failed or timed out, the side is backing off after one,
    or it was closed."""

    lost = True


class ConnectionLost(SideError):
    """The connection died under the command."""

    lost = True


class SideRefused(SideError):
    """The side answered the command with an error."""


def lost_again(e, since):
    """Whether `e`, the failure of a command sent again after it lost its connection at `since`,
    lost a connection made after that too: the server drops connections on this command
    (qemu-storage-daemon 7.2 does on a read its image fails: "Disconnect client, due to: Failed to
    send reply"). Sending it again would only repeat that for RESEND_FOR; the command fails now."""
    return e.lost and e.connected_at > since


def side_error(err, reason):
    """The SideError for a command that failed with errno number `err` and `reason`."""
    return (ConnectionLost if err in CONNECTION_LOST else SideRefused)(reason, err)


class RequestError(DataPathError):
    """A client's request failed; `errno` is what the client gets: for a lost connection, EIO
    (NBD has no ENOTCONN and friends, and nbdkit sends them as EINVAL, "you asked wrong")."""

    def __init__(self, err, message):
        super().__init__(message)
        self.errno = errno.EIO if err in CONNECTION_LOST else err


class SwitchRefused(DataPathError):
    """A switch that must not happen: another one runs or already happened, the sides may still
    differ, or the destination does not answer. Nothing changed."""


class DrainTimeout(DataPathError):
    """Requests still in flight when a pause (a switch, quiesce) gave up waiting for them."""


class CopyFailed(DataPathError):
    """A copier chunk failed on either side; it is copied again later."""


class StateError(DataPathError):
    """A state directory that cannot be used: corrupt, foreign, or unreadable."""
