"""fio's nbd engine through the served disk: writes verified by reading back, both sides identical."""

import json

import pytest

from lib.commands import run
from lib.images import images_identical


def fio(uri, *args):
    res = run("fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
              *args, check=False)
    assert res.returncode == 0, res.stderr + res.stdout
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


@pytest.mark.parametrize("bs,depth", [("4k", 16), ("64k", 8), ("1m", 4)])
def test_fio_random_writes_verify_and_sides_match(chains, serve, bs, depth):
    disk = serve(chains.source, chains.dest)
    job = fio(disk.uri, "--rw=randwrite", f"--bs={bs}", f"--iodepth={depth}", "--size=32m",
              "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=0", "--do_verify=1")
    assert job["write"]["io_bytes"] == 32 * 1024 * 1024
    assert job["read"]["io_bytes"] > 0          # the verify pass read it all back
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


def test_fio_several_connections_mixed_io(chains, serve):
    disk = serve(chains.source, chains.dest)
    fio(disk.uri, "--rw=randrw", "--rwmixread=30", "--bsrange=512-256k",
        "--iodepth=8", "--numjobs=4", "--size=8m", "--offset_increment=8m", "--io_size=16m",
        "--group_reporting")
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
