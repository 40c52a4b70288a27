"""A small Linux guest for the tests that need a real kernel as the NBD client.

Built at test time from Debian's packages, nothing binary in the repository: the kernel of
`linux-image-amd64`, and an initramfs holding busybox (`busybox-static`), `mkfs.ext4` (e2fsprogs),
`nbd-client` with their shared libraries (found with ldd), the kernel modules the guest needs (with
their dependencies from modules.dep), and `guest-init.sh` as /init. It is cached under
~/.cache/mirrorfs-guest, keyed by a hash of everything that goes into it.

The guest does what its kernel command line says (`mfs_task=disk|nbd`), prints `MFS ...` lines on the
first serial port, and powers off. `Guest` runs it under qemu-system-x86_64 (TCG: no KVM here), reads
those lines as they come, and always kills QEMU.

    eval "$(python3 tests/lib/guest.py)"    # build (or find) the guest; sets KERNEL and INITRD
"""

import gzip
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE.parent / "guest-init.sh"      # tests/guest-init.sh

# Modules in load order is resolved from modules.dep; crc32c_generic is what ext4's metadata checksums
# ask the crypto API for (a request_module the guest cannot serve: it has no modprobe database).
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4", "nbd")
# (host path, path in the guest)
PROGRAMS = (("/bin/busybox", "/bin/busybox"),
            ("/sbin/mke2fs", "/usr/local/sbin/mkfs.ext4"),
            ("/usr/sbin/nbd-client", "/usr/local/sbin/nbd-client"))
FILES = (("/etc/mke2fs.conf", "/etc/mke2fs.conf"),)
KERNEL_PACKAGE = "linux-image-amd64"


class GuestError(Exception):
    pass


def cache_root():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "mirrorfs-guest"


# The kernel.

def kernel_version():
    """The kernel that Debian's linux-image-amd64 depends on, e.g. 6.1.0-56-amd64."""
    res = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", KERNEL_PACKAGE],
                         capture_output=True, text=True)
    match = re.search(r"linux-image-(\S+)", res.stdout) if res.returncode == 0 else None
    if not match:
        raise GuestError(f"{KERNEL_PACKAGE} is not installed (run 'make setup')")
    version = match.group(1)
    for path in (Path(f"/boot/vmlinuz-{version}"), Path(f"/lib/modules/{version}/modules.dep")):
        if not path.exists():
            raise GuestError(f"{path} is missing; reinstall {KERNEL_PACKAGE}")
    return version


def module_order(version, names=MODULES):
    """Module files (relative to /lib/modules/VERSION), dependencies before their users."""
    root = Path(f"/lib/modules/{version}")
    deps, by_name = {}, {}
    for line in (root / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    order = []

    def visit(path):
        for dep in deps[path]:
            visit(dep)
        if path not in order:
            order.append(path)

    for name in names:
        if name not in by_name:
            if (root / "modules.builtin").exists() and re.search(
                    rf"/{name.replace('_', '[-_]')}\.ko$", (root / "modules.builtin").read_text(), re.M):
                continue                    # built into this kernel
            raise GuestError(f"kernel {version} has no module {name}")
        visit(by_name[name])
    for path in order:
        if not path.endswith(".ko"):
            raise GuestError(f"{path}: only uncompressed modules are supported")
    return order


# Shared libraries.

def libraries(program):
    """The shared libraries `program` loads, with the dynamic loader; none for a static binary."""
    res = subprocess.run(["ldd", program], capture_output=True, text=True)
    if res.returncode != 0:
        if "not a dynamic executable" in res.stdout + res.stderr:
            return []
        raise GuestError(f"ldd {program}: {res.stderr.strip()}")
    found = []
    for line in res.stdout.splitlines():
        if "not found" in line:
            raise GuestError(f"{program}: {line.strip()}")
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            found.append(match.group(1))
    return found


# The initramfs: a newc cpio archive, gzipped. Written here rather than with cpio(1), so that it can
# hold /dev/console (the kernel opens it for init before anything is mounted) without root, and so
# that the same inputs give the same bytes.

class Cpio:
    def __init__(self):
        self.parts = []
        self.size = 0
        self.names = set()
        self.ino = 1

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._append(header + name.encode() + b"\0")
        self._append(data)

    def _append(self, data):
        """Every header+name and every file's data ends on a 4-byte boundary."""
        data += b"\0" * (-len(data) % 4)
        self.parts.append(data)
        self.size += len(data)

    def directory(self, name):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name, data, mode=0o755):
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.directory(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor):
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self):
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _contents(version):
    """(path in the guest, host file or bytes, mode) for everything in the initramfs."""
    items = [("/init", INIT_SCRIPT, 0o755)]
    for host, guest in PROGRAMS:
        if not Path(host).exists():
            raise GuestError(f"{host} is missing (run 'make setup')")
        items.append((guest, Path(host), 0o755))
        for lib in libraries(host):
            items.append((lib, Path(lib), 0o755))
    for host, guest in FILES:
        items.append((guest, Path(host), 0o644))
    order = module_order(version)
    for path in order:
        items.append((f"/lib/modules/{path}", Path(f"/lib/modules/{version}/{path}"), 0o644))
    items.append(("/etc/modules.order", "".join(p + "\n" for p in order).encode(), 0o644))
    return items


def _key(version, items):
    h = hashlib.sha256(version.encode())
    h.update(Path(__file__).read_bytes())
    for guest, source, mode in sorted(items, key=lambda i: i[0]):
        h.update(f"{guest}\0{mode}\0".encode())
        h.update(source if isinstance(source, bytes) else hashlib.sha256(source.read_bytes()).digest())
    return h.hexdigest()[:16]


