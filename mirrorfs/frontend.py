"""The nbdkit process that serves the disk to clients, running mirrorfs's plugin.

nbdkit cannot listen on a unix socket and a TCP port at once from its command line, so mirrorfs binds
the listening sockets itself and hands them over with systemd-style socket activation (LISTEN_FDS):
permissions are set before anyone can connect, a busy path or port fails before anything starts, and
clients may connect the moment the sockets exist. The pidfile tells when the plugin is loaded and
connected to both sides.
"""

import fcntl
import os
from pathlib import Path

import mirrorfs
from mirrorfs.processes import Child

PLUGIN = Path(mirrorfs.__file__).resolve().parent.parent / "plugin" / "mirrorfs_nbdkit.py"
FIRST_LISTEN_FD = 3


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

    def __init__(self, rundir, listeners, params, readonly=False, threads=16):
        rundir = Path(rundir)
        pidfile = rundir / "nbdkit.pid"
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "--pidfile", pidfile,
                "--threads", threads]
        if readonly:
            argv.append("--readonly")
        argv += ["python", PLUGIN] + [f"{k}={v}" for k, v in params.items()]
        # nbdkit's embedded interpreter is /usr/bin/python3, not our venv: show it where we live.
        pythonpath = os.pathsep.join(
            p for p in (os.fspath(PLUGIN.parent.parent), os.environ.get("PYTHONPATH")) if p)
        super().__init__("nbdkit", argv, rundir / "nbdkit.log", pidfile=pidfile,
                         child_setup=_activation([s.fileno() for s in listeners], pythonpath))
