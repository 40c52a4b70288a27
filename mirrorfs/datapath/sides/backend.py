"""One side of the mirror: an NBD export reached with libnbd, its capabilities, and its verbs.

The verbs are every backend's (mirrorfs.datapath.sides.memory has the same): by offset, `pread`, `pwrite`,
`zero`, `trim`, `flush`, `cache`, `extents`; for the hot path, a command
(mirrorfs.datapath.sides.commands) is `run` synchronously or `start`ed, returning a `Pending` to `wait()`
for; `run_all` puts several on one connection at once (the copier's chunk); `reserve` sets a
connection aside for a `run` or `start` to come (a request that needs both sides at once takes their
connections in one order). Each verb borrows a connection from the pool and gives it back, and turns
libnbd's failures into SideError (mirrorfs.datapath.errors): ConnectionLost when the connection went
away, SideRefused when the server answered with an error, SideUnreachable when there is no
connection to be had. No caller touches a libnbd handle.

A libnbd handle serializes the commands of whoever drives it, so a backend keeps a pool of handles and
lends one to each request: requests on different nbdkit threads run in parallel on different
connections. That is only correct if a flush on one connection covers writes completed on the others,
which is what the server's multi-conn flag promises; without it the pool holds a single handle.

The pool is bounded (MAX_HANDLES): when every handle is lent, a request waits for one to come back
instead of opening another connection. Clients bring nbdkit threads (16 per connection), not storage
capacity: qemu-storage-daemon serves all its connections from one thread, and with more than ~100
connections opening at once its handshakes fell behind the connect timeout, so client writes failed
and, the source missing a write the destination had, the sides differed. 32 handles keep one client's
16 threads and the copier fully parallel; beyond that, requests queue.

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import errno
import logging
import os
import select
import socket
import threading
import time
from functools import partial

import nbd

from mirrorfs.datapath.sides.commands import Verbs
from mirrorfs.datapath.errors import SideError, SideUnreachable, side_error

# QEMU's metadata context saying which layer of a chain holds each byte (Backend.allocation_depth).
ALLOCATION_DEPTH = "qemu:allocation-depth"

log = logging.getLogger("mirrorfs")

POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
# After a failed connect, wait this long before trying again, doubling up to the maximum: a dead
# destination must not cost every request a connect timeout.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# How long a connect may take, here and in the supervisor's probe (mirrorfs.sides.endpoints): a server
# that accepts but never finishes the handshake (a stopped process) is given up on after this.
CONNECT_TIMEOUT = 10.0
# Connections per side at most (see the module docstring).
MAX_HANDLES = 32
# Reads up to this size are copied out of libnbd's reply; larger ones land in the caller's buffer
# directly.
COPY_READ_MAX = 256 * 1024


def error_errno(exc, default=errno.EIO):
    """The errno number to give the client for a libnbd error (whose .errno is the errno's *name*,
    like "EIO", in this libnbd)."""
    value = getattr(exc, "errno", None)
    if isinstance(value, str):
        value = getattr(errno, value, None)
    return value or default


def describe(exc):
    if isinstance(exc, nbd.Error):
        return exc.string.removeprefix("nbd_") if exc.string else f"errno {exc.errno}"
    return str(exc)


def _side_error(exc, h=None):
    """The SideError for libnbd's failure of a command (on handle `h`, if known)."""
    e = side_error(error_errno(exc), describe(exc))
    if h is not None:
        e.connected_at = getattr(h, "connected_at", 0.0)
    return e


