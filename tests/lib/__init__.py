"""Helpers for the tests, one concern per module; tests import them by name (`from lib.images import
make_base`). pyproject.toml puts tests/ on pytest's `pythonpath`; a script adds tests/ to sys.path.

    commands     running a tool or the mirrorfs CLI (run, MIRRORFS)
    images       making and comparing images (make_base, Chains, images_identical, qemu_io, sha256)
    served       `mirrorfs serve`/`start`/`export` as running processes (Served, Process, MigrationSetup)
    control      control sockets and state: requests, status, `mirrorfs <cmd> --control`, state.json
    nbdservers   other NBD servers for URI endpoints (QemuNbd, NbdkitFilter, PausableFront)
    processes    finding, watching and killing the processes the tests start
    waits        waiting for a condition (wait_until)
    rates        copy rates from sampled byte counts (the host budget's tests)
    fio          fio's nbd engine as a load (FioLoad)
    writers      seeded writers and the model of what the disk must hold
    failures     a command that must fail cleanly (serve_fails) and a directory that must not change
    ceph         a one-node Ceph cluster; guest: the test guest; readme: the README's commands;
    tlscreds     TLS keys and certificates
"""
