"""Child processes that mirrorfs owns: started, watched until ready, and always stopped.

Every child:
- writes its stderr to a log file (an unread pipe could block it), whose tail becomes part of the error a
  user sees when the child fails;
- runs in its own session, so a Ctrl-C on the terminal reaches only us and we stop children in order;
- gets a signal from the kernel if we die (PR_SET_PDEATHSIG), so even `kill -9` of mirrorfs leaves no
  orphan: SIGTERM by default, which lets qemu-storage-daemon flush its qcow2 metadata on the way
  out; SIGKILL for nbdkit (see mirrorfs.daemons.nbdkit);
- is ready when its pidfile appears: both nbdkit and qemu-storage-daemon write it only after start-up
  succeeded, so there is no sleep and no polling of sockets. While waiting we check that it is alive and
  fail at once, with its log, if it died.
"""

import concurrent.futures
import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from mirrorfs.errors import ProcessError

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent_pid, child_setup, pdeathsig=signal.SIGTERM):
    """The preexec function of every child: see the module docstring."""
    def preexec():
        _libc.prctl(_PR_SET_PDEATHSIG, pdeathsig)
        # The parent may have died between fork and prctl; then nobody would ever signal us.
        if os.getppid() != parent_pid:
            os._exit(1)
        os.umask(0o077)
        if child_setup is not None:
            child_setup()
    return preexec


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Children
# started from a short-lived thread (a control request's) would be killed when it returns, so every
# child is forked by this one thread, which lives as long as the process.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")


def popen(argv, child_setup=None, pdeathsig=signal.SIGTERM, **kwargs):
    """subprocess.Popen with the guarantees of the module docstring (own session, `pdeathsig` when
    we die, umask 077), forked by the long-lived spawner thread.

    `pdeathsig=None`: a child meant to outlive us (the host service's storage daemons, which a
    restarted service adopts): own session and umask 077, no signal when we die."""
    if pdeathsig is None and child_setup is None:
        return subprocess.Popen(argv, start_new_session=True, umask=0o077, **kwargs)
    preexec = _die_with_parent(os.getpid(), child_setup, pdeathsig)
    return _spawner.submit(subprocess.Popen, argv, start_new_session=True, preexec_fn=preexec,
                           **kwargs).result()


class Child:
    """One child process. `start()` and `stop()` are safe to call more than once."""

    def __init__(self, name, argv, log_path, pidfile=None, pass_fds=(), child_setup=None,
                 pdeathsig=signal.SIGTERM, env=None):
        """`child_setup` runs in the child just before exec (after fork): for fd and environment
        set-up that needs the child's own pid. subprocess closes stray fds only *after* it runs, so
        with a `child_setup` we keep inheritable fds instead (Python opens every fd close-on-exec,
        so only those the setup made inheritable reach the child)."""
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.pidfile = Path(pidfile) if pidfile else None
        self.pass_fds = tuple(pass_fds)
        self.child_setup = child_setup
        self.pdeathsig = pdeathsig
        self.env = env                  # None: ours (an RBD side adds librados's timeouts)
        self.proc = None
        self.stopping = False           # stop() was called: an exit from now on is expected

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self, timeout=30):
        if self.proc is not None:
            return
        if self.pidfile:
            self.pidfile.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self.proc = popen(
                    self.argv, child_setup=self.child_setup, pdeathsig=self.pdeathsig,
                    stdin=subprocess.DEVNULL, stdout=log, env=self.env,
                    stderr=log, pass_fds=self.pass_fds,
                    close_fds=self.child_setup is None)
            except OSError as e:
                raise ProcessError(f"cannot run {self.argv[0]}: {e.strerror}") from None
        if self.pidfile:
            self._wait_for_pidfile(timeout)

    def _wait_for_pidfile(self, timeout):
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            if self.proc.poll() is not None:
                raise self.failure(f"exited with status {self.proc.returncode} while starting")
            try:
                if self.pidfile.read_text().strip():
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise self.failure(f"not ready after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def died(self):
        """It exited without being asked to."""
        return not self.stopping and self.proc is not None and self.proc.poll() is not None

    def stop(self, timeout=10, sig=signal.SIGTERM):
        """`sig` (SIGTERM), then SIGKILL if it does not exit in time. Returns the exit status."""
        self.stopping = True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pidfile:
            self.pidfile.unlink(missing_ok=True)
        return self.proc.returncode

    def log_tail(self, lines=3):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        useful = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(useful[-lines:])

    def failure(self, what):
        tail = self.log_tail()
        return ProcessError(f"{self.name} {what}" + (f": {tail}" if tail else ""))


class LogRelay:
    """Copies the lines a child appends to its log file onto our stderr as they come, so the
    operator sees the data path's errors live while the log file keeps them for failure reports."""

    def __init__(self, path, out, interval=0.2, select=None):
        """`select(lines)` returns the lines worth showing (default: all)."""
        self.path = Path(path)
        self.out = out
        self.select = select or (lambda lines: lines)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay {self.path.name}", daemon=True)
        self._pos = 0

    def start(self):
        self._thread.start()
        return self

    def _copy(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1         # whole lines only; the rest comes next time
        if end:
            lines = data[:end].decode(errors="replace").splitlines(keepends=True)
            self.out.write("".join(self.select(lines)))
            self.out.flush()
            self._pos += end

    def _run(self):
        while not self._stop.wait(self.interval):
            self._copy()

    def stop(self):
        """Copy what is left and stop."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._copy()
