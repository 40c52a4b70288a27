"""Who can reach the served disk, and what they may ask for.

- **TLS** on every socket nbdkit serves, with nbdkit's own options: X.509 certificates
  (`--tls-certificates DIR`: ca-cert.pem, server-cert.pem, server-key.pem) or a pre-shared key file
  (`--tls-psk FILE`, lines of `username:hexkey`, as `psktool` writes them). `require` refuses every
  client that does not start TLS; `on` offers it. With X.509, a client must present a certificate
  the CA signed (nbdkit's `--tls-verify-peer`): encryption alone would let anyone who can reach the
  socket write the disk. `--tls-no-verify-peer` is the operator's explicit way out of that.
- **A TCP address other machines can reach** (`--listen` on anything but loopback) is refused without
  `--tls require`, unless the operator says `--insecure`.
- **Unix sockets** (the disk's and the control socket) are 0600: only the user running mirrorfs can
  connect. `--socket-group NAME` (`--group` is its older spelling) makes them 0660 and owned by
  that group; the host service's `--socket-group` does it for every named disk's socket.
- **Export names**: the disk is the default export (""). nbdkit's exportname filter refuses every
  other name and lists only that one, so a client's name cannot select anything.

Everything is checked before anything starts, and each mistake is one `UsageError` naming it.
"""

import grp
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from mirrorfs.system import sockets
from mirrorfs.errors import UsageError

TLS_MODES = ("off", "on", "require")
CERTIFICATE_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
# The option that names the sockets' group. Not `--group`, its older spelling (still accepted): next
# to a group migration (`start sys data`), "--group" reads as the migration's group.
OPTION = "--socket-group"
_PSK_LINE = re.compile(r"^[^:\s]+:[0-9a-fA-F]{2,}$")

# The exportname filter's parameters: only "" exists, and only "" is listed. nbdkit hands the
# filter's keys to the filter and the rest to the plugin.
EXPORT_FILTER = ["--filter=exportname"]
EXPORT_PARAMS = ["exportname-strict=true", "exportname-list=explicit", "exportname="]


def _readable_file(path, option):
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{option} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option} {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"{option} {path}: {e.strerror}") from None


def check_psk_file(path, option="--tls-psk"):
    """A PSK file as nbdkit and libnbd read it: one `username:hexkey` a line."""
    text = _readable_file(path, option).decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{option} {path}: empty (make one with: psktool -u NAME -p {path})")
    for number, line in enumerate(lines, 1):
        if not _PSK_LINE.match(line.strip()):
            raise UsageError(f"{option} {path}: line {number} is not USERNAME:HEXKEY "
                             f"(make one with: psktool -u NAME -p {path})")


def check_certificates(directory, names=CERTIFICATE_FILES, option="--tls-certificates"):
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{option} {directory}: not a directory" if directory.exists()
                         else f"{option} {directory}: no such directory")
    for name in names:
        data = _readable_file(directory / name, option)
        if b"-----BEGIN " not in data:
            raise UsageError(f"{option} {directory / name}: not a PEM file")


@dataclass
class Access:
    tls: str | None = None          # off, on, require; None: require if credentials are given
    certificates: str | None = None
    psk: str | None = None
    group: str | None = None
    insecure: bool = False
    verify_peer: bool = True        # X.509: only clients with a certificate the CA signed

    def __post_init__(self):
        if self.certificates and self.psk:
            raise UsageError("give --tls-certificates or --tls-psk, not both")
        credentials = self.certificates or self.psk
        if self.tls is None:
            self.tls = "require" if credentials else "off"
        if self.tls not in TLS_MODES:
            raise UsageError(f"--tls {self.tls!r}: expected one of {', '.join(TLS_MODES)}")
        if self.tls == "off" and credentials:
            raise UsageError(f"--tls off: {'--tls-certificates' if self.certificates else '--tls-psk'} "
                             "would not be used")
        if self.tls != "off" and not credentials:
            raise UsageError(f"--tls {self.tls} needs --tls-certificates DIR or --tls-psk FILE")
        if not self.verify_peer and not self.certificates:
            raise UsageError("--tls-no-verify-peer is about X.509 client certificates: it needs "
                             "--tls-certificates DIR")
        # nbdkit reads them again for each connection, maybe from another working directory.
        self.certificates = os.path.abspath(self.certificates) if self.certificates else None
        self.psk = os.path.abspath(self.psk) if self.psk else None
        self.gid = None

    def check(self, listen=None):
        """Before anything starts: the credentials are usable, the group exists, and a TCP address
        reachable from elsewhere is not served in the clear by accident."""
        if self.psk:
            check_psk_file(self.psk)
        if self.certificates:
            check_certificates(self.certificates)
        if self.group is not None:
            self.gid = self._gid(self.group)
        if listen is not None and self.tls != "require" and not self.insecure:
            host, port = listen
            if not sockets.is_loopback(host):
                raise UsageError(f"--listen {host}:{port} can be reached from other machines: give "
                                 "--tls require with --tls-certificates or --tls-psk, or --insecure "
                                 "to serve the disk unencrypted to anyone who can connect")

    @staticmethod
    def _gid(group):
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            pass
        if group.isdigit():
            return int(group)
        raise UsageError(f"{OPTION} {group}: no such group")

    def share(self, path):
        """A unix socket we bound (0600): with --socket-group, 0660 and owned by the group."""
        if self.group is None:
            return
        if self.gid is None:
            self.gid = self._gid(self.group)
        try:
            os.chown(path, -1, self.gid)
            os.chmod(path, 0o660)
        except OSError as e:
            raise UsageError(f"{OPTION} {self.group}: cannot give {path} to it: {e.strerror}") \
                from None

    @property
    def tls_required(self):
        return self.tls == "require"

    def nbdkit_options(self):
        """nbdkit's server options for this access (before the plugin name)."""
        options = list(EXPORT_FILTER)
        if self.tls != "off":
            options.append(f"--tls={self.tls}")
            if self.certificates:
                options.append(f"--tls-certificates={self.certificates}")
                if self.verify_peer:
                    options.append("--tls-verify-peer")
            else:
                options.append(f"--tls-psk={self.psk}")
        return options
