"""The registry of named disks (mirrorfs/host/registry.py): records made, changed and refused, on real
image files; a loan's life; a damaged record refused in one line naming its file; two processes
racing for one name."""

import json
import os
import subprocess
import sys

import pytest

from lib.images import make_base, make_overlay
from mirrorfs.errors import UsageError
from mirrorfs.host import registry as reg
from mirrorfs.host.registry import RecordError, Registry


@pytest.fixture
def disks(tmp_path):
    return Registry(tmp_path / "disks")


def _chain(*images, fmt="qcow2"):
    return [{"path": str(p), "format": fmt} for p in images]


def test_add_records_the_chain_with_every_layer_format(tmp_path, disks):
    base = make_base(tmp_path / "base.raw", fmt="raw")
    top = make_overlay(tmp_path / "top.qcow2", base, backing_fmt="raw")
    record = disks.add("vm1", top, tmp_path / "vm1.sock")
    assert record["chain"] == [{"path": str(top), "format": "qcow2"},
                               {"path": str(base), "format": "raw"}]
    assert record == disks.get("vm1")
    assert record["generation"] == 1 and record["history"][-1]["event"] == "added"
    assert len(record["id"]) == 16 and record["lent"] is None
    assert reg.top(record) == str(top)
    assert oct(os.stat(disks.file("vm1")).st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("name", ["", "-x", ".x", "a/b", "a b", "x" * 65, "é"])
def test_bad_names_are_refused(tmp_path, disks, name):
    base = make_base(tmp_path / "base.qcow2")
    with pytest.raises(UsageError, match="disk name"):
        disks.add(name, base, tmp_path / "s.sock")


def test_an_image_or_socket_of_another_disk_is_refused(tmp_path, disks):
    base = make_base(tmp_path / "base.qcow2")
    top = make_overlay(tmp_path / "top.qcow2", base)
    other = make_base(tmp_path / "other.qcow2")
    disks.add("vm1", top, tmp_path / "vm1.sock")
    with pytest.raises(UsageError, match="exists already"):
        disks.add("vm1", other, tmp_path / "x.sock")
    # The base is vm1's (a layer of its chain), through a symlink too.
    os.symlink(base, tmp_path / "alias.qcow2")
    for image in (base, top, tmp_path / "alias.qcow2"):
        with pytest.raises(UsageError, match=rf"belongs to the disk vm1 \(chain {top} <- {base}\)"):
            disks.add("vm2", image, tmp_path / "vm2.sock")
    with pytest.raises(UsageError, match="socket .* is the disk vm1"):
        disks.add("vm2", other, tmp_path / "vm1.sock")
    assert disks.add("vm2", other, tmp_path / "vm2.sock")["name"] == "vm2"
    assert disks.owner(base)[1] == "current" and disks.owner(tmp_path / "nothing") is None


def test_a_damaged_record_is_refused_in_one_line_naming_its_file(tmp_path, disks):
    base = make_base(tmp_path / "base.qcow2")
    disks.add("vm1", base, tmp_path / "vm1.sock")
    path = disks.file("vm1")
    good = path.read_text()
    cases = {
        "checksum mismatch": good.replace('"size": ', '"size": 1'),
        "not JSON": good[:len(good) // 2],
        "unknown record format": json.dumps({**json.loads(good), "format": "mirrorfs-disk/9"}),
    }
    for why, text in cases.items():
        path.write_text(text)
        with pytest.raises(RecordError) as e:
            disks.get("vm1")
        assert str(path) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    # A record renamed by hand is not the disk its file name says.
    path.write_text(good)
    os.rename(path, disks.file("vm9"))
    with pytest.raises(RecordError, match="the record is of the disk 'vm1', not 'vm9'"):
        disks.get("vm9")
    good_records, bad = disks.scan()
    assert good_records == [] and [p for p, _ in bad] == [disks.file("vm9")]
    # While a record cannot be read, nobody can tell whose its images are: add refuses.
    with pytest.raises(RecordError, match="vm9.json"):
        disks.add("vm2", make_base(tmp_path / "b2.qcow2"), tmp_path / "vm2.sock")


def _loan(tmp_path, disks, pid=None, migration="m1"):
    base = make_base(tmp_path / "base.qcow2")
    disks.add("vm1", base, tmp_path / "vm1.sock")
    src = make_overlay(tmp_path / "src.qcow2", base)
    (tmp_path / "dst").mkdir(exist_ok=True)
    dbase = make_base(tmp_path / "dst" / "base.qcow2")
    dst = make_overlay(tmp_path / "dst" / "snap.qcow2", dbase)
    disks.lend("vm1", migration=migration, pid=pid or os.getpid(), control="/x.ctl", state_dir=None,
               source=_chain(src, base), destination=_chain(dst, dbase))
    return base, src, dst, dbase


def test_pivot_and_hand_back_retire_the_source(tmp_path, disks):
    base, src, dst, dbase = _loan(tmp_path, disks)
    with pytest.raises(UsageError, match="lent to migration m1 .* already"):
        disks.lend("vm1", migration="m2", pid=os.getpid(), control=None, state_dir=None,
                   source=_chain(src, base), destination=_chain(dst, dbase))
    with pytest.raises(UsageError, match="lent to migration m1"):
        disks.remove("vm1")
    assert disks.owner(dst)[1] == "lent destination"
    record = disks.switched("vm1", "m1")
    assert reg.paths(record["chain"]) == [str(dst), str(dbase)]
    assert record["lent"]["serving"] == "destination"
    with pytest.raises(UsageError, match="does not hold its writes"):
        disks.returned("vm1", "m1", _chain(src, base))
    record = disks.returned("vm1", "m1", _chain(dst, dbase))
    assert record["lent"] is None
    assert {r["path"] for r in record["retired"]} == {str(src), str(base)}
    for image in (src, base):
        with pytest.raises(UsageError, match=rf"belongs to the disk vm1 \(chain {dst} <- {dbase}\) "
                                             r"\(retired\)"):
            disks.add("old", image, tmp_path / "old.sock")
    assert [e["event"] for e in record["history"]] == ["added", "lent", "switched", "handed-back"]
    assert record["generation"] == 4
    disks.remove("vm1")
    assert disks.names() == []


def test_cancel_and_hand_back_retire_the_destination(tmp_path, disks):
    base, src, dst, dbase = _loan(tmp_path, disks)
    record = disks.cancelled("vm1", "m1")
    assert reg.paths(record["chain"]) == [str(src), str(base)]
    record = disks.returned("vm1", "m1", _chain(src, base))
    assert {r["path"] for r in record["retired"]} == {str(dst), str(dbase)}


def test_a_dead_borrower_is_taken_back_and_its_resume_refused(tmp_path, disks):
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        base, src, dst, dbase = _loan(tmp_path, disks, pid=dead.pid)
        with pytest.raises(UsageError, match="is alive"):
            disks.taken_back("vm1", "m1")
    finally:
        dead.kill()
        dead.wait()
    assert not reg.borrower_alive(disks.get("vm1")["lent"])
    # Another migration may not take over a dead loan; the same one may (a resume).
    with pytest.raises(UsageError, match="whose process .* died"):
        disks.lend("vm1", migration="m2", pid=os.getpid(), control=None, state_dir=None,
                   source=_chain(src, base), destination=_chain(dst, dbase))
    record = disks.lend("vm1", migration="m1", pid=os.getpid(), control="/y.ctl", state_dir="/st",
                        source=_chain(src, base), destination=_chain(dst, dbase))
    assert record["lent"]["control"] == "/y.ctl" and reg.borrower_alive(record["lent"])
    # It dies again (a pid of a process that is gone): the host takes the disk back on the source.
    record["lent"]["start"] = -1
    with disks.locked():
        disks._save(record, "test")
    record = disks.taken_back("vm1", "m1")
    assert reg.paths(record["chain"]) == [str(src), str(base)] and record["lent"] is None
    assert {r["path"] for r in record["retired"]} == {str(dst), str(dbase)}
    with pytest.raises(UsageError, match=r"taken back from migration m1 at .* the state in /st is stale"):
        disks.lend("vm1", migration="m1", pid=os.getpid(), control=None, state_dir="/st",
                   source=_chain(src, base), destination=_chain(dst, dbase))


def test_taking_back_before_the_source_overlay_exists_keeps_the_old_chain(tmp_path, disks):
    base, src, dst, dbase = _loan(tmp_path, disks)
    record = disks.get("vm1")
    record["lent"]["start"] = -1
    with disks.locked():
        disks._save(record, "test")
    src.unlink()
    record = disks.taken_back("vm1", "m1")
    assert reg.paths(record["chain"]) == [str(base)]


def test_after_the_switch_a_dead_borrower_is_taken_back_on_the_destination(tmp_path, disks):
    base, src, dst, dbase = _loan(tmp_path, disks)
    disks.switched("vm1", "m1")
    record = disks.get("vm1")
    record["lent"]["start"] = -1
    with disks.locked():
        disks._save(record, "test")
    record = disks.taken_back("vm1", "m1")
    assert reg.paths(record["chain"]) == [str(dst), str(dbase)]
    assert {r["path"] for r in record["retired"]} == {str(src), str(base)}


# Each adder announces itself in `meeting` (arrived.PID), and holds the registry's critical
# section (after the name's check, before the record is written: `_refuse_owned`) until every
# other adder is either there too (inside.PID) or blocked on the registry's flock (/proc/locks's
# `->` lines). With the lock, the first one in finds the others blocked and goes on; without it,
# all four pass the name's check before any writes: the race is hit every run, not when the
# scheduler happens to interleave them.
ADD = """
import os, sys, time
from pathlib import Path
from mirrorfs.host.registry import Registry
from mirrorfs.errors import Error
path, image, socket, meeting, count = sys.argv[1:4] + [Path(sys.argv[4]), int(sys.argv[5])]
me = os.getpid()
real = Registry._refuse_owned


def blocked():
    with open("/proc/locks") as f:
        return {int(line.split()[5]) for line in f if " -> FLOCK " in line}


def meet(self, *args, **kwargs):
    (meeting / f"inside.{me}").touch()
    deadline = time.monotonic() + 120
    while True:
        names = os.listdir(meeting)
        arrived = {int(n.split(".")[1]) for n in names if n.startswith("arrived.")}
        inside = {int(n.split(".")[1]) for n in names if n.startswith("inside.")}
        if len(arrived) == count and arrived - {me} <= inside | blocked():
            return real(self, *args, **kwargs)
        if time.monotonic() > deadline:
            raise SystemExit("stuck: " + repr(names))
        time.sleep(0.01)


Registry._refuse_owned = meet
(meeting / f"arrived.{me}").touch()
try:
    Registry(path).add("vm1", image, socket)
    print("added")
except Error as e:
    print("refused:", e)
"""


def test_two_processes_adding_one_name_one_wins(tmp_path, disks):
    images = [make_base(tmp_path / f"b{i}.qcow2", size=1 << 20) for i in range(4)]
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", ADD, str(disks.path), str(image),
                               str(tmp_path / f"s{i}.sock"), str(meeting), str(len(images))],
                              stdout=subprocess.PIPE, text=True)
             for i, image in enumerate(images)]
    outs = [p.communicate()[0].strip() for p in procs]
    assert sorted(o.split(":")[0] for o in outs) == ["added", "refused", "refused", "refused"], outs
    assert disks.get("vm1")["generation"] == 1
