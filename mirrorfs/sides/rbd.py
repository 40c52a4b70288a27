"""Ceph RBD images as SOURCE or DEST: `rbd:POOL/IMAGE[:conf=FILE][:id=USER]`, qemu-img's spelling.

An RBD image is served like an image file: a qemu-storage-daemon that mirrorfs owns opens it with
QEMU's `rbd` block driver (Debian: qemu-block-extra, librbd1) and exports it over NBD, so the data
path never knows. Only the parts that differ from a file live here: the spec, the probe, the
daemon's block node and the client settings librados gets.

Bounded waits. librados waits 300 s for a monitor by default (client_mount_timeout), and retries
monitor commands forever; a typo in a monitor address would hang `mirrorfs serve` for five minutes.
Every librados client mirrorfs starts (qemu-img for the probe, the storage daemon) gets
CEPH_ARGS with both bounded to MON_TIMEOUT seconds: librados reads CEPH_ARGS when the client is
created and, as command-line settings, they win over the configuration file.

What is deliberately *not* bounded: I/O to the OSDs (rados_osd_op_timeout). An OSD that goes away
makes librbd wait, and the write completes when the OSD is back; mirrorfs's --io-timeout cuts the
NBD connection to the destination meanwhile and records the region as dirty. With an OSD timeout
librbd would fail the write instead, but a write that timed out may still be applied by an OSD later,
after mirrorfs copied the region again, and leave the destination silently different. Waiting
keeps librbd's per-object ordering: the copy of the region is queued behind the stale write.
"""

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mirrorfs.system import children as processes
from mirrorfs.common.sizes import human_size
from mirrorfs.errors import ImageError, UsageError

PREFIX = "rbd:"
MON_TIMEOUT = 10        # seconds: reaching a monitor, and each monitor command
# Options of the spec we understand; qemu-img accepts any librados setting there, but mirrorfs
# names the image in its state and messages, and keeps what it passes to QEMU to what it checks.
OPTIONS = ("conf", "id")


@dataclass(frozen=True)
class RbdImage:
    """An RBD image; the attributes an image file's ImageInfo has, for the code that serves both."""
    pool: str
    name: str
    conf: Path | None = None        # absolute; None: librados's default (CEPH_CONF, /etc/ceph)
    user: str | None = None         # the cephx id (client.USER); None: admin
    virtual_size: int = 0
    format: str = "raw"             # what QEMU serves on top of the rbd node
    cluster_size: int | None = None  # no clusters: the locks' unit stays the other side's

    @property
    def path(self):
        """How mirrorfs names the image in its state and messages: pool, image, and the cluster's
        configuration file, which tells clusters apart (the same pool/image names on an old and a
        new cluster are two images)."""
        return PREFIX + f"{self.pool}/{self.name}" + (f":conf={self.conf}" if self.conf else "")

    @property
    def chain(self):
        return (self.path,)         # an RBD image has no backing file mirrorfs would follow

    @property
    def spec(self):
        """The spec qemu-img takes."""
        return self.path + (f":id={self.user}" if self.user else "")

    def __str__(self):
        return self.path


def is_spec(spec):
    return spec.startswith(PREFIX)


def parse(label, spec):
    """`rbd:POOL/IMAGE[:conf=FILE][:id=USER]` -> RbdImage (not probed). The conf file is checked
    now: librados would silently fall back to /etc/ceph if it could not read it."""
    fields = spec[len(PREFIX):].split(":")
    pool, slash, name = fields[0].partition("/")
    if not slash or not pool or not name or "/" in name or "@" in name:
        raise UsageError(f"{label} {spec!r}: expected rbd:POOL/IMAGE[:conf=FILE][:id=USER]"
                         " (namespaces and snapshots are not supported)")
    options = {}
    for field in fields[1:]:
        key, eq, value = field.partition("=")
        if key not in OPTIONS or not eq or not value:
            raise UsageError(f"{label} {spec!r}: unknown or empty option {field!r} (supported: "
                             f"{', '.join(o + '=' for o in OPTIONS)})")
        if key in options:
            raise UsageError(f"{label} {spec!r}: {key}= given twice")
        options[key] = value
    conf = None
    if "conf" in options:
        conf = Path(options["conf"]).absolute()
        if not conf.is_file():
            raise UsageError(f"{label} {spec}: conf {conf}: no such file")
        if not os.access(conf, os.R_OK):
            raise UsageError(f"{label} {spec}: conf {conf}: permission denied")
    return RbdImage(pool=pool, name=name, conf=conf, user=options.get("id"))


