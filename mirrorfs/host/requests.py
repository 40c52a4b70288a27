"""The host service's control socket (RUN_DIR/host.ctl, JSON lines): its commands, one request each,
{"cmd": ..., "disk": NAME, ...}. A part of mirrorfs.host.service's HostService (its base class),
apart so that each file holds one concern: what a client may ask, and what each answer holds.

    add         {"disk", "image", "socket"}: record the disk and serve it (both, or neither)
    remove      {"disk"}: forget it and stop serving it (refused while lent)
    list        every disk: name, socket, phase, top, chain, size, pid, lent (+ alive), error
    status      one disk: the same, its last events, its retired images, its daemon's log
    lend        {"disk", "pid", "migration", "control", "state_dir", "source", "destination",
                "evacuation"}: recorded, then the daemon stopped; the socket passed (SCM_RIGHTS)
    give-back   {"disk", "migration", "chain", "undone"}: recorded (returned; undone: a start
                undone, the chain from before the loan, nothing retired), then the chain served
    shutdown    every disk's daemon stopped, then the service
"""

import os
import threading
import time
from pathlib import Path

from mirrorfs.common import jsonlines
from mirrorfs.errors import Error, UsageError
from mirrorfs.host import daemons as disk_daemons
from mirrorfs.host import registry as reg
from mirrorfs.host.named import Disk, Phase
from mirrorfs.system import notify, sockets
from mirrorfs.system import pidfd as pidfds


