"""Fixtures that start real processes: images made with qemu-img/qemu-io, `mirrorfs serve` run as the
real CLI, qemu-nbd servers for URI endpoints. Every test is checked for leftover processes."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

import ceph

MIRRORFS = [sys.executable, "-m", "mirrorfs"]
CHILD_NAMES = ("nbdkit", "qemu-storage-daemon", "qemu-nbd")
REQUIRED_TOOLS = ("nbdkit", "qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "fio",
                  # the guest tests (QEMU, checking the guest's file system) and the TLS tests' keys
                  "qemu-system-x86_64", "e2fsck", "debugfs", "psktool", "openssl",
                  # the Ceph tests' cluster (tests/ceph.py)
                  *ceph.TOOLS,
                  # the host metrics' scraper (tests/test_host_metrics.py)
                  "prometheus")


def pytest_sessionstart(session):
    # A missing prerequisite is an error, not a silent skip.
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    formats = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True).stdout
    if " rbd " not in formats:
        missing.append("QEMU's rbd block driver (qemu-block-extra)")
    if missing:
        raise pytest.UsageError(f"missing tools: {', '.join(missing)} (run 'make setup')")


# `make test` is the whole suite: a marker group it is meant to run that is deselected (say
# PYTEST_ARGS='-m "not guest"') or that passes nothing (all skipped) fails the run, so a green
# `make test` always includes them. MIRRORFS_ALLOW_PARTIAL=1 says a partial run is meant.
SUITE_GROUPS = ("guest",)


def _enforce_groups(config):
    return (os.environ.get("MIRRORFS_SUITE") == "full" and not os.environ.get("MIRRORFS_ALLOW_PARTIAL")
            and not config.option.collectonly)


@pytest.hookimpl(trylast=True)          # after -m and -k have deselected
def pytest_collection_modifyitems(session, config, items):
    if not _enforce_groups(config):
        return
    empty = [g for g in SUITE_GROUPS if not any(item.get_closest_marker(g) for item in items)]
    if empty:
        args = " ".join(config.invocation_params.args)
        raise pytest.UsageError(
            f"make test selected no {', '.join(empty)} tests (pytest arguments: {args!r}); "
            "set MIRRORFS_ALLOW_PARTIAL=1 to run part of the suite on purpose")


_group_passed = {g: 0 for g in SUITE_GROUPS}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        for g in SUITE_GROUPS:
            if g in report.keywords:
                _group_passed[g] += 1


def pytest_sessionfinish(session, exitstatus):
    if not _enforce_groups(session.config) or exitstatus != pytest.ExitCode.OK:
        return
    empty = [g for g, n in _group_passed.items() if not n]
    if empty:
        session.config.get_terminal_writer().line(
            f"make test: no {', '.join(empty)} test passed (skipped?): the run does not count", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def run(*argv, check=True, **kw):
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def qemu_io(target, *commands, fmt="raw"):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    res = run(*argv, target)
    # qemu-io reports failed commands on stdout and still exits 0.
    assert "failed" not in res.stdout.lower() and "error" not in res.stdout.lower(), res.stdout
    return res.stdout


def images_identical(a, b):
    res = run("qemu-img", "compare", a, b, check=False)
    return res.returncode == 0, (res.stdout + res.stderr).strip()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def workdir(request):
    """A short directory (unix socket paths are limited to 107 bytes). MIRRORFS_KEEP_FAILED=1
    keeps the directory of a failed test, images and logs, for a post-mortem."""
    path = Path(tempfile.mkdtemp(prefix="mfs-", dir="/tmp"))
    yield path
    report = getattr(request.node, "report_call", None)
    if os.environ.get("MIRRORFS_KEEP_FAILED") and report is not None and report.failed:
        print(f"kept {path}")
        return
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def host_run_dir(monkeypatch):
    """Every mirrorfs process a test starts registers in a run directory of the test's own
    (MIRRORFS_RUN_DIR, see mirrorfs.host.rundir), never in the host's /run/mirrorfs: tests running
    in parallel neither see each other's disks nor share a budget."""
    path = Path(tempfile.mkdtemp(prefix="mfsrun-", dir="/tmp"))
    monkeypatch.setenv("MIRRORFS_RUN_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def our_processes(marker):
    """nbdkit / qemu-* processes whose command line mentions `marker` (a test's directory)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if any(n in (p.info["name"] or "") or n in cmd for n in CHILD_NAMES) and marker in cmd:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


# The Ceph cluster of the session, if a test asked for one: its daemons outlive every test (one
# restarts the OSD), and are stopped when the session ends.
_clusters = []


@pytest.fixture(scope="session")
def ceph_cluster():
    """One Ceph cluster for every test of the session that needs it (about 15-20 s to start)."""
    root = Path(tempfile.mkdtemp(prefix="mfsceph-", dir="/tmp"))
    cluster = ceph.CephCluster(root)
    try:
        cluster.start()
        _clusters.append(cluster)
        yield cluster
    finally:
        cluster.stop()
        if cluster in _clusters:
            _clusters.remove(cluster)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_processes(workdir):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        cluster_pids = {pid for c in _clusters for pid in c.pids()}
        leaked = [p for p in psutil.Process().children(recursive=True)
                  if p.pid not in before and p.pid not in cluster_pids and p.is_running()
                  and p.status() != psutil.STATUS_ZOMBIE]
        leaked += [p for p in our_processes(str(workdir)) if p not in leaked]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    described = []
    for p in leaked:
        try:
            described.append(" ".join(p.cmdline()))
            p.kill()
        except psutil.Error:            # gone (or a zombie) meanwhile
            described.append(f"pid {p.pid}")
    assert not leaked, f"processes left running: {described}"


# Images.

MiB = 1024 * 1024


def make_base(path, size=64 * MiB, fmt="qcow2"):
    """A base image with recognizable data: a pattern per MiB in the first half, holes after."""
    run("qemu-img", "create", "-q", "-f", fmt, path, str(size))
    commands = [f"write -P {0x10 + i} {i * MiB} {MiB}" for i in range(0, size // MiB // 2, 3)]
    qemu_io(path, *commands, fmt=fmt)
    return Path(path)


def make_overlay(path, backing, backing_fmt="qcow2"):
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path)
    return Path(path)


def make_full_pair(workdir, size):
    """src.qcow2 with a pattern in every other MiB (0x30, 0x31, ...), and an empty dst.qcow2 of the
    same size: the endpoints of a full copy."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", src, str(size))
    qemu_io(src, *[f"write -P {0x30 + i} {i * 2 * MiB} {MiB}" for i in range(size // (2 * MiB))],
            fmt="qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", dst, str(size))
    return src, dst


class Chains:
    """src/base ← src/snap (source) and src/base ← dst/snap (destination), as during a migration."""

    def __init__(self, root, size=64 * MiB):
        (root / "src").mkdir()
        (root / "dst").mkdir()
        self.base = make_base(root / "src" / "base.qcow2", size)
        self.source = make_overlay(root / "src" / "snap.qcow2", self.base)
        self.dest = make_overlay(root / "dst" / "snap.qcow2", self.base)


@pytest.fixture
def chains(workdir):
    return Chains(workdir)


# `mirrorfs serve`, the real CLI.

class Served:
    """`mirrorfs serve ...` (or `start ...`) running, ready when it prints its URI."""

    def __init__(self, workdir, *args, name="disk", command="serve"):
        self.socket = workdir / f"{name}.sock"
        self.control = Path(f"{self.socket}.ctl")
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        argv = [*MIRRORFS, command, *map(str, args)]
        if "--socket" not in args and "--listen" not in args:
            argv += ["--socket", str(self.socket)]
        self.argv = argv
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.uri = self._wait_ready()

    def _wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out.read_text()
            if "serving " in text:
                return text.split("serving ", 1)[1].split()[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"mirrorfs serve exited {self.proc.returncode}: {self.stderr}")
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"mirrorfs serve not ready: {self.stderr}")

    @property
    def stderr(self):
        return self.err.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def serve(workdir):
    started = []

    def start(*args, **kw):
        s = Served(workdir, *args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.__exit__()


# Independent NBD servers, for URI endpoints.

def wait_for_pidfile(proc, pidfile, timeout=10):
    """Wait until `proc` has written its pid to `pidfile` (servers write it once they accept
    connections). False if `proc` exits first or `timeout` seconds pass: the caller says why."""
    deadline = time.monotonic() + timeout
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class QemuNbd:
    def __init__(self, image, socket, fmt="qcow2"):
        self.socket = Path(socket)
        self.pidfile = self.socket.with_suffix(".pid")
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", fmt, "-k", str(self.socket), "--pid-file", str(self.pidfile),
             "--persistent", "--shared=16", "--cache=writeback", "--discard=unmap", str(image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for_pidfile(self.proc, self.pidfile):
            raise AssertionError(f"qemu-nbd failed: {self.proc.stderr.read().decode()}")
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc.stderr.close()


class NbdkitFilter:
    """nbdkit's nbd plugin in front of another export, with filters (error, delay) on the way:
    `args` are nbdkit's --filter=... options and the filters' key=value parameters. Started again
    with the same `name`, it serves the same URI (a state directory knows a destination by it)."""

    def __init__(self, workdir, name, target_socket, *args):
        self.socket = workdir / f"{name}.sock"
        pidfile = workdir / f"{name}.pid"
        pidfile.unlink(missing_ok=True)         # left by an instance that was killed
        self.socket.unlink(missing_ok=True)
        filters = [a for a in args if a.startswith("--filter=")]
        params = [a for a in args if not a.startswith("--filter=")]
        log = workdir / f"{name}.err"
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", "-U", self.socket, "--pidfile", pidfile, *filters,
                 "nbd", f"socket={target_socket}", *params],
                stdout=subprocess.DEVNULL, stderr=err)
        assert wait_for_pidfile(self.proc, pidfile), f"nbdkit failed: {log.read_text()[-2000:]}"
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self):
        """kill -9: requests it holds (paused, delayed) never reach the export behind it."""
        self.proc.kill()
        self.proc.wait()