class NbdBackend(Verbs):
    def __init__(self, uri, name):
        self.uri = uri
        self.name = name
        self.connect_timeout = CONNECT_TIMEOUT
        self._lock = threading.Lock()
        first = self._connect()
        self.size = first.get_size()
        self.read_only = first.is_read_only()
        self.multi_conn = first.can_multi_conn()
        self.can_flush = first.can_flush()
        self.can_fua = first.can_fua()
        self.can_trim = first.can_trim()
        self.can_zero = first.can_zero()
        self.can_fast_zero = first.can_fast_zero()
        self.can_cache = first.can_cache()
        self.is_rotational = first.is_rotational()
        self.can_extents = first.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        self.block_size = tuple(first.get_block_size(k) for k in
                                (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
        self._idle = [first]
        self._handles = {first}
        # Without multi-conn, one connection is the only correct choice (see the module docstring).
        self.max_handles = MAX_HANDLES if self.multi_conn else 1
        self._opening = 0               # connects under way: they count towards max_handles
        self._waiters = 0               # requests waiting for a handle (read without the lock)
        self._freed = threading.Condition(self._lock)
        self._closed = False
        self._busy = {}                 # handle -> when it was lent: see expire()
        self.timeouts = 0
        self.down_until = 0.0           # monotonic time before which we do not try to connect
        self._backoff = BACKOFF_FIRST
        self._failed_at = 0.0           # when the last wave of connects failed (monotonic)

    @property
    def available(self):
        return time.monotonic() >= self.down_until

    def _connect(self):
        h = open_handle(self.uri, self.name, timeout=self.connect_timeout)
        h.connection_fd = h.aio_get_fd()
        h.connected_at = time.monotonic()   # see SideError.connected_at
        return h

    def _connect_with_backoff(self):
        now = time.monotonic()
        if now < self.down_until:
            raise SideUnreachable(f"{self.name}: unavailable, next attempt in "
                                  f"{self.down_until - now:.1f}s")
        try:
            h = self._connect()
        except SideUnreachable:
            # One wave of attempts backs off once: requests that were connecting at the same
            # time (40 writes to a stopped server) fail together, and doubling for each of them
            # took the wait to BACKOFF_MAX within a second of a two-second stall.
            if now >= self._failed_at:
                self._failed_at = time.monotonic()
                self.down_until = self._failed_at + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            raise
        self._backoff = BACKOFF_FIRST
        return h

    def _acquire(self):
        """Lend a handle to a verb, which must `_release()` it. Waits while every handle allowed
        is lent."""
        if self._closed:
            raise SideUnreachable(f"{self.name}: closed")
        try:
            h = self._idle.pop()           # list.pop/append are atomic under the GIL
        except IndexError:
            h = self._acquire_slow()
        self._busy[h] = time.monotonic()
        return h

    def _acquire_slow(self):
        """No idle handle: connect a new one if the pool may grow, else wait for one to come back.

        No wakeup is lost although _release() appends without the lock: a waiter counts itself in
        `_waiters` *before* it looks at the idle list, and _release() looks at `_waiters` *after* it
        appended, so either the waiter sees the handle or _release() sees the waiter and notifies
        (under the lock, which the waiter holds until it waits)."""
        with self._lock:
            self._waiters += 1
            try:
                while True:
                    if self._closed:
                        raise SideUnreachable(f"{self.name}: closed")
                    try:
                        return self._idle.pop()
                    except IndexError:
                        pass
                    if len(self._handles) + self._opening < self.max_handles:
                        self._opening += 1
                        break
                    self._freed.wait()
            finally:
                self._waiters -= 1
        try:
            h = self._connect_with_backoff()
        except BaseException:
            with self._lock:
                self._opening -= 1
                self._freed.notify()        # the slot is free again: a waiter may try
            raise
        with self._lock:
            self._opening -= 1
            self._handles.add(h)
        return h

    def _release(self, h, failed=False):
        """Give a handle back. After a failure (`failed`), a handle whose connection died is dropped
        and the next request reconnects. The connection is only examined then: every libnbd call
        releases and retakes the GIL, which is what a small request pays most for."""
        self._busy.pop(h, None)
        if self._closed or (failed and (h.aio_is_dead() or h.aio_is_closed())):
            with self._lock:
                self._handles.discard(h)
                self._freed.notify()        # a slot for a new connection
            _close_quietly(h)
        else:
            self._idle.append(h)
            if self._waiters:
                with self._lock:
                    self._freed.notify()

    def oldest_wait(self):
        """How long the longest-waiting request lent a handle has waited, in seconds."""
        lent = list(self._busy.values())
        return time.monotonic() - min(lent) if lent else 0.0

    def expire(self, timeout):
        """Cut the connection of every handle lent for `timeout` seconds or more: a side that
        stops answering (a hung server, a stalled network) would otherwise hold its requests, and
        the client's, forever. shutdown(2) makes the blocked libnbd call fail at once; the request
        then fails on this side like any other error (and the degrade policy records it).

        Returns the seconds until the next handle lent now would be due, so the caller can sleep
        exactly that long (at most `timeout`: a handle lent after this call is due later)."""
        now = time.monotonic()
        due = timeout
        for h, since in list(self._busy.items()):
            if now - since < timeout:
                due = min(due, since + timeout - now)
            else:
                try:
                    # The fd saved at connect: libnbd's own calls would wait for the handle's lock,
                    # which the stuck request holds. Holding `h` keeps the fd open meanwhile.
                    sock = socket.socket(fileno=os.dup(h.connection_fd))
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    finally:
                        sock.close()
                except (nbd.Error, OSError):
                    continue
                self._busy.pop(h, None)
                self.timeouts += 1
                log.error("%s: no answer for %.1f s, connection cut", self.name, now - since)
        return due

    def cache(self, length, offset):
        h = self._acquire()
        failed = True
        try:
            h.cache(length, offset)
            failed = False
        except nbd.Error as e:
            raise _side_error(e) from None
        finally:
            self._release(h, failed)

    def extents(self, length, offset, req_one=False):
        """[(offset, length, flags)] from `offset` on (base:allocation; flags as nbd.STATE_*)."""
        found = []

        def collect(context, start, entries, err):
            if context == nbd.CONTEXT_BASE_ALLOCATION:
                pos = start
                for i in range(0, len(entries), 2):
                    found.append((pos, entries[i], entries[i + 1] & 3))
                    pos += entries[i]
            return 0

        h = self._acquire()
        failed = True
        try:
            h.block_status(length, offset, collect, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
            failed = False
        except nbd.Error as e:
            raise _side_error(e) from None
        finally:
            self._release(h, failed)
        return found

    def allocation_depth(self, length, offset):
        """[(offset, length, depth)] over [offset, offset + length) from QEMU's
        qemu:allocation-depth context: 1 where the export's own image holds the bytes, 2 or more
        where a backing layer does, 0 where none does. On a connection of its own, opened for the
        question and closed after it: only the rare path asks (Evacuee: a write in place that
        failed because the source could not be read), and the pool's connections stay as they
        are. Raises SideError (SideRefused ENOTSUP if the export does not offer the context)."""
        h = open_handle(self.uri, self.name, timeout=self.connect_timeout, allocation=False,
                        contexts=(ALLOCATION_DEPTH,))
        found = []

        def collect(context, start, entries, err):
            if context == ALLOCATION_DEPTH:
                pos = start
                for i in range(0, len(entries), 2):
                    found.append((pos, entries[i], entries[i + 1]))
                    pos += entries[i]
            return 0

        try:
            if not h.can_meta_context(ALLOCATION_DEPTH):
                raise side_error(errno.ENOTSUP, f"{self.name}: no {ALLOCATION_DEPTH} context")
            pos, end = offset, offset + length
            while pos < end:
                before = len(found)
                h.block_status(end - pos, pos, collect)
                if len(found) == before:
                    raise side_error(errno.EIO, f"{self.name}: empty block status at {pos}")
                pos = found[-1][0] + found[-1][1]
        except nbd.Error as e:
            raise _side_error(e) from None
        finally:
            _close_quietly(h)
        return [(a, min(n, end - a), d) for a, n, d in found if a < end]

    # Commands (mirrorfs.datapath.sides.commands): the forms the hot path needs.

    # reserve(): set a connection aside for the next `run` or `start` (pass it as `reserved`),
    # which gives it back. A caller that needs a connection of several sides at once reserves them
    # in one fixed order before using any: the pools are bounded, and two requests that took them
    # in different orders could each hold one the other waits for, forever. (An alias: one Python
    # call less per side and request.)
    reserve = _acquire

    def run(self, cmd, reserved=None):
        """Run `cmd` and wait for it: one libnbd call."""
        h = self._acquire() if reserved is None else reserved
        failed = True
        try:
            _RUN[cmd.op](h, cmd)
            failed = False
        except nbd.Error as e:
            raise _side_error(e, h) from None
        finally:
            self._release(h, failed)

    def start(self, cmd, reserved=None):
        """Start `cmd` (libnbd aio) and return its Pending, which holds the connection until
        `wait()`ed for: every start must be waited for."""
        h = self._acquire() if reserved is None else reserved
        try:
            return Pending(self, h, _START[cmd.op](h, cmd))
        except nbd.Error as e:
            self._release(h, True)
            raise _side_error(e) from None
        except BaseException:
            self._release(h, True)
            raise

    def run_all(self, cmds):
        """Run `cmds` at once on one connection, so the side sees a queue rather than one command
        at a time, and wait for every one (also after a failure: see drive). Raises the first
        failure."""
        failures = [r for r in self.run_each(cmds) if r is not None]
        if failures:
            raise failures[0]

    def run_each(self, cmds):
        """Run `cmds` at once on one connection, as `run_all`, but return the outcome of each: None
        or its SideError (the lag's batches, datapath.mirror.lag: one failure must not hide which
        commands succeeded)."""
        h = self._acquire()
        results = []
        try:
            answers, error = Answers(len(cmds)), None
            for i, cmd in enumerate(cmds):
                try:
                    _START[cmd.op](h, cmd, partial(answers.record, i))
                except nbd.Error as e:
                    error = _side_error(e)      # the rest is not started: each fails with it
                    answers.expected = i
                    break
            results = [None if r is None else _side_error(r) for r in drive_answers(h, answers)]
            results += [error] * (len(cmds) - len(results))
        finally:
            self._release(h, len(results) < len(cmds) or any(results))
        return results

    def retire(self):
        """No longer used (after a switch, on exit): flush what it holds, then disconnect. Callers
        must have drained their requests first. A failing flush is reported, not raised: the
        side is being let go either way."""
        try:
            self.flush()
        except SideError as e:
            log.error("%s: flush before release failed: %s", self.name, describe(e))
        self.close()

    def check(self, timeout):
        """Prove the side answers, on every connection it will use (a flush each, or a one-byte
        read where flush is not offered), within `timeout` seconds. Callers must have drained their
        requests (a switch does this under its pause). Raises SideUnreachable naming the problem; a
        connection that failed or did not answer in time is dropped."""
        handles = list(self._idle)
        if not handles:
            handles = [self._acquire()]
            self._release(handles[0])
        commands = []
        for h in handles:
            try:
                commands.append((h, h.aio_flush() if self.can_flush else h.aio_pread(1, 0)))
            except nbd.Error as e:
                self._drop(h)
                raise SideUnreachable(f"{self.name}: {describe(e)}") from None
        results = drive(commands, deadline=time.monotonic() + timeout)
        failed = [(h, r) for (h, _), r in zip(commands, results) if r is not None]
        for h, _ in failed:
            self._drop(h)
        if failed:
            problem = failed[0][1]
            reason = (f"no answer after {timeout:g}s" if isinstance(problem, TimeoutError)
                      else describe(problem))
            raise SideUnreachable(f"{self.name}: {reason}")

    def _drop(self, h):
        with self._lock:
            self._handles.discard(h)
            self._freed.notify()            # a slot for a new connection
        try:
            self._idle.remove(h)
        except ValueError:
            pass
        _close_quietly(h)

    def close(self):
        """Disconnect every handle. Callers must have drained their requests first."""
        self._closed = True
        with self._lock:
            handles, self._handles = self._handles, set()
            self._freed.notify_all()        # waiters see `_closed` and give up
        self._idle.clear()
        for h in handles:
            _close_quietly(h)


class Pending:
    """A command started on one of `backend`'s connections, which it holds until `wait()`."""

    __slots__ = ("backend", "handle", "cookie")

    def __init__(self, backend, handle, cookie):
        self.backend, self.handle, self.cookie = backend, handle, cookie

    def wait(self):
        """Wait for the command; give the connection back; raise SideError if it failed."""
        h = self.handle
        try:
            while not h.aio_command_completed(self.cookie):
                h.poll(-1)
        except nbd.Error as e:
            self.backend._release(h, True)
            raise _side_error(e) from None
        except BaseException:
            self.backend._release(h, True)
            raise
        self.backend._release(h)


def wait_all(pendings):
    """Wait for every pending command, of any backend; returns None or the SideError of each. The
    commands of NbdBackends are driven by one poll loop (see drive), so a large write to one side
    never waits for another side's write to be sent."""
    results = [None] * len(pendings)
    ours = [i for i, p in enumerate(pendings) if type(p) is Pending]
    outcomes = drive([(pendings[i].handle, pendings[i].cookie) for i in ours])
    for i, outcome in zip(ours, outcomes):
        pendings[i].backend._release(pendings[i].handle, outcome is not None)
        if outcome is not None:
            results[i] = _side_error(outcome)
    for i, p in enumerate(pendings):
        if type(p) is not Pending:
            try:
                p.wait()
            except SideError as e:
                results[i] = e
    return results


# What each command is in libnbd: run (synchronous) and start (aio, returns the cookie).

FUA = nbd.CMD_FLAG_FUA


def _zero_flags(c):
    return ((0 if c.may_trim else nbd.CMD_FLAG_NO_HOLE) | (FUA if c.fua else 0)
            | (nbd.CMD_FLAG_FAST_ZERO if c.fast else 0))


def _run_read(h, c):
    if c.length <= COPY_READ_MAX:
        # One libnbd call (one GIL release) beats three, and copying a few KiB is cheap.
        c.buf[:] = h.pread(c.length, c.offset)
    else:
        # Large: let libnbd read straight into the caller's buffer.
        wait_one(h, h.aio_pread(c.buf, c.offset))


def _run_write(h, c):
    h.pwrite(c.buf, c.offset, flags=FUA if c.fua else 0)


# libnbd's aio calls take the caller's buffer itself (any buffer-like object, since 1.14: Debian
# 12's) and keep a view of it until the command is retired: no nbd.Buffer around it (four Python
# calls a command), and no copy.

def _start_read(h, c, completion=None):
    return h.aio_pread(c.buf, c.offset, completion)


def _start_write(h, c, completion=None):
    return h.aio_pwrite(c.buf, c.offset, completion, flags=FUA if c.fua else 0)


def _run_zero(h, c):
    h.zero(c.length, c.offset, flags=_zero_flags(c))


def _start_zero(h, c, completion=None):
    return h.aio_zero(c.length, c.offset, completion, flags=_zero_flags(c))


def _run_trim(h, c):
    h.trim(c.length, c.offset, flags=FUA if c.fua else 0)


def _start_trim(h, c, completion=None):
    return h.aio_trim(c.length, c.offset, completion, flags=FUA if c.fua else 0)


def _run_flush(h, c):
    h.flush()


def _start_flush(h, c, completion=None):
    return h.aio_flush(completion)


_RUN = {"read": _run_read, "write": _run_write, "zero": _run_zero, "trim": _run_trim,
        "flush": _run_flush}
_START = {"read": _start_read, "write": _start_write, "zero": _start_zero, "trim": _start_trim,
          "flush": _start_flush}


def open_handle(uri, name, timeout=CONNECT_TIMEOUT, allocation=True, contexts=()):
    """The one way mirrorfs connects to an NBD server: a libnbd handle connected to `uri` within
    `timeout` seconds (a server that accepts but never answers the handshake, a stopped process,
    would block a plain connect_uri forever). Raises SideUnreachable naming the side and the problem."""
    h = nbd.NBD()
    h.set_handle_name(name)
    h.set_uri_allow_local_file(True)   # tls-psk-file=, tls-certificates= in a URI the user gave
    if allocation:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    for context in contexts:
        h.add_meta_context(context)
    try:
        h.aio_connect_uri(uri)
        deadline = time.monotonic() + timeout
        while h.aio_is_connecting():
            if not _step(h, deadline):
                reason = f"no answer after {timeout:g}s"
                raise SideUnreachable(f"{name}: {uri}: {reason}", reason=reason)
        if not h.aio_is_ready():
            raise nbd.Error("connection failed", errno.ECONNREFUSED)
    except nbd.Error as e:
        reason = (e.string or str(e)).removeprefix("nbd_aio_connect_uri: ").removeprefix("nbd_")
        raise SideUnreachable(f"{name}: cannot connect to {uri}: {reason}", reason=reason) from None
    return h


def _events(h):
    direction = h.aio_get_direction()
    events = 0
    if direction & nbd.AIO_DIRECTION_READ:
        events |= select.POLLIN
    if direction & nbd.AIO_DIRECTION_WRITE:
        events |= select.POLLOUT
    return events


def _notify(h, revents):
    if revents & POLLIN:
        h.aio_notify_read()
    elif revents & select.POLLOUT:
        h.aio_notify_write()


def _step(h, deadline):
    """Wait for `h`'s socket once and let libnbd act on it; False if `deadline` passed first."""
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    poller = select.poll()
    poller.register(h.aio_get_fd(), _events(h))
    for _, revents in poller.poll(int(left * 1000) + 1):
        _notify(h, revents)
    return True


def _close_quietly(h):
    """Say goodbye to the server. The handle itself closes when its last reference goes (libnbd's
    Python binding closes in __del__ and has no close method in this version)."""
    try:
        h.shutdown()
    except nbd.Error:
        pass


def wait_one(h, cookie):
    """Drive `h` until `cookie` completes. Raises nbd.Error if the command failed."""
    while not h.aio_command_completed(cookie):
        h.poll(-1)


class Answers:
    """The outcomes of commands started with a completion callback (`record`, called by libnbd
    from inside `poll`, in the thread that drives the handle): a command so started is retired by
    libnbd as it completes, so no libnbd call asks about it afterwards (run_each)."""

    __slots__ = ("expected", "got", "codes")

    def __init__(self, expected):
        self.expected = expected        # commands started: fewer if one could not be
        self.got = 0
        self.codes = [None] * expected  # each command's errno (0: done), None until answered

    def record(self, i, error):
        """libnbd's completion callback (`error`: a ctypes int, the errno or 0); returning 1
        retires the command."""
        self.codes[i] = error.value
        self.got += 1
        return 1


def drive_answers(h, answers):
    """`drive` for commands on one handle that its caller alone holds (run_each: the lag's batches,
    the copier's chunks), started with `answers.record` as their completion callback: poll until
    every one answered. One libnbd call a poll and none a command (each call releases and retakes
    the GIL): `drive` asks every command after every poll, about n²/2 calls for a batch of n (10
    a write in the lag's batches of 16); asking each once after polls until nothing was in flight
    cost 4 calls a write; this costs 3 (the start, about one poll, and libnbd's call back into
    Python). Returns, as `drive`, None or the nbd.Error of each."""
    lost = None
    while answers.got < answers.expected:
        try:
            h.poll(-1)      # one libnbd call, the GIL released while it waits
        except nbd.Error as e:
            if h.aio_is_dead() or h.aio_is_closed():
                lost = e    # the connection died under the commands: see drive
                break
    results = []
    for code in answers.codes[:answers.expected]:
        if code is None:        # never answered: the connection's error
            results.append(lost or nbd.Error("command not completed", errno.ENOTCONN))
        else:
            results.append(None if code == 0 else nbd.Error(os.strerror(code), code))
    return results


def drive(commands, deadline=None):
    """Drive commands on one or several handles until all complete: the one loop for "these
    commands, to completion". `commands` is a list of (handle, cookie), several may share a handle;
    returns a list of None (success) or the nbd.Error of each. Every command is waited for even
    after another failed: a write still in flight after its range lock is released could land
    after a newer client write to the same bytes. With a `deadline` (time.monotonic()), commands
    still running then get a TimeoutError (their connection must then be dropped by the caller).

    The handles are polled together, so a large write to one side never waits for the other side's
    write to finish before it can be sent."""
    results = [None] * len(commands)
    pending = list(range(len(commands)))
    while True:
        still = []
        for i in pending:
            h, cookie = commands[i]
            try:
                if not h.aio_command_completed(cookie):
                    still.append(i)
            except nbd.Error as e:
                results[i] = e
        if not still:
            return results
        handles = {commands[i][0] for i in still}
        if len(handles) == 1 and deadline is None:
            (h,) = handles
            try:
                h.poll(-1)      # one libnbd call, the GIL released while it waits
            except nbd.Error as e:
                # The connection died under the commands (ECONNRESET): those libnbd has not
                # retired fail with its error; raised from here it would kill the caller's
                # thread (a copier's or the lag's worker) with commands still counted in flight.
                if h.aio_is_dead() or h.aio_is_closed():
                    for i in still:
                        results[i] = e
                    return results
            pending = still
            continue
        if deadline is not None and time.monotonic() >= deadline:
            for i in still:
                results[i] = TimeoutError()
            return results
        poller = select.poll()
        by_fd = {}
        for h in handles:
            fd = h.aio_get_fd()
            poller.register(fd, _events(h))
            by_fd[fd] = h
        wait = -1 if deadline is None else max(1, int((deadline - time.monotonic()) * 1000) + 1)
        for fd, revents in poller.poll(wait):
            try:
                _notify(by_fd[fd], revents)
            except nbd.Error:
                pass            # the command's own completion reports the failure
        pending = still
