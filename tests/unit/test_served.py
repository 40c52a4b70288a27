"""The served disk's contract (mirrorfs.datapath.served) and the background copy's
(mirrorfs.datapath.background): the data path's service drives a mirror's Disk and Copier and an
evacuation's Evacuee and Hydrator through the same calls, on memory backends, and never asks which
it holds. Bytes are compared, not logs."""

import ast
import functools
import random
from pathlib import Path

import pytest

from lib.waits import wait_until
from mirrorfs.common.jsonlines import ControlError
from mirrorfs.datapath.evacuation.evacuee import Evacuee
from mirrorfs.datapath.evacuation.hydration import HydrationMap
from mirrorfs.datapath.evacuation.hydrator import Hydrator
from mirrorfs.datapath.mirror.copier import Copier
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.mirror.disk import Disk
from mirrorfs.datapath.nbdkit.service import DataPath
from mirrorfs.datapath.options import DataPathOptions
from mirrorfs.datapath.sides import sideio
from mirrorfs.datapath.sides.memory import MemoryBackend

MiB = 1 << 20
SIZE = 16 * MiB
REGION = MiB
NBDKIT = Path(__file__).resolve().parents[2] / "mirrorfs" / "datapath" / "nbdkit"

# What the status skeleton holds in either mode (datapath.served, datapath.background).
DISK_SKELETON = {"mode", "size", "in_flight", "paused", "requests", "request_bytes", "reader",
                 "writers", "sides", "ended"}
COPY_SKELETON = {"workers", "bytes_read", "bytes_zeroed", "rate_limit", "paid_bytes"}
# Each mode's own keys, which the other mode never shows (an evacuation once showed the mirror's
# "synchronized": False and "dirty_bytes": 0).
MODE_KEYS = {"mirror": {"synchronized", "dirty_bytes", "policy", "net", "lag", "switch_stalls_ms"},
             "evacuation": {"hydration"}}


def mirror(tmp_path, src, dst):
    disk = Disk(src, dst, DirtyMap(SIZE, REGION, full=True), granularity=65536)
    return disk, Copier(disk, rate=0, chunk=MiB, workers=2)


def evacuation(tmp_path, src, dst):
    hydration = HydrationMap.open(tmp_path, SIZE, REGION, flush=functools.partial(sideio.flush, dst))
    disk = Evacuee(src, dst, hydration, granularity=65536)
    return disk, Hydrator(disk, rate=0, workers=2)


