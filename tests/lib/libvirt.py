"""A real libvirtd for the tests, with its own configuration and runtime directories, and the domain
XML of a guest whose disks are mirrorfs disks.

Debian 12's libvirt (9.0) run as root always uses the host's /etc/libvirt, /run/libvirt and
/var/lib/libvirt. A test must not touch those, so the daemon runs in *session* mode instead: as an
unprivileged user of its own (`mfsvirt`, made once with useradd), with HOME and the XDG directories
pointing into the test's directory. Its QEMU runs as that user under TCG (no KVM here). The guest's
disks are NBD unix sockets: mirrorfs (or its host service) is started with `--socket-group mfsvirt`,
so the sockets are 0660 and the user's QEMU may connect; the images themselves are opened only by
mirrorfs's storage daemons.

    with LibvirtDaemon(workdir) as lv:
        lv.define(domain_xml(...)); lv.virsh("start", "vm1")

Stopping destroys every domain first (a session daemon's QEMU is not its child and would outlive it),
then kills the daemon.
"""

import grp
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

USER = "mfsvirt"
TOOLS = ("libvirtd", "virsh", "setpriv", "useradd")
START_TIMEOUT = 30


def ensure_user():
    """The user (and its group) the session daemon runs as: (uid, gid)."""
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", USER], check=True, capture_output=True)
        entry = pwd.getpwnam(USER)
    grp.getgrgid(entry.pw_gid)
    return entry.pw_uid, entry.pw_gid


def open_path_to(path, uid):
    """Let `uid` reach `path`: every directory on the way traversable (o+x), and `path` its own."""
    path = Path(path)
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
    os.chown(path, uid, -1)


class LibvirtDaemon:
    """libvirtd in session mode for `USER`, its state under `workdir/libvirt`."""

    def __init__(self, workdir):
        self.root = Path(workdir) / "libvirt"
        self.log = self.root / "libvirtd.log"
        self.proc = None

    @property
    def uri(self):
        return "qemu:///session"

    def _env(self):
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.root),
                "XDG_CONFIG_HOME": str(self.root / "config"), "XDG_RUNTIME_DIR": str(self.root / "run"),
                "XDG_CACHE_HOME": str(self.root / "cache"), "XDG_DATA_HOME": str(self.root / "data"),
                "LANG": "C"}

    def _as_user(self, argv):
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *argv]

    def start(self):
        self.uid, self.gid = ensure_user()
        for sub in ("config/libvirt", "run", "cache", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # No virtlogd in session mode either: QEMU's output goes straight to its log file.
        (self.root / "config/libvirt/qemu.conf").write_text('stdio_handler = "file"\n')
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, self.uid, self.gid)
        open_path_to(self.root, self.uid)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self._as_user(["libvirtd", "--timeout", "0"]), env=self._env(),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        sock = self.root / "run/libvirt/libvirt-sock"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if sock.exists() and self.virsh("version", check=False).returncode == 0:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"libvirtd exited {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"libvirtd not ready after {START_TIMEOUT}s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n=20):
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def virsh(self, *args, check=True, timeout=120):
        res = subprocess.run(self._as_user(["virsh", "-c", self.uri, *map(str, args)]), env=self._env(),
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"virsh {' '.join(map(str, args))}: {res.stderr.strip()}")
        return res

    def define(self, xml):
        path = self.root / "domain.xml"
        path.write_text(xml)
        os.chown(path, self.uid, self.gid)
        self.virsh("define", path)

    def domstate(self, name):
        return self.virsh("domstate", name).stdout.strip()

    def qemu_pids(self):
        """The pids of the QEMU processes this daemon runs (their pidfiles)."""
        pids = []
        for pidfile in (self.root / "run/libvirt/qemu/run").glob("*.pid"):
            try:
                pids.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            listed = self.virsh("list", "--name", check=False).stdout.split()
            for name in listed:
                self.virsh("destroy", name, check=False)
        for pid in self.qemu_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def nbd_disk(socket_path, target):
    """A disk served over NBD on a unix socket, as libvirt 9.0 spells it (no <reconnect>: that came
    with 9.2 for NBD)."""
    return (f"<disk type='network' device='disk'>"
            f"<driver name='qemu' type='raw' cache='none'/>"
            f"<source protocol='nbd'><host transport='unix' socket={quoteattr(str(socket_path))}/></source>"
            f"<target dev='{target}' bus='virtio'/></disk>")


def domain_xml(name, kernel, initrd, cmdline, disks, console, control):
    """A TCG domain (with ACPI, which the guest's `poweroff -f` needs) booting `kernel`/`initrd`
    directly, with `disks` (nbd_disk strings), its console
    (ttyS0) in the file `console` and its second serial port (ttyS1) on the unix socket `control`."""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {''.join(disks)}
    <serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path={quoteattr(str(control))}/><target port='1'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