class PausableFront(NbdkitFilter):
    """nbdkit's pause filter in front of an export: after `pause()`, every request that arrives is
    held (those already in flight finish first) until `resume()`, or for good if it is killed."""

    def __init__(self, workdir, name, target_socket, *args):
        self.control = workdir / f"{name}-pause.ctl"
        self.control.unlink(missing_ok=True)
        super().__init__(workdir, name, target_socket, "--filter=pause",
                         f"pause-control={self.control}", *args)

    def _command(self, letter):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(os.fspath(self.control))
            s.sendall(letter)
            assert s.recv(1) == letter.upper(), "the pause filter did not acknowledge"

    def pause(self):
        self._command(b"p")

    def resume(self):
        self._command(b"r")


class FioLoad:
    """fio's nbd engine on `uri` until stopped (time_based, with a runtime no test reaches): a test
    stops it once it has seen what it needs, instead of hoping a fixed run is long enough."""

    def __init__(self, workdir, uri, *args):
        self.out, self.err = workdir / "fio.json", workdir / "fio.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--time_based",
                 "--runtime=3600", "--output-format=json", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGINT: fio ends its jobs and prints its report. Returns the job's report; fio's own
        failures (a verify error ends it early) are the report's `error`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        text = self.out.read_text()
        assert "{" in text, f"fio exited {self.proc.returncode}: {self.err.read_text()}"
        return json.loads(text[text.index("{"):])["jobs"][0]


