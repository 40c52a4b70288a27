"""The data path's exception tree: one root, drawn here, where every class of it is defined.

    DataPathError
    ├── SideError           a side failed a command; `errno` and `reason` say how
    │   ├── SideUnreachable     no connection to it: connect failed, backing off, closed
    │   ├── ConnectionLost      the connection went away under the command (it may have run or not)
    │   ├── SideRefused         the side answered the command with an error (ENOSPC, EIO, ENOTSUP...)
    │   └── SideFailure         the same failure placed (sides.sideio, sides.copy): the side, the
    │                           operation and the range of the disk named, after any resend;
    │                           `cause` the backend's SideError, whose errno, `lost` and
    │                           `connected_at` it keeps
    ├── RequestError        what the client's request gets: `errno` (mirrorfs.datapath.mirror.disk decides)
    ├── SwitchRefused       a switch that must not happen; nothing changed
    ├── DrainTimeout        requests still in flight when a pause gave up
    ├── CopyFailed          a copier chunk failed; it is tried again
    │   └── Stopped             the copier stopped while a chunk waited for its rate: not copied
    ├── HydrationError      an evacuation's hydration map that cannot be used (corrupt, another
    │                       disk's), or a commit whose flush or save failed
    └── StateError          a state directory that cannot be used

Every class is defined in this module (tests/unit/test_core.py checks that no other module of the
data path defines one, and that each is drawn above); the modules that raise them re-export the
names they always offered (`sideio.SideFailure`, `hydration.HydrationError`, `copier.Stopped`).

The backends raise only SideError (never libnbd's nbd.Error): `Disk` and the copier decide what a
side's failure means for the client from its class alone. SideUnreachable and ConnectionLost are the
failures worth sending the command again for (see disk.RESEND_FOR); SideRefused is the side's answer.

Outside the tree, on purpose, are the exceptions of what the process shares with others, each
converted where it comes in: libnbd's `nbd.Error` (the sides turn it into a SideError), and
`mirrorfs.common.jsonlines.ControlError`, the control protocol's own (common's tree, drawn there).
The data path raises a ControlError only into its control server, as the refusal the supervisor
reads (nbdkit.service's handler), and takes one only from its one client call, the switch's
commit (nbdkit.service._committer), which turns it into SwitchRefused at once.

The supervisor has its own tree (mirrorfs.errors); it turns a SideUnreachable from the one connect
path (backend.open_handle) into its BackendError, and a StateError into its UsageError.

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


class SideFailure(SideError):
    """A side's failure, placed: the side refused a request of the disk, or lost its connection
    for longer than a resend waits. Not a new kind of failure, the backend's SideError (`cause`)
    with where it happened: `side` (the backend; its `name` starts the message), `op`, `offset`,
    `length`. It stays a SideError (the same errno, `lost`, `connected_at`); the one conversion is
    to what the client gets, a RequestError, where the client's errno is decided
    (evacuation.evacuee's `_refused`, the copier's and the service's handlers)."""

    def __init__(self, side, op, offset, length, exc):
        super().__init__(f"{side.name} {op} at {offset} length {length}: {exc}", exc.errno,
                         exc.reason)
        self.side, self.op, self.offset, self.length, self.cause = side, op, offset, length, exc
        self.lost, self.connected_at = exc.lost, exc.connected_at


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


class Stopped(CopyFailed):
    """The copier was stopped while a chunk waited for its rate: the chunk was not copied."""


class HydrationError(DataPathError):
    """A map that cannot be used (corrupt, another disk's), or a commit whose flush or save failed."""


class StateError(DataPathError):
    """A state directory that cannot be used: corrupt, foreign, or unreadable."""
