"""A running mirrorfs's control socket and saved state: requests straight over the socket, the CLI's
control commands (`mirrorfs <cmd> --control PATH`), and the state.json a restart reads."""

import json
import socket
from pathlib import Path

from lib.commands import MIRRORFS, run


def control_request(path, request, timeout=60):
    """One JSON request on a control socket (a supervisor's or the data path's), straight over the
    socket (no CLI: two of them can race); the reply, parsed."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(s.makefile().readline())


def status(path):
    """The status of the supervisor on control socket `path`, asked over the socket."""
    reply = control_request(path, {"cmd": "status"})
    assert reply["ok"], reply
    return reply["status"]


def status_of(control):
    """`mirrorfs status --json` through the real CLI."""
    return json.loads(run(*MIRRORFS, "status", "--json", "--control", control).stdout)


def ctl(path, *args, check=True):
    """`mirrorfs ARGS --control PATH`, the real CLI; with `check`, it must exit 0."""
    res = run(*MIRRORFS, *args, "--control", path, check=False)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def saved_state(state_dir):
    """The state.json mirrorfs saved (phase, cursor, dirty regions): what a restart will read."""
    return json.loads((Path(state_dir) / "state.json").read_text())
