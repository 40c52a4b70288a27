"""A mirrorfs command that must fail cleanly: one line on stderr, the exit status it documents,
nothing left running, and nothing changed on disk (a directory compared entry by entry)."""

import os
import subprocess
from pathlib import Path

from lib.commands import MIRRORFS
from lib.images import sha256
from lib.processes import our_processes

# A case that hangs is a failure, not a stuck test run. Generous: a busy machine is not a failure.
TIMEOUT = 120


def snapshot(root):
    """Every entry under `root`: regular files by content, anything else (sockets, fifos, links) by kind."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = os.fspath(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("symlink", os.readlink(path))
            elif path.is_file():
                found[rel] = ("file", sha256(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            elif path.is_socket():
                found[rel] = ("socket",)
            else:
                found[rel] = ("other", path.stat().st_mode)
    return found


def serve_fails(workdir, *args, expect, status, allowed_pids=()):
    """Run `mirrorfs serve ARGS` in `workdir` and check that it failed cleanly with exit status
    `status` (lib.commands.EXIT_*), naming `expect`.

    XDG_RUNTIME_DIR points into the workdir, so the run directory mirrorfs makes (its children's sockets,
    pidfiles, logs) must be gone afterwards too, and every child mentions the workdir on its command line.
    """
    before = snapshot(workdir)
    env = dict(os.environ, XDG_RUNTIME_DIR=os.fspath(workdir))
    res = subprocess.run([*MIRRORFS, "serve", *map(str, args)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, cwd=workdir, env=env, timeout=TIMEOUT)
    err = res.stderr
    assert res.returncode == status, f"exit status {res.returncode}, not {status}; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert err.startswith("mirrorfs: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    for text in [expect] if isinstance(expect, str) else expect:
        assert text in err, f"{text!r} not in {err!r}"
    assert res.stdout == "", res.stdout
    left = [" ".join(p.cmdline()) for p in our_processes(os.fspath(workdir)) if p.pid not in allowed_pids]
    assert not left, f"processes left running: {left}"
    assert snapshot(workdir) == before, "the work directory changed"
    return res
