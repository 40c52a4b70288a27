"""`mirrorfs export`: a disk served for its life by a plain qemu-storage-daemon, between migrations.

    clients ──NBD──▶ SOCKET ──▶ qemu-storage-daemon (the disk's chain)      while exporting
    clients ──NBD──▶ SOCKET ──▶ nbdkit + mirrorfs data path ──▶ ...          while lent to a migration

This process owns the disk's listening socket for as long as the disk is in service, and never
closes it: a reconnecting client waits in its backlog through every change below, instead of being
refused. Between migrations the socket is served by a qemu-storage-daemon (native speed: no nbdkit,
no Python in the path). A migration takes the disk over and hands it back through the control socket:

    {"cmd": "lend", "pid": N}    stop the plain export (its clients' connections are dropped, nothing
                                 they wait for is answered, its images are flushed and closed) and
                                 pass the listening socket to the migration (SCM_RIGHTS). This
                                 process keeps its own copy: if the migration dies, the socket lives
                                 on, and a restarted migration borrows it again.
    {"cmd": "give-back", "image": PATH}
                                 serve PATH (the chain the migration ended on) with a plain export
                                 again, on the same socket.

Phases: exporting, lent, stopped.
"""

import os
import shutil

from mirrorfs.common.phases import Phase
from mirrorfs.sides import images
from mirrorfs.system import notify
from mirrorfs.system import sockets
from mirrorfs.system.access import Access
from mirrorfs.control.controller import Controller, number
from mirrorfs.common import jsonlines
from mirrorfs.errors import UsageError
from mirrorfs.daemons.storage import StorageDaemon, check_cache
from mirrorfs.daemons.tree import make_rundir


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Export(Controller):
    kind = "export"

    def __init__(self, image, socket_path, cache="auto", access=None):
        super().__init__()
        check_cache(cache)
        self.image_spec = image
        self.socket_path = sockets.check_unix_path(os.path.abspath(socket_path))
        self.cache = cache
        self.access = access or Access()
        self.image = None
        self.listener = None
        self.daemon = None
        self.rundir = None
        self.borrower = None            # pid of the migration the socket is lent to
        self.lent_count = 0

    # Start and stop.

    def start(self):
        with self.internal_change():
            self.image = images.info(self.image_spec)
            try:
                self.listener = sockets.bind_unix(self.socket_path)
                self.access.share(self.socket_path)
                self.rundir = make_rundir()
                self._serve(self.image)
            except BaseException:
                self._close()
                raise
            self.enter(Phase.EXPORTING, image=str(self.image.path))

    def _serve(self, image):
        self.daemon = StorageDaemon(image, self.rundir, "export", cache=self.cache,
                                    listener=self.listener)
        self.daemon.start()
        self.image = image

    def stop(self):
        with self.internal_change():
            self._close()
            if self.phase not in (Phase.NEW, Phase.STOPPED):
                self.enter(Phase.STOPPED)
            self.log.close()

    def _close(self):
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.socket_path.unlink(missing_ok=True)
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    @property
    def uris(self):
        return [f"nbd+unix:///?socket={self.socket_path}"]

    def check(self, seen):
        """No data path here: only the plain export's daemon to watch."""
        daemon = self.daemon
        if daemon is not None and daemon.died():
            raise daemon.failure("exited unexpectedly")

    # Lending the socket to a migration, and taking the disk back.

    def lend(self, pid):
        """Stop the plain export and return the listening socket's fd for the migration `pid`."""
        with self.changing("lend", Phase.EXPORTING, Phase.LENT):
            if self.phase == Phase.LENT:
                if self.borrower is not None and _alive(self.borrower):
                    raise UsageError(f"the disk is lent to a migration already (pid {self.borrower})")
                self.log.add("warning", what="the migration that borrowed the disk is gone; "
                             "lending it again", pid=self.borrower)
            else:
                self.daemon.stop()          # connections dropped unanswered; images flushed
                self.daemon = None
            self.borrower = pid
            self.lent_count += 1
            self.enter(Phase.LENT, pid=pid)
            notify.status(f"lent to migration pid {pid}")
            return {"image": str(self.image.path), "format": self.image.format,
                    "socket": str(self.socket_path), "_fds": [self.listener.fileno()]}

    def give_back(self, image):
        """Serve `image` (the chain a migration ended on) with a plain export again."""
        with self.changing("give-back", Phase.LENT):
            info = images.info(image)
            if info.virtual_size != self.image.virtual_size:
                raise UsageError(f"{info.path} is {info.virtual_size} bytes; the disk is "
                                 f"{self.image.virtual_size}")
            self._serve(info)
            self.borrower = None
            self.enter(Phase.EXPORTING, image=str(info.path))
            notify.status(f"exporting {info.path}")
            return {"serving": str(info.path)}

    # Status and commands.

    def status(self):
        status = super().status()
        status["serving"] = "export" if self.phase == Phase.EXPORTING else None
        status["source"] = {"spec": str(self.image.path) if self.image else self.image_spec}
        if self.borrower is not None:
            status["lent"] = {"pid": self.borrower, "alive": _alive(self.borrower)}
        return status

    def commands(self):
        table = super().commands()
        table.update({
            "lend": lambda r: self.lend(int(number(r, "pid") or 0) or None),
            "give-back": lambda r: self.give_back(_path(r, "image")),
        })
        return table


def _path(request, key):
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{request['cmd']}: {key} must be a path")
    return value


def served_image(control_path):
    """The image the export at `control_path` serves now."""
    try:
        status = jsonlines.call(control_path, {"cmd": "status"}, timeout=30)["status"]
    except jsonlines.ControlError as e:
        raise UsageError(f"cannot take the disk over from {control_path}: {e}") from None
    if status.get("kind") != "export":
        raise UsageError(f"{control_path} is not the control socket of a mirrorfs export "
                         f"(it controls a {status.get('kind')})")
    lent = status.get("lent")
    if status["phase"] == Phase.LENT and lent and lent["alive"]:
        raise UsageError(f"cannot take the disk over from {control_path}: it is lent to a "
                         f"migration already (pid {lent['pid']})")
    return status["source"]["spec"]


def borrow(control_path):
    """Ask the export at `control_path` for its disk: (the listening socket, the reply)."""
    try:
        reply, fds = jsonlines.call_with_fds(control_path, {"cmd": "lend", "pid": os.getpid()},
                                             timeout=60)
    except jsonlines.ControlError as e:
        raise UsageError(f"cannot take the disk over from {control_path}: {e}") from None
    return sockets.received_listener(fds, f"{control_path} (is it a mirrorfs export?)"), reply


def give_back(control_path, image):
    """Ask the export at `control_path` to serve `image` again."""
    try:
        return jsonlines.call(control_path, {"cmd": "give-back", "image": str(image)}, timeout=120)
    except jsonlines.ControlError as e:
        raise UsageError(f"cannot hand the disk back to {control_path}: {e}") from None
