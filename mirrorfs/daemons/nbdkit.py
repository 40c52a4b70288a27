"""The nbdkit process that serves the disk to clients, running mirrorfs's plugin.

nbdkit cannot listen on a unix socket and a TCP port at once from its command line, so mirrorfs binds
the listening sockets itself and hands them over with systemd-style socket activation (LISTEN_FDS):
permissions are set before anyone can connect, a busy path or port fails before anything starts, and
clients may connect the moment the sockets exist. The pidfile tells when the plugin is loaded and
connected to both sides. TLS and the export-name check are nbdkit's own (see mirrorfs/system/access.py).
"""

import fcntl
import os
import re
import signal
from pathlib import Path

from mirrorfs.system.access import EXPORT_PARAMS, Access
from mirrorfs.datapath import NBDKIT_SCRIPT
from mirrorfs.system.children import Child

FIRST_LISTEN_FD = 3

# nbdkit's python plugin prints a traceback for every request a callback fails; mirrorfs has already
# logged that failure in one line (side, offset, length, error), so the relay leaves the traceback in
# the log file and out of the operator's terminal.
_REQUEST_TRACEBACK = re.compile(
    r"^nbdkit: python\.\d+: error: .*: (pread|pwrite|zero|trim|flush|cache|extents): error: ")


class OperatorLines:
    """Picks the lines of nbdkit's log worth showing live: all but per-request tracebacks. Keeps its
    state between calls, as a traceback may arrive in two pieces."""

    def __init__(self):
        self._skipping = False

    def __call__(self, lines):
        shown = []
        for line in lines:
            if _REQUEST_TRACEBACK.match(line):
                self._skipping = True
            elif self._skipping and line[:1].isspace():
                pass                # a traceback's continuation lines are indented
            else:
                self._skipping = False
                shown.append(line)
        return shown


def _activation(fds, pythonpath):
    """Runs in the child between fork and exec: move the listening sockets to fds 3, 4, ... and set
    LISTEN_PID to the child's own pid, which exec keeps. The environment is changed here, in the child,
    because only here is that pid known."""
    def setup():
        temps = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
        for i, tmp in enumerate(temps):
            os.dup2(tmp, FIRST_LISTEN_FD + i, inheritable=True)
            os.close(tmp)
        os.environ["LISTEN_FDS"] = str(len(fds))
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["PYTHONPATH"] = pythonpath
    return setup


class Nbdkit(Child):
    """nbdkit with the mirrorfs plugin, serving on the given listening sockets."""

    def __init__(self, rundir, listeners, params, readonly=False, threads=16, access=None):
        """`access`: TLS and export-name options (mirrorfs.system.access.Access); default: no TLS."""
        rundir = Path(rundir)
        pidfile = rundir / "nbdkit.pid"
        access = access or Access()
        argv = ["nbdkit", "--foreground", "--pidfile", pidfile,
                "--threads", threads, *access.nbdkit_options()]
        if readonly:
            argv.append("--readonly")
        # parent=: the data path makes SIGKILL nbdkit's death signal again once nbdkit has set its
        # own, and checks that we are still its parent (mirrorfs/datapath/nbdkit/lifeline.py).
        params = {**params, "parent": os.getpid()}
        argv += ["python", NBDKIT_SCRIPT] + [f"{k}={v}" for k, v in params.items()] + EXPORT_PARAMS
        # nbdkit's embedded interpreter is /usr/bin/python3, not our venv: show it where we live.
        pythonpath = os.pathsep.join(
            p for p in (os.fspath(NBDKIT_SCRIPT.parents[3]), os.environ.get("PYTHONPATH")) if p)
        # If the supervisor dies, nbdkit gets SIGKILL, not SIGTERM: on SIGTERM nbdkit 1.32 answers
        # the requests it holds with ESHUTDOWN, which a reconnecting client (QEMU's reconnect-delay)
        # passes on to its guest instead of sending them again; and with an idle client connected
        # it does not exit at all (then the restarted supervisor finds the socket "in use").
        # Killed, it answers nothing, and the restart serves what the clients send again. A write
        # that reached one side only is covered by the write intent (with a state directory).
        # nbdkit 1.32 sets that kernel hook to SIGTERM itself at start-up (without being asked:
        # no --exit-with-parent here), so the data path sets SIGKILL again in its after_fork; the
        # one here covers the exec until nbdkit's own.
        super().__init__("nbdkit", argv, rundir / "nbdkit.log", pidfile=pidfile,
                         child_setup=_activation([s.fileno() for s in listeners], pythonpath),
                         pdeathsig=signal.SIGKILL)
