"""A tiny JSON-lines protocol over unix sockets, for mirrorfs's control sockets.

One request per line, a JSON object with a "cmd"; one reply per line: {"ok": true, ...} or
{"ok": false, "error": "..."}. A handler may instead return an iterator, whose items are sent as
lines until it ends or the client goes away (used for event streams). A reply may carry open file
descriptors (a listening socket handed from one mirrorfs process to another): the handler puts them
under "_fds", and they travel with the reply line as SCM_RIGHTS; `call_with_fds` receives them.

Used in two places: the data path's socket inside nbdkit (standard library only) and the public
control socket of `mirrorfs start`.
"""

import json
import logging
import os
import socket
import stat
import threading

MAX_LINE = 64 * 1024

log = logging.getLogger("mirrorfs")


class ControlError(Exception):
    """The other end refused a request (its words are the message), could not be reached, or
    answered something that is not this protocol.

    The protocol's own exception, and the whole of common's tree. Both processes run this module
    (the data path's control socket inside nbdkit, every control socket of the supervisor), so the
    class can sit under neither process's root: common imports nothing above it, and the data path
    never imports the supervisor's tree. Like libnbd's nbd.Error, it is converted where it crosses
    into a process, and both trees draw where:
    - a request handler raises it as its refusal, which `Server` sends as {"ok": false, "error"};
    - a caller of `call`, `call_with_fds` or `stream` turns it into its own tree's class: the data
      path into SwitchRefused (mirrorfs.datapath.errors), the supervisor into an Error
      (mirrorfs.errors: the data path's socket in daemons.tree.ProcessTree.datapath, the others
      where they are asked).
    """


class Server:
    """Serves `handler(request) -> dict | iterator` on an already listening unix socket."""

    def __init__(self, sock, handler, name="control"):
        self.sock = sock
        self.handler = handler
        self.name = name
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self):
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name} client",
                             daemon=True).start()

    def _serve(self, conn):
        try:
            with conn, conn.makefile("rwb") as f:
                self._converse(conn, f)
        except (BrokenPipeError, ConnectionResetError):
            pass                # the client went away (an `events` follower that stopped, say)

    def _converse(self, conn, f):
        while True:
            line = f.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                _send(f, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                return
            try:
                request = json.loads(line, parse_constant=_refuse_constant)
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ValueError("expected a JSON object with a \"cmd\" string")
            except ValueError as e:
                _send(f, {"ok": False, "error": f"bad request: {e}"})
                continue
            try:
                reply = self.handler(request)
                if isinstance(reply, dict):
                    fds = reply.pop("_fds", None)
                    if fds:
                        f.flush()
                        line = json.dumps({"ok": True, **reply}).encode() + b"\n"
                        socket.send_fds(conn, [line], fds)
                    else:
                        _send(f, {"ok": True, **reply})
                    continue
                for item in reply:
                    _send(f, {"ok": True, **item})
                return
            except ControlError as e:
                _send(f, {"ok": False, "error": str(e)})
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as e:     # a bug: say so, keep serving
                log.exception("control request %r failed", request.get("cmd"))
                _send(f, {"ok": False, "error": f"internal error: {e}"})


def _refuse_constant(name):
    """JSON has no Infinity or NaN; Python's parser accepts them unless told otherwise."""
    raise ValueError(f"{name} is not a number this protocol accepts")


def _send(f, message):
    f.write(json.dumps(message).encode() + b"\n")
    f.flush()


# What an NBD server says first, before any request (the newstyle handshake): a client pointed at
# a disk's socket instead of its control socket reads this, not a reply.
NBD_GREETING = b"NBDMAGIC"


def _connect(path, timeout):
    """A connection to the control socket at `path`; anything else there is named for what it
    is: nothing, something that is not a socket, a socket nobody listens on."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path} (is mirrorfs running?)") from None
    except OSError as e:
        raise ControlError(f"cannot use {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} is not a socket but {_file_kind(mode)}: give the control "
                           "socket that mirrorfs printed ('control PATH')")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
    except ConnectionRefusedError:
        s.close()
        raise ControlError(f"nothing listens on {path} (the mirrorfs that made it is not "
                           "running)") from None
    except OSError as e:
        s.close()
        raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
    return s


def _file_kind(mode):
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a device or fifo"


def _reply(path, data):
    """One reply line, parsed; what is not mirrorfs's protocol is named for what it is."""
    if data.startswith(NBD_GREETING):
        ctl = f"{path}.ctl"
        hint = f"use {ctl}" if os.path.exists(ctl) else f"its control socket is usually {ctl}"
        raise ControlError(f"{path} is an NBD socket (a disk's), not a control socket: {hint}")
    try:
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ValueError("not an object")
    except ValueError:
        raise ControlError(f"{path} answered something that is not a mirrorfs control reply: "
                           f"{bytes(data[:40])!r}") from None
    return reply


def call(path, request, timeout=60.0):
    """Send one request and return its reply; a refusal raises ControlError with the reason."""
    for reply in stream(path, request, timeout):
        return reply
    raise ControlError(f"{path}: no reply")


def call_with_fds(path, request, timeout=60.0, max_fds=4):
    """Send one request; return (reply, fds): the file descriptors that came with the reply (the
    caller owns them). A refusal raises ControlError with the reason."""
    with _connect(path, timeout) as s:
        try:
            _request(s, path, request)
            data, fds, _, _ = socket.recv_fds(s, MAX_LINE, max_fds)
            while data and not data.endswith(b"\n"):
                more = s.recv(MAX_LINE)
                if not more:
                    break
                data += more
        except socket.timeout:
            raise ControlError(f"{path}: no reply after {timeout}s") from None
        except (ConnectionResetError, BrokenPipeError):
            raise ControlError(f"{path}: connection lost") from None
    if not data:
        raise ControlError(f"{path}: no reply")
    try:
        reply = _reply(path, data)
    except ControlError:
        for fd in fds:
            os.close(fd)
        raise
    if not reply.pop("ok", False):
        for fd in fds:
            os.close(fd)
        raise ControlError(reply.get("error", "request refused"))
    return reply, fds


def stream(path, request, timeout=None):
    """Send one request and yield every reply line (for event streams)."""
    with _connect(path, timeout) as s:
        try:
            _request(s, path, request)
            with s.makefile("rb") as f:
                for line in f:
                    reply = _reply(path, line)
                    if not reply.pop("ok", False):
                        raise ControlError(reply.get("error", "request refused"))
                    yield reply
        except socket.timeout:
            raise ControlError(f"{path}: no reply after {timeout}s") from None
        except (ConnectionResetError, BrokenPipeError):
            raise ControlError(f"{path}: connection lost") from None


def _request(s, path, request):
    """Send `request`, then look at the first bytes of the answer without taking them: an NBD
    server greets every client at once and hangs up on a JSON line, so what it said must be seen
    before the hang-up turns it into "connection lost"."""
    try:
        s.sendall(json.dumps(request).encode() + b"\n")
    except (ConnectionResetError, BrokenPipeError):
        _refuse_nbd(s, path, socket.MSG_DONTWAIT)
        raise
    _refuse_nbd(s, path)


def _refuse_nbd(s, path, flags=0):
    try:
        first = s.recv(len(NBD_GREETING), socket.MSG_PEEK | flags)
    except (BlockingIOError, ConnectionResetError, BrokenPipeError):
        return
    if first and NBD_GREETING.startswith(first):
        _reply(path, NBD_GREETING)
