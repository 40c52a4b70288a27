"""Running a tool or the mirrorfs CLI and collecting what it said."""

import subprocess
import sys

MIRRORFS = [sys.executable, "-m", "mirrorfs"]

# The CLI's exit status, as the README's "Exit status" documents it (mirrorfs/cli/main.py,
# mirrorfs/control/stopreport.py). Written out, not imported: a change to them must fail a test.
EXIT_ERROR = 1          # an error, a control command refused included
EXIT_USAGE = 2          # bad input
EXIT_DIVERGED = 3       # serve/start stopped with the sides different and nothing recording where


def run(*argv, check=True, **kw):
    """`argv` (any items, made strings) to completion; with `check`, a non-zero exit fails the test
    with the tool's stderr."""
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({res.returncode}): {res.stderr.strip()}")
    return res
