"""The control socket of a migration: JSON lines on a unix socket (mode 0600).

Requests, one JSON object per line:
    {"cmd": "status"}                       → {"ok": true, "status": {...}}
    {"cmd": "copy", "rate": 104857600}      → {"ok": true, "started": true}   (progress: status/events)
    {"cmd": "verify"}                       → {"ok": true, "identical": bool, "detail": "..."}
    {"cmd": "pivot", "force": false}        → {"ok": true, "stall_ms": 1.2}
    {"cmd": "cancel"}                       → {"ok": true}
    {"cmd": "events", "since": 0}           → one line per event, as they happen
A refused request answers {"ok": false, "error": "..."}: the same sentence the CLI prints.
"""

from mirrorfs import sockets
from mirrorfs.datapath import jsonlines
from mirrorfs.errors import Error

COMMANDS = ("status", "copy", "verify", "pivot", "cancel", "events")


def _number(request, key, kind, default=None):
    value = request.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise jsonlines.ControlError(f"{request['cmd']}: {key} must be a non-negative number")
    return kind(value)


def handler(migration):
    """`migration`: a Migration, or a MirrorServer (serve): both have status, copy, verify, pivot,
    cancel and events."""
    def handle(request):
        cmd = request["cmd"]
        try:
            if cmd == "status":
                return {"status": migration.status()}
            if cmd == "copy":
                migration.copy(rate=_number(request, "rate", int) or None, wait=False)
                return {"started": True}
            if cmd == "verify":
                identical, detail = migration.verify()
                return {"identical": identical, "detail": detail}
            if cmd == "pivot":
                stall = migration.pivot(force=request.get("force") is True)
                return {"stall_ms": round(stall * 1000, 3)}
            if cmd == "cancel":
                migration.cancel()
                return {}
            if cmd == "events":
                since = _number(request, "since", int, 0)
                return ({"event": e} for e in migration.events(since=since))
        except Error as e:
            raise jsonlines.ControlError(str(e)) from None
        raise jsonlines.ControlError(f"unknown command {cmd!r} (expected one of {', '.join(COMMANDS)})")
    return handle


def serve(path, migration):
    """Start serving the control socket at `path`; returns the server (stop() it)."""
    return jsonlines.Server(sockets.bind_unix(path), handler(migration), "control").start()
