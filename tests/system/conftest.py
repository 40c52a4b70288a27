"""The system suite's fixtures and hooks. Fixtures start real processes (images made with
qemu-img/qemu-io, `mirrorfs serve` run as the real CLI, qemu-nbd servers for URI endpoints); the
hooks check the prerequisites (here only: tests/unit/ needs none), keep the marker groups `make
test` must include, split the suite into its two passes (`--pass`, below), and look for leftover
processes after every test. The helpers the fixtures use are in tests/lib/, which tests import by
name."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from lib import ceph, libvirt
from lib.hostservice import HostService
from lib.images import Chains
from lib.nbdservers import QemuNbd
from lib.processes import our_processes
from lib.reconnecting import ReconnectingWriter
from lib.served import Background, MigrationSetup, Served

REQUIRED_TOOLS = ("nbdkit", "qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "fio",
                  # the guest tests (QEMU, checking the guest's file system) and the TLS tests' keys
                  "qemu-system-x86_64", "e2fsck", "debugfs", "psktool", "openssl",
                  # the Ceph tests' cluster (tests/lib/ceph.py)
                  *ceph.TOOLS,
                  # the host metrics' scraper (tests/system/test_host_metrics.py)
                  "prometheus",
                  # the libvirt guest (tests/system/test_libvirt.py, tests/lib/libvirt.py)
                  *libvirt.TOOLS)


def pytest_sessionstart(session):
    # A missing prerequisite is an error, not a silent skip.
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    formats = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True).stdout
    if " rbd " not in formats:
        missing.append("QEMU's rbd block driver (qemu-block-extra)")
    if missing:
        raise pytest.UsageError(f"missing tools: {', '.join(missing)} (run 'make setup')")


# The two passes of `make test`. The suite runs on parallel workers (pytest-xdist, `-n`), except
# the tests marked `serial`: they assert a time, a rate or a share (the host budget's shares, a
# write held about --io-timeout, Prometheus's rates), or their premise is that the test keeps up
# with the disk (a kill -9 that must land mid-hydration); they run afterwards, one at a time, with
# the machine to themselves (`--pass=serial -p no:xdist`). Without --pass, all. The guests and the
# quick benches measure no time (the benches measure throughput, and assert none of it): they run
# in the parallel pass, the guests on one worker (SHARE_A_WORKER, below).
PASSES = ("parallel", "serial")


def pytest_addoption(parser):
    parser.addoption("--pass", dest="mfs_pass", choices=PASSES, default=None,
                     help="run only the tests of one pass of make test: parallel (not marked serial, "
                          "for xdist's workers) or serial (marked serial, one at a time)")


def _in_pass(item, which):
    return which is None or (item.get_closest_marker("serial") is not None) == (which == "serial")


# Marker groups whose tests share one xdist worker (`--dist loadgroup`), one test at a time: the
# Ceph tests, so that only one cluster starts (the ceph_cluster fixture is the session's, and a
# session is a worker's); the guests, so that one QEMU under TCG (a core of its own) runs at once.
SHARE_A_WORKER = ("ceph", "guest")


def pytest_itemcollected(item):
    # Before xdist reads the group (its own collection hook).
    if not item.config.pluginmanager.has_plugin("xdist"):
        return
    for group in SHARE_A_WORKER:
        if item.get_closest_marker(group):
            item.add_marker(pytest.mark.xdist_group(group))
            return


# `make test` is the whole suite: a marker group it is meant to run that is deselected (say
# PYTEST_ARGS='-m "not guest"') or that passes nothing (all skipped) fails the run, so a green
# `make test` always includes them. MIRRORFS_ALLOW_PARTIAL=1 says a partial run is meant. A group
# is checked in the pass that runs it. Under xdist the controller collects nothing: each worker
# says which groups its pass holds (its workeroutput), and the controller, which sees every
# test's report, counts what passed.
SUITE_GROUPS = ("guest",)


def _worker(config):
    return hasattr(config, "workerinput")


def _enforce_groups(config):
    return (os.environ.get("MIRRORFS_SUITE") == "full" and not os.environ.get("MIRRORFS_ALLOW_PARTIAL")
            and not config.option.collectonly)


_group_expected = set()


@pytest.hookimpl(trylast=True)          # after -m and -k have deselected
def pytest_collection_modifyitems(session, config, items):
    # Refused before anything runs, except on xdist's workers (a worker's UsageError reaches the
    # controller as an internal error without its message): there the serial pass, which `make
    # test` runs with the same arguments and without xdist, refuses it.
    if _enforce_groups(config) and not _worker(config):
        empty = [g for g in SUITE_GROUPS if not any(item.get_closest_marker(g) for item in items)]
        if empty:
            args = " ".join(config.invocation_params.args)
            raise pytest.UsageError(
                f"make test selected no {', '.join(empty)} tests (pytest arguments: {args!r}); "
                "set MIRRORFS_ALLOW_PARTIAL=1 to run part of the suite on purpose")
    if _worker(config) and config.getvalue("loadgroup"):
        _check_grouped(items)
    which = config.getoption("mfs_pass")
    other = [item for item in items if not _in_pass(item, which)]
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = [item for item in items if _in_pass(item, which)]
    _group_expected.update(g for g in SUITE_GROUPS if any(item.get_closest_marker(g) for item in items))


def _check_grouped(items):
    """xdist's loadgroup groups a test by a suffix ("@ceph") its worker appends to the test's id
    during collection (before this trylast hook); the controller schedules by that id. A pytest
    on which that append no longer takes (9.2 with xdist 3.8: pytest-xdist issue #1386) ignores
    every group without a word: the Ceph tests then start a cluster on every worker, and guests
    run side by side. Each such test fails at its setup, before its fixtures start anything (a
    worker's UsageError would reach the controller without its message)."""
    for item in items:
        lost = [m.args[0] for m in item.iter_markers("xdist_group")
                if not item.nodeid.endswith(f"@{m.args[0]}")]
        if lost:
            item.stash[_ungrouped] = lost[0]


_ungrouped = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    group = item.stash.get(_ungrouped, None)
    if group is not None:
        pytest.fail(f"--dist loadgroup ignored the group {group!r} (it would run on every worker): "
                    "this pytest-xdist does not support this pytest (pyproject.toml pins pytest "
                    "below 9.2; run 'make setup')", pytrace=False)


@pytest.hookimpl(optionalhook=True)     # xdist's controller: a worker is done
def pytest_testnodedown(node, error):
    _group_expected.update(getattr(node, "workeroutput", {}).get("mfs_groups", ()))


_group_passed = {g: 0 for g in SUITE_GROUPS}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        for g in SUITE_GROUPS:
            if g in report.keywords:
                _group_passed[g] += 1


def pytest_sessionfinish(session, exitstatus):
    if _worker(session.config):
        session.config.workeroutput["mfs_groups"] = sorted(_group_expected)
        return
    if not _enforce_groups(session.config) or exitstatus != pytest.ExitCode.OK:
        return
    empty = [g for g, n in _group_passed.items() if g in _group_expected and not n]
    if empty:
        session.config.get_terminal_writer().line(
            f"make test: no {', '.join(empty)} test passed (skipped?): the run does not count", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
    """No process a test started outlives it: a new descendant of this process (an xdist worker's
    own, never another worker's: each is a process of its own), or an nbdkit / qemu-* whose
    command line names the test's own work directory (one that left our tree, as a daemon does).
    The session's Ceph cluster is not a leak: its tests share one worker (`--dist loadgroup`)."""
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


# Images, servers, the migration workflow.

@pytest.fixture
def chains(workdir):
    return Chains(workdir)


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


@pytest.fixture
def migration(workdir, serve):
    return MigrationSetup(workdir, serve)


@pytest.fixture
def processes():
    """Start `mirrorfs ARGS` in the background (lib.served.Background); all stopped after the test,
    the latest first (migrations before the exports they borrowed from)."""
    started = []

    def start(*args, **kw):
        p = Background(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in reversed(started):         # migrations before the exports they borrowed from
        p.stop()


@pytest.fixture(autouse=True)
def no_writer_left():
    """Whatever a test did, no reconnecting writer (lib.reconnecting) outlives it."""
    yield
    for writer in ReconnectingWriter.live:
        writer._stop.set()
        if writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.wait()
        Path(writer._out).unlink(missing_ok=True)
    ReconnectingWriter.live.clear()


@pytest.fixture
def host_service(workdir):
    """An unstarted `mirrorfs host` (lib.hostservice) with the test's own registry and run
    directory; stopped at the end, with every disk's daemon, whatever the test did to them."""
    host = HostService(workdir)
    yield host
    host.close()
