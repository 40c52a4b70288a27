"""A real one-node Ceph cluster, private to one directory: for the tests (marker `ceph`) and the bench.

    with CephCluster("/tmp/ceph-xyz") as cluster:       # about 15 s to HEALTH_OK on 2 cores
        cluster.rbd("create", "--size", "64M", "rbd/vm1")
        qemu-img info "rbd:rbd/vm1:conf=/tmp/ceph-xyz/ceph.conf"

One monitor, one manager, one OSD on BlueStore backed by a sparse 8 GiB file, a pool `rbd` of size 1.
Everything (configuration, keyrings, data, logs, admin sockets, the monitor's port) lives in the
directory or is picked free for this run, so that several runs on one machine never meet, and nothing
in /etc/ceph or /var/lib/ceph is read or written. Debian 12's ceph 16.2 daemons run here without
systemd: each is started in the foreground (-f) as our child, with SIGTERM from the kernel when we die
(mirrorfs.system.children), and `stop()` kills them all; a failed start stops what it started.

Clients need the configuration: `conf=` in an `rbd:` spec, or CEPH_CONF (`cluster.env`).
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

from mirrorfs.system.children import Child

PACKAGES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-common", "qemu-block-extra")
TOOLS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")
POOL = "rbd"


class CephError(Exception):
    pass


def free_port():
    """A port nobody listens on now. The monitor binds it a moment later; another run taking it in
    between would make the monitor fail at once (and the start with it), not hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
mon initial members = a
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {root}/keyrings/$name.keyring
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
pid file = {root}/run/$name.pid
crash dir = {root}/crash
log to stderr = false
err to stderr = true
# One OSD: every replica is on it, and CRUSH must not look for other hosts.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
# Pool usage reaches the monitor every `mgr stats period` and quotas are checked every tick (5 s
# each by default): a test of a full pool should not wait for them.
mgr stats period = 1
mon tick interval = 1
auth allow insecure global id reclaim = false
# The host disk may be under 30 % free: the default warning would keep the cluster in HEALTH_WARN.
mon data avail warn = 1
mon data avail crit = 0

[mon]
mon data = {root}/mon/$cluster-$id

[mgr]
mgr data = {root}/mgr/$cluster-$id
# Modules the manager loads by default but this machine has no use for (and some lack Debian
# packages without recommends); the manager is here for `ceph -s`'s PG states.
mgr disabled modules = dashboard prometheus restful influx telegraf zabbix

