"""Which regime a run measured (issue #28), and where its images live (--regime).

The same two mirrors rank differently on different storage: where the storage takes fewer small
writes than one nbdkit interpreter can pass on, both wait for the disk and mirrorfs's concurrent
fan-out to the two sides wins; where the storage is faster, both are bound by the CPU and
mirrorfs's extra hops (a Python plugin, a second daemon) lose. So every run of the local bench
first measures the two numbers that decide it: the storage's own 4k qd16 IOPS and one
interpreter's ceiling.
"""

import shutil
from pathlib import Path

from mirrorfs.system import sockets
from mirrorfs.system.children import Child

from .common import FIO_GRACE, GiB, MIRRORFS, WORK_PARENT, run_tool, wait_for_output
from .fio import fio_argv, parse_fio

PROBE_RUNTIME = 3           # seconds of each probe

# --regime: where the images live and how the daemons open them. auto: the work directory's
# parent with --cache (itself auto: none where that directory allows O_DIRECT).
REGIMES = ("auto", "disk", "fast", "both")
REGIME_PLACES = {"disk": ("/tmp", "none"), "fast": ("/dev/shm", "writeback")}


def places(regime, cache):
    """[(parent directory of the work directory, cache mode)] to run the bench in, in order."""
    if regime == "auto":
        return [(WORK_PARENT, cache)]
    return [REGIME_PLACES[r] for r in (("disk", "fast") if regime == "both" else (regime,))]


def measure_storage(workdir, cache):
    """The storage's own 4k randwrite qd16 IOPS: fio straight on a file in the work directory
    (libaio; O_DIRECT when the run's daemons use cache=none, else through the page cache), no
    NBD, no qcow2: the most any target of this run could get from it."""
    probe = Path(workdir) / "storage-probe"
    try:
        out = run_tool(["fio", "--name=storage", f"--filename={probe}", "--size=256M",
                        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--ioengine=libaio",
                        f"--direct={1 if cache == 'none' else 0}", "--time_based",
                        f"--runtime={PROBE_RUNTIME}", "--output-format=json"],
                       timeout=PROBE_RUNTIME + FIO_GRACE)
    finally:
        probe.unlink(missing_ok=True)
    return parse_fio(out)["write"]["iops"]


def measure_ceiling(workdir):
    """One interpreter's ceiling: `mirrorfs serve` with both sides in memory (source `nbdkit
    memory`, destination `nbdkit null`), one client connection, 4k randwrite qd16. Nothing waits for
    storage: the IOPS are what one nbdkit process's Python data path passes on, on this CPU."""
    d = Path(workdir) / "ceiling"
    d.mkdir()
    servers = []
    try:
        uris = []
        for name, plugin in (("src", ["memory", "1G"]), ("dst", ["null", "1G"])):
            sock = sockets.check_unix_path(d / f"{name}.sock")
            pidfile = d / f"{name}.pid"
            child = Child(f"nbdkit {plugin[0]}", ["nbdkit", "--foreground", "--exit-with-parent",
                                                  "--pidfile", pidfile, "--unix", sock, *plugin],
                          d / f"{name}.log", pidfile=pidfile)
            servers.append(child)
            child.start()
            uris.append(f"nbd+unix:///?socket={sock}")
        socket_path = sockets.check_unix_path(d / "m.sock")
        server = Child("mirrorfs serve (ceiling)", [*MIRRORFS, "serve", *uris, "--socket",
                                                    socket_path], d / "mirrorfs.log")
        servers.append(server)
        server.start()
        wait_for_output(server, "serving ")
        out = run_tool(fio_argv(f"nbd+unix:///?socket={socket_path}", GiB,
                                ("--rw=randwrite", "--bs=4k", "--iodepth=16"), PROBE_RUNTIME, 1),
                       timeout=PROBE_RUNTIME + 1 + FIO_GRACE)
        return parse_fio(out)["write"]["iops"]
    finally:
        for child in reversed(servers):
            child.stop()
        shutil.rmtree(d, ignore_errors=True)


def regime_of(storage_iops, ceiling_iops):
    """storage-bound when the storage takes fewer 4 KiB writes than one interpreter passes on."""
    return "storage-bound" if storage_iops < ceiling_iops else "CPU-bound"


def measure_regime(workdir, parent, cache, log):
    """The report's "regime": both numbers, where they were measured, and the regime's name."""
    log("the storage's own 4k randwrite qd16, and one interpreter's ceiling")
    storage_iops = measure_storage(workdir, cache)
    ceiling_iops = measure_ceiling(workdir)
    found = {"storage_iops": storage_iops, "ceiling_iops": ceiling_iops, "where": parent,
             "regime": regime_of(storage_iops, ceiling_iops)}
    log(f"  storage {storage_iops:,.0f} IOPS, ceiling {ceiling_iops:,.0f} IOPS: {found['regime']}")
    return found