def build(cache=None):
    """Return (kernel, initramfs) paths, building the initramfs unless the cache has it."""
    version = kernel_version()
    items = _contents(version)
    target = Path(cache or cache_root()) / f"{version}-{_key(version, items)}"
    kernel, initrd = target / "vmlinuz", target / "initrd.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    archive = Cpio()
    for name in ("dev", "proc", "sys", "mnt", "tmp", "run", "bin", "sbin", "usr/bin", "usr/sbin"):
        archive.directory(name)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3)
    for guest, source, mode in items:
        archive.file(guest, source if isinstance(source, bytes) else source.read_bytes(), mode)
    archive.symlink("bin/sh", "busybox")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        shutil.copyfile(f"/boot/vmlinuz-{version}", tmp / "vmlinuz")
        with gzip.GzipFile(tmp / "initrd.gz", "wb", compresslevel=6, mtime=0) as f:
            f.write(archive.bytes())
        try:
            tmp.rename(target)              # atomic: a concurrent build of the same key loses
        except OSError:
            if not initrd.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kernel, initrd


# Running it.

class Guest:
    """qemu-system-x86_64 booting the guest with `task` on its kernel command line.

    `drive` and `netdev` are QEMU options (lists) for the guest's disk and network. The first serial
    port is the console, written to `console` (a file: the whole transcript stays for failure
    messages); the second (with `control`) is a unix socket the test can write to (`send`)."""

    def __init__(self, workdir, task, qemu_args=(), timeout=170, cmdline="", control=True):
        self.workdir = Path(workdir)
        self.kernel, self.initrd = build()
        self.console = self.workdir / f"guest-{task}.log"
        self.qemu_log = self.workdir / f"guest-{task}.qemu.log"
        self.ctl_path = self.workdir / f"guest-{task}.ctl"
        self.timeout = timeout
        self.deadline = None
        self.argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-no-reboot",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", f"console=ttyS0 loglevel=1 panic=-1 mfs_task={task} {cmdline}".strip(),
            "-chardev", f"file,id=console,path={self.console}", "-serial", "chardev:console",
        ]
        if control:
            self.argv += ["-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
                          "-serial", "chardev:ctl"]
        self.argv += qemu_args
        if os.environ.get("MIRRORFS_GUEST_TRACE"):
            # Post-mortem of a guest I/O error: the kernel's error lines on the console, and QEMU's
            # NBD client events (every reply's errno, each reconnect) in its log.
            self.argv[self.argv.index("-append") + 1] += " loglevel=4"
            for event in ("nbd_receive_simple_reply", "nbd_receive_structured_reply_chunk",
                          "nbd_co_request_fail", "nbd_read_reply_entry_fail", "nbd_reconnect_*",
                          "nbd_client_handshake*", "nbd_connect_thread_sleep",
                          "nbd_server_error_msg", "nbd_unknown_error", "nbd_*_compliance"):
                self.argv += ["-trace", event]
        self.proc = None
        self._ctl = None
        self._seen = 0

    def start(self):
        self.console.write_text("")
        self.started = time.monotonic()
        self.deadline = self.started + self.timeout
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def lines(self):
        """The guest's `MFS ...` lines so far, without the prefix."""
        text = self.console.read_text(errors="replace")
        return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("MFS ")]

    def transcript(self, tail=40):
        text = self.console.read_text(errors="replace").splitlines()
        return "\n".join(text[-tail:])

    def wait_for(self, predicate, what):
        """Wait until `predicate(lines)` is true; fail at once if the guest failed or exited."""
        while True:
            lines = self.lines()
            if predicate(lines):
                return lines
            failed = [line for line in lines if line.startswith("FAIL")]
            if failed:
                raise AssertionError(f"guest: {failed[0]}\n{self.transcript()}")
            if self.proc.poll() is not None:
                # Its last lines may have come between the read above and its exit (a guest that
                # prints DONE and powers off at once): read them once more before failing.
                lines = self.lines()
                if predicate(lines):
                    return lines
                out = (self.qemu_log.read_text(errors="replace").strip() if self.qemu_log.exists()
                       else "")
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {what}: "
                                     f"{out}\n{self.transcript()}")
            if time.monotonic() > self.deadline:
                raise AssertionError(f"guest: no {what} after {self.timeout}s\n{self.transcript()}")
            time.sleep(0.1)

    def count(self, kind):
        return sum(1 for line in self.lines() if line.split()[0] == kind)

    def send(self, command):
        """A line on the guest's second serial port (/dev/ttyS1)."""
        if self._ctl is None:
            self._ctl = socket.socket(socket.AF_UNIX)
            self._ctl.connect(os.fspath(self.ctl_path))
        self._ctl.sendall(command.encode() + b"\n")

    def wait_exit(self):
        """Wait for the guest to power off; returns its lines."""
        lines = self.wait_for(lambda lines: "DONE" in lines, "DONE")
        try:
            self.proc.wait(max(1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"guest did not power off\n{self.transcript()}") from None
        self.seconds = time.monotonic() - self.started
        return lines

    def kill(self):
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()


def checksums(lines, kind):
    """{file name: sha256} from the guest's `KIND name sha256` lines; the last one of a name wins."""
    found = {}
    for line in lines:
        parts = line.split()
        if parts[0] == kind:
            found[parts[1]] = parts[2]
    return found


if __name__ == "__main__":
    try:
        kernel, initrd = build()
    except GuestError as e:
        sys.exit(f"guest: {e}")
    print(f"KERNEL={kernel}")
    print(f"INITRD={initrd}")