[osd]
osd data = {root}/osd/$cluster-$id
osd objectstore = bluestore
# A sparse file in the OSD's directory (bluestore creates it at mkfs), not a device.
bluestore block create = true
bluestore block size = {block_size}
bluestore fsck on mount = false
# The default target is 4 GiB; the machine is shared with other test runs.
osd memory target = 1073741824
osd max object name len = 460
osd max object namespace len = 64
"""


class CephCluster:
    """A one-node cluster in `root` (created if missing). `start()` returns once a pool `rbd` is
    usable; `stop()` kills every daemon and is safe to call twice or after a failed start."""

    def __init__(self, root, block_size=8 << 30):
        self.root = Path(root).absolute()
        self.block_size = block_size
        self.conf = self.root / "ceph.conf"
        self.admin_keyring = self.root / "keyrings" / "client.admin.keyring"
        self.fsid = str(uuid.uuid4())
        self.port = None
        self.daemons = {}           # "mon.a", "mgr.x", "osd.0" -> Child

    @property
    def env(self):
        """The environment a client (ceph, rbd, qemu-img, qemu-storage-daemon) finds the cluster in."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def spec(self, image, pool=POOL):
        """The `rbd:` spec of an image of this cluster, as qemu-img and mirrorfs take it."""
        return f"rbd:{pool}/{image}:conf={self.conf}"

    # Commands.

    def run(self, *argv, timeout=60, check=True):
        argv = [str(a) for a in argv]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                                 stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CephError(f"{' '.join(argv)}: no answer in {timeout}s") from None
        if check and res.returncode != 0:
            raise CephError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def ceph(self, *args, timeout=60, check=True):
        return self.run("ceph", "-c", self.conf, "--connect-timeout", "20", *args,
                        timeout=timeout, check=check).stdout

    def rbd(self, *args, timeout=60):
        return self.run("rbd", "-c", self.conf, *args, timeout=timeout).stdout

    def digest(self, image, pool=POOL):
        """SHA-256 of an image's whole content (rbd export), to show that nothing changed it."""
        res = subprocess.run(["rbd", "-c", str(self.conf), "export", f"{pool}/{image}", "-"],
                             capture_output=True, env=self.env, stdin=subprocess.DEVNULL, timeout=120)
        if res.returncode != 0:
            raise CephError(f"rbd export {pool}/{image} failed: {res.stderr.decode().strip()}")
        return hashlib.sha256(res.stdout).hexdigest()

    def pool_flags(self, pool):
        """The flags the OSD map gives `pool` ("full", "full_quota", ...)."""
        for found in json.loads(self.ceph("osd", "pool", "ls", "detail", "-f", "json")):
            if found["pool_name"] == pool:
                return set(found["flags_names"].split(","))
        raise CephError(f"no pool {pool}")

    def wait_pool(self, pool, full, timeout=60):
        """Until the monitor has marked `pool` full (or, full=False, no longer full), and the OSD
        has the map that says so: an OSD a map behind still takes writes into a pool the monitor
        already calls full (a CI run's copy went through there, under load)."""
        self._wait(lambda: ("full" in self.pool_flags(pool)) == full,
                   f"pool {pool} {'full' if full else 'not full'}", timeout)
        epoch = json.loads(self.ceph("osd", "dump", "-f", "json"))["epoch"]
        self._wait(lambda: json.loads(self.ceph("tell", "osd.0", "status", "-f", "json"))
                   ["newest_map"] >= epoch, f"the OSD at map {epoch}", timeout)

    def pids(self):
        return {child.pid for child in self.daemons.values() if child.alive()}

    # Start and stop.

    def start(self, timeout=120):
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise CephError(f"missing {', '.join(missing)} (Debian packages {' '.join(PACKAGES)}; "
                            "run 'make setup')")
        try:
            self._bootstrap()
            self.wait_healthy(timeout)
            self.ceph("osd", "pool", "create", POOL, "8")
            self.rbd("pool", "init", POOL)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _bootstrap(self):
        for d in ("keyrings", "run", "log", "crash", "mon", "mgr/ceph-x", "osd/ceph-0"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf.write_text(CONF.format(fsid=self.fsid, port=self.port, root=self.root,
                                         block_size=self.block_size))
        keyrings = self.root / "keyrings"
        mon_keyring = keyrings / "mon.keyring"
        self.run("ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.",
                 "--cap", "mon", "allow *")
        self.run("ceph-authtool", "--create-keyring", self.admin_keyring, "--gen-key",
                 "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                 "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
        self.run("ceph-authtool", mon_keyring, "--import-keyring", self.admin_keyring)
        monmap = self.root / "monmap"
        self.run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                 f"[v2:127.0.0.1:{self.port}]", monmap)
        self.run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap,
                 "--keyring", mon_keyring)
        self._daemon("mon.a")

        self.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *",
                  "mds", "allow *", "-o", keyrings / "mgr.x.keyring")
        self._daemon("mgr.x")

        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"ceph osd new gave id {osd_id!r}, expected 0")
        self.ceph("auth", "get-or-create", "osd.0", "mon", "allow profile osd",
                  "mgr", "allow profile osd", "osd", "allow *", "-o", keyrings / "osd.0.keyring")
        self.run("ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
                 timeout=120)
        self.start_osd()

    def _daemon(self, name):
        kind, ident = name.split(".")
        child = Child(f"ceph-{kind} ({name})", [f"ceph-{kind}", "-f", "-c", self.conf, "-i", ident],
                      self.root / "log" / f"{name}.stderr", env=self.env)
        self.daemons[name] = child
        child.start()
        return child

    def start_osd(self):
        """Start (or restart) the OSD; returns once the monitor sees it up."""
        self.daemons.pop("osd.0", None)
        self._daemon("osd.0")
        # 180 s: a restarted OSD came up in 5-20 s on a quiet machine, and once not within 60 s
        # in a parallel pass of four workers (which left the session's cluster unusable).
        self._wait(lambda: '"num_up_osds":1' in self.ceph("osd", "stat", "-f", "json")
                   .replace(" ", ""), "the OSD up", 180)

    def stop_osd(self):
        """Stop the OSD the way an operator or a crash would take it away: its PGs become inactive,
        and clients' I/O waits for it (RADOS does not fail it)."""
        osd = self.daemons.pop("osd.0")
        osd.stop(timeout=30)
        # Tell the monitor now rather than after the heartbeat grace (20 s): what a clean
        # shutdown does when it reaches the monitor in time.
        self.ceph("osd", "down", "0", check=False)

    def healthy(self):
        """HEALTH_OK, and every PG active+clean: right after a pool is made, health is OK while
        the manager still reports its PGs as unknown, and I/O to them would wait."""
        status = json.loads(self.ceph("status", "-f", "json"))
        pgs = status["pgmap"]
        clean = sum(s["count"] for s in pgs.get("pgs_by_state", [])
                    if s["state_name"] == "active+clean")
        return (status["health"]["status"] == "HEALTH_OK" and pgs["num_pgs"] > 0
                and clean == pgs["num_pgs"])

    def wait_healthy(self, timeout=120):
        self._wait(self.healthy, "HEALTH_OK with every PG active+clean", timeout)

    def _wait(self, ready, what, timeout):
        deadline = time.monotonic() + timeout
        while True:
            for name, child in self.daemons.items():
                if child.died():
                    raise CephError(f"{name} died: {child.log_tail(5)}")
            try:
                if ready():
                    return
            except CephError:
                pass
            if time.monotonic() > deadline:
                status = self.ceph("status", check=False, timeout=30)
                raise CephError(f"not {what} after {timeout}s: {status}")
            time.sleep(0.5)

    def stop(self):
        """Kill every daemon: the cluster's data is thrown away with the directory, so there is
        nothing to shut down cleanly, and SIGKILL cannot hang on a monitor the OSD waits for."""
        for name in ("osd.0", "mgr.x", "mon.a"):
            child = self.daemons.pop(name, None)
            if child is not None and child.proc is not None:
                child.stopping = True
                if child.proc.poll() is None:
                    child.proc.kill()
                child.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
