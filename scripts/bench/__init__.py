"""The benchmarks (`make bench`; docs/PERFORMANCE.md has their numbers). Run from the checkout's
root as modules of this package, `python -m scripts.bench[.NAME]`: no `sys.path` edits, and sizes
are read by the project's own parser (mirrorfs.common.sizes).

    __main__   the local bench: every target, the fio matrix, the extras (`python -m scripts.bench`)
    remote     the destination remote: delayed NBD and a one-node Ceph cluster (tests/lib/ceph.py)
    lifecycle  a client's waits at take-over, hand-back and restarts; the export's speed
    evacuate   an evacuation's hydration against `qemu-img convert`, a client during and after it
    host       what scraping the host's metrics costs the data path
    named      300 named disks under `mirrorfs host`: memory, start, list, a scrape, a kill -9
    lag        --lag (issue #28): a slow destination with and without a bounded lag; the rate case
    group      a group's switch: its holds against one disk's, and what its safety net costs
    copyloop   the one copy of a range: the base copy's and the copier's throughput and CPU
    lagcost    what a 4 KiB write costs the interpreter with and without --lag, counted: calls, locks, libnbd calls

and the pieces they share:

    common     units, the mirrorfs command, tools run with a deadline, the command line's helpers
    regime     which regime a run measures: the storage's IOPS against one interpreter's ceiling
    images     the base and overlays every target serves, qemu-storage-daemon exports of them
    targets    the ways to serve the disk: mirrorfs, mirrorfs-1d, direct, qemu-mirror, nbd-proxy
    fio        the fio jobs, fio's command line over NBD, one job's run and numbers
    cpu        where the CPU goes: each process's CPU per request (--cpu)
    matrix     every job on every target, K runs, medians and ratios
    extras     outside the matrix: the base copy, the switch's stall, nbdkit's memory
    report     the report as a person reads it
"""
