"""The control socket of a served disk: JSON lines on a unix socket (mode 0600, or 0660 with --group).

Requests, one JSON object per line; which commands exist is the controller's table
(mirrorfs.control.controller.Controller.commands):
    {"cmd": "status"}                       → {"ok": true, "status": {...}}
    {"cmd": "events", "since": 0}           → one line per event, as they happen
    {"cmd": "verify"}                       → {"ok": true, "identical": bool, "detail": "..."}
    {"cmd": "pivot", "force": false}        → {"ok": true, "stall_ms": 1.2}
    {"cmd": "cancel"}                       → {"ok": true}
    {"cmd": "copy", "rate": 104857600}      → {"ok": true, "started": true}   (a migration only)
A refused request answers {"ok": false, "error": "..."}: the same sentence the CLI prints.
"""

from mirrorfs.system import sockets
from mirrorfs.common import jsonlines
from mirrorfs.errors import Error


def handler(controller):
    table = controller.commands()

    def handle(request):
        cmd = request["cmd"]
        command = table.get(cmd)
        if command is None:
            raise jsonlines.ControlError(f"unknown command {cmd!r} (expected one of "
                                         f"{', '.join(sorted(table))})")
        try:
            return command(request)
        except Error as e:
            raise jsonlines.ControlError(str(e)) from None
    return handle


def serve(path, controller):
    """Start serving the control socket at `path`; returns the server (stop() it)."""
    return jsonlines.Server(sockets.bind_unix(path), handler(controller), "control").start()