def environment(base=None):
    """The environment of a librados client mirrorfs starts: the bounded waits of the docstring,
    added to what the user's CEPH_ARGS already says."""
    env = dict(os.environ if base is None else base)
    bounds = (f"--client-mount-timeout {MON_TIMEOUT} --rados-mon-op-timeout {MON_TIMEOUT} "
              # librados logs to stderr at start; the reason of a failure is qemu's own line
              "--log-to-stderr=false --err-to-stderr=false")
    env["CEPH_ARGS"] = f"{env.get('CEPH_ARGS', '')} {bounds}".strip()
    return env


# qemu-img's message for each failure, and what mirrorfs tells the operator instead (the original
# is kept at the end: librados's wording is what a Ceph administrator searches for).
_REASONS = (
    ("error connecting: Connection timed out",
     "no Ceph monitor answered in {timeout}s (mon host in {conf})"),
    ("error connecting: Permission denied", "the cluster refused the credentials of client.{user}"),
    ("error connecting: No such file or directory", "no keyring for client.{user} (see {conf})"),
    ("error connecting: Operation not supported", "no keyring for client.{user} (see {conf})"),
    ("error opening pool", "pool {pool} does not exist, or client.{user} may not use it"),
    ("error reading header from", "image {pool}/{name} does not exist"),
    ("error reading conf file", "cannot read the Ceph configuration {conf}"),
)


def _explain(image, message):
    for found, reason in _REASONS:
        if found in message:
            return reason.format(timeout=MON_TIMEOUT, pool=image.pool, name=image.name,
                                 user=image.user or "admin",
                                 conf=image.conf or "the default ceph.conf") + f" ({message})"
    return message


def unusable_pool(image):
    """Why the image's pool takes no writes now, or None: a pool at its quota, a cluster whose
    OSDs are full, or no monitor answering. Ceph does not fail a write to a full pool, it holds it
    until there is room, and opening an image for use writes to it (librbd's watch on the image
    header): the probe and the storage daemon would wait, not fail. The monitor says it in the
    pool's flags, at once.

    Asked with the `ceph` tool (ceph-common) and the same conf and user as the image; where that
    tool is missing or the user may not read the OSD map, the answer is None and the probe's own
    bounded wait is what stops us. A monitor that did not answer it is said at once, rather than
    waited for a second time by the probe."""
    argv = ["ceph", "--connect-timeout", str(MON_TIMEOUT), "osd", "pool", "ls", "detail",
            "--format=json"]
    if image.conf:
        argv[1:1] = ["--conf", os.fspath(image.conf)]
    if image.user:
        argv[1:1] = ["--id", image.user]
    try:
        # Forked like every child of ours (see probe): it must not outlive a killed mirrorfs.
        proc = processes.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, env=environment())
    except OSError:
        return None
    try:
        stdout, stderr = proc.communicate(timeout=MON_TIMEOUT + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    if proc.returncode != 0 and stderr.strip().endswith("timed out"):
        return _explain(image, "error connecting: Connection timed out")
    try:
        pools = json.loads(stdout) if proc.returncode == 0 else []
    except ValueError:
        return None
    for pool in pools if isinstance(pools, list) else ():
        if isinstance(pool, dict) and pool.get("pool_name") == image.pool:
            flags = str(pool.get("flags_names", "")).split(",")
            if "full_quota" in flags:
                quota = (human_size(pool["quota_max_bytes"]) if pool.get("quota_max_bytes")
                         else f"{pool.get('quota_max_objects')} objects")
                return (f"pool {image.pool} is full (its quota of {quota} is reached): Ceph "
                        "holds every write to it, and opening an image is one; raise the quota "
                        f"('ceph osd pool set-quota {image.pool} ...') or free space")
            if "full" in flags:
                return (f"pool {image.pool} is full (the cluster's OSDs reached their full "
                        "ratio): Ceph holds every write to it, and opening an image is one; "
                        "free space or add OSDs")
    return None


def probe(label, image):
    """Open the image once with qemu-img (the library the storage daemon uses): does the cluster
    answer, do the pool and the image exist, may we use them, how large is it. Returns the image
    with its size; raises ImageError with one line."""
    reason = unusable_pool(image)
    if reason:
        raise ImageError(f"{label} {image}: {reason}")
    argv = ["qemu-img", "info", "--output=json", image.spec]
    limit = 3 * MON_TIMEOUT + 10
    try:
        # Forked like every child of ours (processes.popen: SIGTERM when we die): a read that
        # RADOS holds (an OSD gone) must not outlive a mirrorfs that was killed meanwhile.
        proc = processes.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, env=environment())
    except FileNotFoundError:
        raise ImageError("qemu-img is not installed (run 'make setup')") from None
    try:
        # qemu-img's monitor waits are bounded by CEPH_ARGS; this bounds the rest.
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        # The monitor answered the pool check (if we could ask it): what is left is an image that
        # does not open, an OSD that holds its header's requests (down, or full since the check).
        raise ImageError(f"{label} {image}: the image did not open in {limit}s (no monitor "
                         "answered, or an OSD holding the image's header is down or full)"
                         ) from None
    res = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if res.returncode != 0:
        lines = [line.strip() for line in res.stderr.splitlines() if line.startswith("qemu-img:")]
        message = lines[-1].removeprefix("qemu-img: ") if lines else f"exit status {res.returncode}"
        if "Unknown protocol 'rbd'" in message or "Unknown driver 'rbd'" in message:
            message = "this QEMU has no rbd driver (Debian: qemu-block-extra; run 'make setup')"
        # "Could not open 'rbd:...': error ..." : the spec is already in our own prefix
        message = message.split("': ", 1)[-1]
        raise ImageError(f"{label} {image}: {_explain(image, message)}")
    info = json.loads(res.stdout)
    if info.get("format") != "raw":
        raise ImageError(f"{label} {image}: holds a {info.get('format')} image; mirrorfs serves "
                         "RBD images as raw disks")
    return RbdImage(pool=image.pool, name=image.name, conf=image.conf, user=image.user,
                    virtual_size=info["virtual-size"])