@pytest.fixture
def qemu_nbd(workdir):
    started = []

    def start(image, name, fmt="qcow2"):
        s = QemuNbd(image, workdir / f"{name}.sock", fmt)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# The migration workflow (`mirrorfs start` and the control commands), through the real CLI.

class MigrationSetup:
    """src/base.qcow2 with data, an empty dst/, and helpers to drive `mirrorfs start`."""

    def __init__(self, workdir, serve, size=64 * MiB):
        self.workdir = workdir
        self._serve = serve
        (workdir / "src").mkdir()
        (workdir / "dst").mkdir()
        self.base = make_base(workdir / "src" / "base.qcow2", size)
        self.source_overlay = workdir / "src" / "base-snap.qcow2"
        self.dest_overlay = workdir / "dst" / "base-snap.qcow2"
        self.dest_base = workdir / "dst" / "base.qcow2"
        self.disk = None

    def start(self, *extra):
        self.disk = self._serve(self.base, "--dest-dir", self.workdir / "dst", *extra, command="start")
        return self.disk

    def ctl(self, *args, check=True):
        """Run `mirrorfs <args> --control <socket>`; returns the CompletedProcess."""
        res = run(*MIRRORFS, *args, "--control", self.disk.control, check=False)
        if check:
            assert res.returncode == 0, res.stderr
        return res


@pytest.fixture
def migration(workdir, serve):
    return MigrationSetup(workdir, serve)


# Waiting for a state, and crashing on purpose.

def wait_until(check, what, timeout=120, interval=0.05):
    """Call `check` until it returns something true, and return that. Tests wait for the state
    they need (a phase, bytes copied), never for a time: the deadline is generous and only turns a
    hang into a failure, so a slow or busy machine makes a test slower, not wrong."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} (waited {timeout}s; last: {found!r})")
        time.sleep(interval)


def control_request(path, request, timeout=60):
    """One JSON request on a control socket (a supervisor's or the data path's), straight over the
    socket (no CLI: two of them can race); the reply, parsed."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(s.makefile().readline())


def status_of(control):
    """`mirrorfs status --json` through the real CLI."""
    return json.loads(run(*MIRRORFS, "status", "--json", "--control", control).stdout)


def saved_state(state_dir):
    """The state.json mirrorfs saved (phase, cursor, dirty regions): what a restart will read."""
    return json.loads((Path(state_dir) / "state.json").read_text())


def kill_mirrorfs(pid, also=()):
    """kill -9 of mirrorfs and its nbdkit (the data path first), as in a crash, plus the processes
    in `also`. Waits until all of them and every child of mirrorfs are gone: the storage daemons
    exit on the SIGTERM the kernel sends them (PR_SET_PDEATHSIG)."""
    proc = psutil.Process(pid)
    victims = [proc] + proc.children(recursive=True)
    nbdkit = [p for p in victims if p.name() == "nbdkit"]
    assert nbdkit, "mirrorfs has no nbdkit child"
    for p in [*nbdkit, proc, *also]:
        p.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(victims + list(also), timeout=30)
    assert not alive, f"still running after kill -9: {alive}"