@pytest.fixture(params=[mirror, evacuation], ids=["mirror", "evacuation"])
def served(request, tmp_path):
    """The data path's service holding one mode's disk and background copy, both made as
    DataPath.connect makes them (the copy held at rate 0 until set-rate); the source holds a
    pattern, the destination zeros."""
    src, dst = MemoryBackend("source", SIZE), MemoryBackend("destination", SIZE)
    src.data[:] = bytes(random.Random(29).getrandbits(8) for _ in range(251)) * (SIZE // 251) + \
        bytes(SIZE % 251)
    dp = DataPath()
    dp.options = DataPathOptions(source="nbd+unix:///?socket=/unused", io_timeout=0)
    dp.disk, dp.copier = request.param(tmp_path, src, dst)
    yield dp
    dp.close()
    assert dp.copier.wait(10), "the background copy's workers did not end after stop"


def test_the_service_drives_either_mode_through_the_same_calls(served):
    """The same sequence for both modes: capabilities, a client's changes and reads, the status
    skeleton, set-rate (the copy released), the copy's end, quiesce, close; the destination ends
    byte for byte the source with the client's changes."""
    dp, disk = served, served.disk
    caps = disk.capabilities
    assert (caps.write, caps.flush, caps.fua, caps.trim, caps.zero, caps.fast_zero,
            caps.multi_conn, caps.extents, caps.cache, caps.rotational) == (True,) * 9 + (False,)
    assert caps.block_size == (1, 4096, 32 * MiB) and disk.max_request == 32 * MiB
    dp.start_threads()
    expected = bytearray(disk.source.data)
    disk.pwrite(b"\x5a" * 3001, 3 * REGION + 4097, False)
    expected[3 * REGION + 4097:3 * REGION + 7098] = b"\x5a" * 3001
    disk.zero(REGION, 5 * REGION, True, False, False)
    expected[5 * REGION:6 * REGION] = bytes(REGION)
    disk.trim(0, 0, False)
    disk.flush()
    buf = bytearray(2 * REGION)
    disk.pread(buf, 3 * REGION)
    assert buf == expected[3 * REGION:5 * REGION]
    assert disk.extents(4096, 5 * REGION, True)
    disk.cache(4096, 0)

    status = dp.handle({"cmd": "status"})["status"]
    assert DISK_SKELETON <= set(status), DISK_SKELETON - set(status)
    assert status["size"] == SIZE and set(status["sides"]) == {"source", "destination"}
    mine = status["mode"]
    others = set().union(*(keys for mode, keys in MODE_KEYS.items() if mode != mine))
    assert MODE_KEYS[mine] <= set(status) and not set(status) & others, status
    assert COPY_SKELETON <= set(status[dp.copier.section])
    assert status[dp.copier.section]["rate_limit"] == 0 and dp.copier.copying

    reply = dp.handle({"cmd": "set-rate", "rate": None})
    assert reply["copying"] and reply["written"] >= 3001     # an evacuation counts its lock
    wait_until(lambda: not dp.copier.copying, "the background copy done", timeout=30)
    assert disk.dest.data == expected
    assert dp.handle({"cmd": "quiesce"}) == {}


@pytest.mark.parametrize("served", [mirror], ids=["mirror"], indirect=True)
def test_a_mirror_compares_its_sides(served):
    served.start_threads()
    served.handle({"cmd": "set-rate", "rate": None})
    wait_until(lambda: not served.copier.copying, "synchronized", timeout=30)
    assert served.handle({"cmd": "compare"})["identical"]


@pytest.mark.parametrize("served", [evacuation], ids=["evacuation"], indirect=True)
def test_an_evacuation_refuses_what_only_a_mirror_does(served):
    """Through the same service calls: the switch, a group's read-from and compare are refused in
    one line each (read-from was an AttributeError: the Evacuee had no such method)."""
    for request, words in (({"cmd": "switch", "to": "destination", "end": "switched"},
                            "nothing to switch"),
                           ({"cmd": "read-from", "to": "destination"}, "nothing to switch"),
                           ({"cmd": "compare"}, "only a mirror")):
        with pytest.raises(ControlError, match=words):
            served.handle(request)


# The service and the callbacks never ask which disk they hold.

PROBES = {"getattr", "hasattr", "isinstance", "issubclass", "type", "vars"}
# What only the assembly (DataPath.connect and _evacuate) may name: the modes' classes, and the
# option that chooses between them.
MODE_NAMES = {"Disk", "Evacuee", "Copier", "Hydrator", "switch_first"}
ASSEMBLY = {"connect", "_evacuate"}


def names_in(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def probes(source):
    """(line, what) for every probe of the served disk or its copy in `source`: a getattr,
    hasattr, isinstance... whose arguments name `disk` or `copier`, and every mention of a mode's
    class or of switch_first outside the assembly."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in PROBES and \
                names_in(ast.Tuple(elts=node.args, ctx=ast.Load())) & {"disk", "copier"}:
            found.append((node.lineno, ast.unparse(node)))
    assembly = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ASSEMBLY:
            assembly |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in assembly or isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        name = node.id if isinstance(node, ast.Name) else node.attr \
            if isinstance(node, ast.Attribute) else None
        if name in MODE_NAMES:
            found.append((node.lineno, name))
    return found


@pytest.mark.parametrize("module", ["service.py", "callbacks.py"])
def test_the_service_and_callbacks_never_ask_which_disk_they_hold(module):
    assert probes((NBDKIT / module).read_text()) == []


def test_the_probe_check_sees_a_probe():
    """The check above, shown a service that asks (as service.py did before the contract)."""
    asking = ('class DataPath:\n'
              '    def connect(self):\n'
              '        self.disk = Evacuee() if self.options.switch_first else Disk()\n'
              '    def start_threads(self):\n'
              '        if getattr(self.disk, "copy_on_read", None) is not None:\n'
              '            self.disk.copy_on_read.start()\n'
              '    def status(self):\n'
              '        return "hydrator" if self.options.switch_first else "copy"\n')
    assert [line for line, _ in probes(asking)] == [5, 8]


def test_what_the_service_and_callbacks_ask_of_the_disk_both_modes_have(tmp_path):
    """Every attribute service.py and callbacks.py read of the disk (`self.disk.X`,
    `conn.disk.X`) and of its capabilities, on a Disk and on an Evacuee alike."""
    asked, capabilities = set(), set()
    for module in ("service.py", "callbacks.py"):
        for node in ast.walk(ast.parse((NBDKIT / module).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "disk":
                asked.add(node.attr)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "capabilities":
                capabilities.add(node.attr)
    assert {"capabilities", "pread", "pwrite", "status", "stop", "start"} <= asked, asked
    for make in (mirror, evacuation):
        disk, _ = make(tmp_path, MemoryBackend("source", SIZE), MemoryBackend("destination", SIZE))
        missing = {a for a in asked if not hasattr(disk, a)} | \
            {c for c in capabilities if not hasattr(disk.capabilities, c)}
        assert missing == set(), f"{type(disk).__name__} lacks {missing}"