def file_node(image, cache, **options):
    """The `rbd` block node of a storage daemon serving `image`. cache `none`: librbd's own
    write-back cache off (QEMU maps cache.direct to rbd_cache=false), so a write is acknowledged
    when the OSDs have it, as O_DIRECT is for a file; `writeback`: librbd's cache on."""
    node = {"driver": "rbd", "pool": image.pool, "image": image.name, **options}
    if image.conf:
        node["conf"] = os.fspath(image.conf)
    if image.user:
        node["user"] = image.user
    if cache == "none":
        node["cache"] = {"direct": True}
    return node


# An evacuation's destination in a pool (`start --switch-first --dest-dir rbd:POOL[:conf=..]`):
# a new image there, named as the source's top (its stem), created and removed with the `rbd`
# tool (ceph-common) as the spec's user, with the spec's configuration.

def pool_of(label, spec):
    """`rbd:POOL[:conf=FILE][:id=USER]` (a destination pool, no image) -> an RbdImage without a
    name yet (`image_in` names it)."""
    pool, _, options = spec[len(PREFIX):].partition(":")
    if not pool or "/" in pool:
        raise UsageError(f"{label} {spec!r}: expected rbd:POOL[:conf=FILE][:id=USER] (a pool: the "
                         "image takes the source's name)")
    return parse(label, f"{PREFIX}{pool}/-" + (f":{options}" if options else ""))


def image_in(pool, name):
    return RbdImage(pool=pool.pool, name=name, conf=pool.conf, user=pool.user)


def _tool(image, *args):
    argv = ["rbd", *args]
    if image.conf:
        argv[1:1] = ["--conf", os.fspath(image.conf)]
    if image.user:
        argv[1:1] = ["--id", image.user]
    try:
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=environment(), timeout=3 * MON_TIMEOUT + 10)
    except FileNotFoundError:
        raise ImageError("the rbd tool is not installed (Debian: ceph-common)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{image}: the cluster did not answer in {3 * MON_TIMEOUT + 10}s") from None


def exists(image):
    res = _tool(image, "info", f"{image.pool}/{image.name}")
    if res.returncode == 0:
        return True
    if "No such file or directory" in res.stderr:
        return False
    raise ImageError(f"{image}: {_explain(image, res.stderr.strip().splitlines()[-1])}")


def create(image, size):
    """A new image of `size` bytes (raw; thin-provisioned: it holds nothing yet), made by qemu-img
    with QEMU's rbd driver, as the storage daemon will open it."""
    res = subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image.spec, str(size)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         env=environment(), timeout=3 * MON_TIMEOUT + 10)
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or [f"exit status {res.returncode}"]
        raise ImageError(f"cannot create {image}: {_explain(image, lines[-1])}")


def remove(image):
    _tool(image, "rm", "--no-progress", f"{image.pool}/{image.name}")
