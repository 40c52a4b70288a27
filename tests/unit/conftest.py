"""The unit suite: the data path's rules and each module's own, driven in this process (memory
backends, real state directories, the package's source read as text). It needs the standard
library, libnbd's Python module, pytest and psutil, nothing else: no prerequisite check here (that
is tests/system/conftest.py's), and `make check` runs it in seconds before every commit.

The rule that keeps it so is enforced: while a unit test runs, starting a process other than a
Python interpreter (or `python -m mirrorfs`) fails that test. A test that needs nbdkit, QEMU, fio,
Ceph or the mirrorfs command belongs in tests/system/."""

import os
import sys

import pytest

# The audit events by which a process is started (subprocess, os.system, os.exec*, posix_spawn).
STARTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn")
PYTHONS = {os.path.realpath(p) for p in (sys.executable, "/usr/bin/python3")}

_guarding = []          # non-empty while a unit test runs


def _program(event, args):
    """The program and its arguments an audit event starts (os.system: the shell's command)."""
    if event == "os.system":
        return "/bin/sh", ["-c", args[0]]
    executable, argv = args[0], args[1] or []
    argv = [argv] if isinstance(argv, (str, bytes)) else list(argv)
    return os.fsdecode(executable or argv[0]), [os.fsdecode(a) for a in argv[1:]]


def _refuse_processes(event, args):
    if not _guarding or event not in STARTS:
        return
    program, rest = _program(event, args)
    path = program if os.sep in program else next(
        (os.path.join(d, program) for d in os.get_exec_path() if os.path.isfile(os.path.join(d, program))),
        program)
    python = os.path.realpath(path) in PYTHONS
    if not python or rest[:2] == ["-m", "mirrorfs"]:
        raise RuntimeError(f"a unit test started {' '.join([program, *rest])[:200]!r}: a test that "
                           "needs a process belongs in tests/system/")


# Audit hooks stay for the life of the interpreter; this one acts only while _guarding says so.
sys.addaudithook(_refuse_processes)


@pytest.fixture(autouse=True)
def no_external_process():
    _guarding.append(True)
    try:
        yield
    finally:
        _guarding.pop()
