"""What every bench shares: units, the mirrorfs command, running a tool with a deadline, a
process group killed, waiting for a child's output, a measurement's own failure (BenchError)."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mirrorfs.common.sizes import parse_size
from mirrorfs.system import children as processes


MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
MB = 1e6                    # throughput is reported in MB/s (10^6 bytes), as fio's bw_bytes is
MIRRORFS = [sys.executable, "-m", "mirrorfs"]
WORK_PARENT = "/tmp"        # short unix socket paths
FIO_GRACE = 60              # seconds a fio run may overstay its runtime before it is killed


class BenchError(Exception):
    """One measurement failed. It is recorded and the bench goes on with the next one."""


# Commands and images.

def run_tool(argv, timeout, check=True):
    """Run a command to completion and return its stdout. It is forked the way mirrorfs forks its
    children (own session, SIGTERM if we die), and its whole process group is killed if it overstays
    `timeout` or we are interrupted: fio forks a process per job, and a hung server must not hang
    the bench."""
    argv = [str(a) for a in argv]
    proc = processes.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise BenchError(f"{Path(argv[0]).name} did not finish in {timeout}s") from None
    except BaseException:
        kill_group(proc)
        raise
    if check and proc.returncode != 0:
        tail = " | ".join(line for line in err.strip().splitlines()[-3:])
        raise BenchError(f"{Path(argv[0]).name} failed with status {proc.returncode}: {tail}")
    return out


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL:
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:   # a grandchild in another session holds the pipes
            pass


def wait_for_output(child, marker, timeout=60):
    """`mirrorfs serve` and `start` have no pidfile; they print a line when clients can connect.
    Fails at once, with the log, if the process dies first."""
    deadline = time.monotonic() + timeout
    while marker not in child.log_path.read_text(errors="replace"):
        if not child.alive():
            raise child.failure("exited while starting")
        if time.monotonic() > deadline:
            child.stop()
            raise child.failure(f"printed no {marker.strip()!r} line in {timeout}s")
        time.sleep(0.05)


def check_alive(*children):
    for child in children:
        if not child.alive():
            raise child.failure("died during the measurement")


# The command line, every bench's.

def size_arg(text):
    """--size, read by the project's own size parser (mirrorfs.common.sizes), its error as
    argparse shows one."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def pick(choices, text, what):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; "
                                         f"expected some of {', '.join(choices)}")
    return [choices[n] for n in names]


def interrupt_on_signals():
    """SIGTERM unwinds like Ctrl-C, so that every `finally` stops what it started; and SIGINT does
    even when a shell started us in the background with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