class Requests:
    """The commands of HostService (which has the disks, the registry and the serving)."""

    def _handle(self, request):
        cmd = request["cmd"]
        handler = {"add": self.add, "remove": self.remove, "list": self.list, "status": self.status,
                   "lend": self.lend, "give-back": self.give_back, "shutdown": self.shutdown}.get(cmd)
        if handler is None:
            raise jsonlines.ControlError(f"unknown command {cmd!r}: this is the mirrorfs host service "
                                         f"({self.control_path})")
        try:
            return handler(request)
        except Error as e:
            raise jsonlines.ControlError(str(e)) from None

    def _disk(self, request):
        self._ready.wait(600)
        name = reg.check_name(request.get("disk"))
        disk = self.disks.get(name)
        if disk is None:
            raise UsageError(f"no disk named {name} (mirrorfs list)")
        return disk

    def add(self, request):
        self._ready.wait(600)
        name = reg.check_name(request.get("disk"))
        image, socket_path = request.get("image"), request.get("socket")
        if not isinstance(image, str) or not isinstance(socket_path, str):
            raise UsageError("add: give the image and the socket")
        socket_path = os.path.abspath(socket_path)
        sockets.check_unix_path(socket_path)
        with self._lock:
            if name in self.disks:
                raise UsageError(f"a disk named {name} exists already")
            for other in self.disks.values():
                if other.socket == socket_path:
                    raise UsageError(f"socket {socket_path} is the disk {other.name}'s")
            disk = self.disks[name] = Disk(name)
            disk.socket = socket_path
        with disk.lock:
            try:
                listener = self.bind(socket_path)
                try:
                    record = self.registry.add(name, image, socket_path)
                except BaseException:
                    listener.close()
                    Path(socket_path).unlink(missing_ok=True)
                    raise
                disk.listener = listener
            except BaseException:
                with self._lock:
                    del self.disks[name]
                raise
            try:
                self._serve(disk, record)
            except BaseException:
                # "add" registers *and* serves: a disk that cannot be served is not registered.
                self.registry.remove(name)
                self._forget(disk)
                raise
            return {"disk": self._view(disk, record)}

    def remove(self, request):
        disk = self._disk(request)
        with disk.lock:
            record = self.registry.remove(disk.name)
            self._forget(disk)
            return {"removed": disk.name, "chain": reg.paths(record["chain"])}

    def lend(self, request):
        disk = self._disk(request)
        pid = request.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            raise UsageError("lend: pid must be the borrower's process id")
        with disk.lock:
            if disk.phase in (Phase.FAILED, Phase.STOPPED, Phase.STARTING):
                raise UsageError(f"the disk {disk.name} cannot be lent: it is {disk.phase}"
                                 + (f" ({disk.error})" if disk.error else ""))
            if disk.listener is None:
                raise UsageError(f"the host service has no socket of the disk {disk.name} to lend "
                                 f"(it is held by pid {disk.borrower[0] if disk.borrower else '?'})")
            record = self.registry.lend(
                disk.name, migration=request.get("migration"), pid=pid, control=request.get("control"),
                state_dir=request.get("state_dir"), source=request.get("source"),
                destination=request.get("destination"), evacuation=bool(request.get("evacuation")))
            if disk.daemon is not None:
                disk.daemon.stop()          # clients' requests unanswered (resent), images flushed
                disk.daemon = None
            if disk.borrower is not None:
                os.close(disk.borrower[1])
            pidfd = pidfds.pidfd_of(pid)
            disk.borrower = (pid, pidfd) if pidfd is not None else None
            disk.dead_since = None if pidfd is not None else time.monotonic()
            disk.phase, disk.error = Phase.LENT, None
            disk_daemons.write_entry(self.directory, disk.name, disk.inode, None)
            self._wake()
            notify.status(f"{disk.name} lent to migration {request.get('migration')} (pid {pid})")
            return {"record": record, "socket": disk.socket, "_fds": [disk.listener.fileno()]}

    def give_back(self, request):
        disk = self._disk(request)
        migration, chain = request.get("migration"), request.get("chain")
        with disk.lock:
            record = self.registry.get(disk.name)
            if record["lent"] and record["lent"]["migration"] == migration:
                end = self.registry.undone if request.get("undone") else self.registry.returned
                record = end(disk.name, migration, chain)
            elif record["lent"] or reg.paths(record["chain"]) != reg.paths(reg.check_chain(chain, "give-back")):
                raise UsageError(f"give-back: the disk {disk.name} is not lent to migration {migration}")
            if disk.phase != Phase.LENT and disk.daemon is not None:
                return {"serving": reg.top(record), "record": record}
            if disk.borrower is not None:
                os.close(disk.borrower[1])
                disk.borrower = None
            disk.dead_since = None
            if disk.listener is None:
                disk.listener = self._socket_from_borrower(request.get("pid") or 0, disk.socket, None)
            try:
                self._serve(disk, record)
            except Error as e:
                self._failed(disk, f"handed back on {' <- '.join(reg.paths(record['chain']))}, "
                                   f"which cannot be served: {e}")
                raise
            notify.status(f"{disk.name} exporting {reg.top(record)}")
            return {"serving": reg.top(record), "record": record}

    def shutdown(self, request):
        threading.Thread(target=self._shutdown_now, name="shutdown", daemon=True).start()
        return {"stopping": len(self.disks)}

    def _shutdown_now(self):
        self.shutdown_requested = True
        self._stop.set()

    shutdown_requested = False

    # Views.

    def list(self, request):
        views = []
        for disk in sorted(self._all(), key=lambda d: d.name):
            try:
                record = self.registry.get(disk.name)
            except Error:
                record = None
            views.append(self._view(disk, record))
        return {"disks": views}

    def status(self, request):
        disk = self._disk(request)
        try:
            record = self.registry.get(disk.name)
        except Error:
            record = None
        view = self._view(disk, record)
        if record is not None:
            view.update(history=record["history"][-10:], retired=record["retired"], id=record["id"])
        if disk.daemon is not None:
            view["log"] = disk.daemon.log_tail()
        return {"disk": view}

    def _view(self, disk, record):
        view = {"name": disk.name, "socket": disk.socket or (record or {}).get("socket"),
                "phase": disk.phase, "top": reg.top(record) if record else None,
                "chain": record["chain"] if record else None, "size": record["size"] if record else None,
                "pid": disk.daemon.pid if disk.daemon is not None else None,
                "lent": None, "error": disk.error, "generation": record["generation"] if record else None}
        if record and record["lent"]:
            lent = dict(record["lent"])
            lent["alive"] = reg.borrower_alive(lent)
            view["lent"] = lent
        if disk.phase == Phase.LENT and disk.dead_since is not None:
            left = max(0.0, self.take_back_after - (time.monotonic() - disk.dead_since))
            view["error"] = f"the borrower is gone; taken back in {left:.0f} s unless resumed"
        return view
