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

from pathlib import Path

from mirrorfs.system import sockets
from mirrorfs.common import jsonlines
from mirrorfs.errors import Error


# What a control socket controls, as a refusal names it.
_KINDS = {"export": "an export (mirrorfs export)", "mirror": "a mirror (mirrorfs serve)",
          "migration": "a migration (mirrorfs start)"}


def handler(controller, path=None):
    table = controller.commands()

    def handle(request):
        cmd = request["cmd"]
        command = table.get(cmd)
        if command is None:
            raise jsonlines.ControlError(unknown(controller, path, cmd, table))
        try:
            return command(request)
        except Error as e:
            raise jsonlines.ControlError(str(e)) from None
    return handle


def unknown(controller, path, cmd, table):
    """The refusal of a command this controller does not have, naming what the socket controls:
    an operator who sends `pivot` to an export's control socket meant the migration's."""
    what = _KINDS.get(controller.kind, f"a {controller.kind}")
    line = (f"unknown command {cmd!r}: {path or 'this socket'} controls {what}, which has no "
            f"{cmd} (its commands: {', '.join(sorted(table))})")
    if controller.kind == "export" and path is not None:
        # `mirrorfs start --take-over` puts the migration's control socket beside the export's.
        migration = Path(str(path).removesuffix(".ctl") + ".migration.ctl")
        if migration.exists():
            line += f"; the migration's control socket is {migration}"
        else:
            line += ("; a migration of this disk has its own control socket, the 'control PATH' "
                     "that 'mirrorfs start --take-over' printed")
    return line


def serve(path, controller):
    """Start serving the control socket at `path`; returns the server (stop() it)."""
    return jsonlines.Server(sockets.bind_unix(path), handler(controller, path), "control").start()
