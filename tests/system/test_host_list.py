"""One host, many disks: every mirrorfs process registers in the run directory, `mirrorfs list` shows
each with its phase, and a process killed with -9 disappears from the list (mirrorfs.host.rundir)."""

import json
import os
import signal
import subprocess

import psutil
import pytest

from lib.commands import MIRRORFS, run
from lib.images import MiB, make_base, make_full_pair
from lib.processes import kill_mirrorfs


def listed(rundir):
    res = run(*MIRRORFS, "list", "--json", "--run-dir", rundir)
    return json.loads(res.stdout)


def test_six_disks_in_one_list_and_a_killed_one_disappears(workdir, processes):
    rundir = workdir / "run"
    exports, migrations = [], []
    for name in ("a", "b"):
        (workdir / name).mkdir()
        (workdir / f"{name}-dst").mkdir()
        image = make_base(workdir / name / "vm.qcow2", 16 * MiB)
        exports.append(processes(workdir, f"export-{name}", "export", image,
                                 "--socket", workdir / f"{name}.sock", rundir=rundir))
    for name in ("a", "b"):
        migrations.append(processes(workdir, f"migration-{name}", "start", "--take-over",
                                    workdir / f"{name}.sock.ctl", "--dest-dir",
                                    workdir / f"{name}-dst", rundir=rundir))
    serves = []
    for name in ("c", "d"):
        (workdir / name).mkdir()
        src, dst = make_full_pair(workdir / name, 16 * MiB)
        serves.append(processes(workdir, f"serve-{name}", "serve", src, dst,
                                "--socket", workdir / f"{name}.sock", rundir=rundir))

    disks = {d["pid"]: d for d in listed(rundir)}
    assert len(disks) == 6, disks
    # A migration serves its export's socket: each of those sockets is listed twice.
    sockets = sorted(d["socket"] for d in disks.values())
    assert sockets == sorted([f"{workdir}/{n}.sock" for n in "aabbcd"]), sockets
    by_kind = {}
    for d in disks.values():
        by_kind.setdefault(d["kind"], []).append(d)
    assert sorted(by_kind) == ["export", "migration", "mirror"]
    assert [d["phase"] for d in by_kind["export"]] == ["lent", "lent"]
    assert [d["phase"] for d in by_kind["migration"]] == ["mirroring", "mirroring"]
    assert [d["phase"] for d in by_kind["mirror"]] == ["synchronized", "synchronized"]
    # Who holds whom: each export is lent to its migration, each migration took over its export.
    pids = disks
    for export in by_kind["export"]:
        holder = pids[export["lent_to"]["pid"]]
        assert holder["kind"] == "migration" and holder["socket"] == export["socket"]
        assert holder["taken_over_from"]["pid"] == export["pid"]
    assert all(set(d["errors"]) == {"source", "destination"} for d in by_kind["mirror"])

    # The text form: a header, one line per disk.
    text = run(*MIRRORFS, "list", "--run-dir", rundir).stdout.splitlines()
    assert text[1].split()[:3] == ["SOCKET", "KIND", "PHASE"] and len(text) == 2 + 6, text

    # A serve killed with -9 (nobody left to unregister it) is gone from the next list.
    victim = serves[0]
    kill_mirrorfs(victim.proc.pid)
    serves_left = [d for d in listed(rundir) if d["kind"] == "mirror"]
    assert [d["socket"] for d in serves_left] == [f"{workdir}/d.sock"]
    assert not (rundir / "disks" / f"{victim.proc.pid}.json").exists()
    # ...and one stopped in order unregisters itself.
    assert serves[1].stop() == 0
    assert len(listed(rundir)) == 4


def test_list_watch_refreshes_until_interrupted(workdir, processes, host_run_dir):
    src, dst = make_full_pair(workdir, 16 * MiB)
    processes(workdir, "serve", "serve", src, dst, "--socket", workdir / "d.sock")
    proc = psutil.Popen([*MIRRORFS, "top", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        proc.stdout.close()
    # The default run dir is $MIRRORFS_RUN_DIR (conftest: the test's own), and each refresh is
    # one JSON line.
    assert all(json.loads(line)[0]["socket"] == f"{workdir}/d.sock" for line in lines), lines


# Bad input: one line, a distinct non-zero exit, nothing started.

def fails(*args, expect, status=2, env=None):
    res = subprocess.run([*MIRRORFS, *map(str, args)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120, env=env)
    assert res.returncode == status, (res.returncode, res.stderr)
    assert res.stderr.startswith("mirrorfs: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert expect in res.stderr, res.stderr
    return res


def test_a_run_dir_that_is_a_file_or_writable_by_others_is_refused(workdir, chains):
    afile = workdir / "file"
    afile.write_text("")
    open_dir = workdir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    for bad, expect in ((afile, "is not a directory"), (open_dir, "is writable by others")):
        fails("serve", chains.source, chains.dest, "--socket", workdir / "d.sock",
              "--run-dir", bad, expect=expect)
        fails("list", "--run-dir", bad, expect=expect)
        fails("budget", "set", "400M", "--run-dir", bad, expect=expect)
    assert not (workdir / "d.sock").exists()
    # Through the environment too.
    fails("list", expect="is writable by others", env=dict(os.environ, MIRRORFS_RUN_DIR=str(open_dir)))


@pytest.mark.parametrize("rate,expect", [("0", "budget set '0': below 1 byte/s"),
                                         ("0.5", "budget set '0.5': below 1 byte/s"),
                                         ("100", "budget set '100': a rate needs a unit: 100M"),
                                         ("fast", "budget"), ("-5M", "-5M")])
def test_a_budget_of_nothing_or_of_words_is_refused(workdir, rate, expect):
    fails("budget", "set", rate, "--run-dir", workdir / "run", expect=expect)
    assert not (workdir / "run" / "budget.json").exists()


def test_two_metrics_servers_on_one_port(workdir):
    with Process_metrics(workdir) as first:
        fails("metrics", "--listen", first.listen, "--run-dir", workdir / "run",
              expect="Address already in use", status=1)
        fails("metrics", "--listen", first.sock, "--run-dir", workdir / "run",
              expect="another server listens there")


class Process_metrics:
    """`mirrorfs metrics` on a free loopback port and on a unix socket."""

    def __init__(self, workdir):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.listen = f"127.0.0.1:{port}"
        self.sock = workdir / "metrics.sock"
        self.procs = [psutil.Popen([*MIRRORFS, "metrics", "--listen", where, "--run-dir",
                                    workdir / "run"], stdout=subprocess.PIPE, text=True)
                      for where in (self.listen, self.sock)]
        for p in self.procs:
            assert p.stdout.readline().startswith("metrics "), p.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
            assert p.wait(30) == 0
            p.stdout.close()
