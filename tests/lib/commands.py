"""Running a tool or the mirrorfs CLI and collecting what it said."""

import subprocess
import sys

MIRRORFS = [sys.executable, "-m", "mirrorfs"]


def run(*argv, check=True, **kw):
    """`argv` (any items, made strings) to completion; with `check`, a non-zero exit fails the test
    with the tool's stderr."""
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({res.returncode}): {res.stderr.strip()}")
    return res
