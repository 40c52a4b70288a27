"""TLS credentials for the tests, made with the commands docs/USING.md shows: a PSK file (psktool) and a
small X.509 CA with a server and a client certificate (openssl), in the layouts nbdkit, qemu-nbd and
libnbd read."""

import os
import socket
import subprocess
from pathlib import Path

from lib.commands import run
from lib.nbdservers import wait_for_pidfile

PSK_USER = "alice"


def make_psk(path, user=PSK_USER):
    run("psktool", "-u", user, "-p", path)
    return Path(path)


def _cert(directory, name, ca, subject, extensions):
    key, csr, cert = (directory / f"{name}-key.pem", directory / f"{name}.csr",
                      directory / f"{name}-cert.pem")
    ext = directory / f"{name}.ext"
    ext.write_text("\n".join(extensions) + "\n")
    run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca / "ca-cert.pem", "-CAkey", ca / "ca-key.pem",
        "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
    csr.unlink()
    ext.unlink()
    return key, cert


def make_x509(root):
    """root/server: ca-cert.pem, server-cert.pem, server-key.pem (nbdkit, qemu-nbd);
    root/client: ca-cert.pem, client-cert.pem, client-key.pem (libnbd). Returns (server, client)."""
    root = Path(root)
    ca, server, client = root / "ca", root / "server", root / "client"
    for d in (ca, server, client):
        d.mkdir(parents=True, exist_ok=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", ca / "ca-key.pem", "-out", ca / "ca-cert.pem", "-days", "2",
        "-subj", "/CN=mirrorfs test CA")
    _cert(ca, "server", ca, "/CN=localhost",
          ["subjectAltName=DNS:localhost,IP:127.0.0.1", "keyUsage=digitalSignature,keyEncipherment",
           "extendedKeyUsage=serverAuth"])
    _cert(ca, "client", ca, "/CN=mirrorfs test client",
          ["keyUsage=digitalSignature,keyEncipherment", "extendedKeyUsage=clientAuth"])
    for d in (server, client):
        (d / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    for name in ("server-cert.pem", "server-key.pem"):
        (server / name).write_bytes((ca / name).read_bytes())
    for name in ("client-cert.pem", "client-key.pem"):
        (client / name).write_bytes((ca / name).read_bytes())
    for d in (server, client):
        for f in d.iterdir():
            os.chmod(f, 0o600)
    return server, client


def free_port():
    """A loopback port nobody listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsQemuNbd:
    """qemu-nbd serving an image over TCP on loopback, TLS required (PSK or X.509): a remote
    destination, as far as mirrorfs can tell."""

    def __init__(self, image, workdir, psk=None, x509=None, fmt="qcow2"):
        self.port = free_port()
        self.pidfile = Path(workdir) / f"tls-qemu-nbd-{self.port}.pid"
        if psk is not None:
            creds = f"tls-creds-psk,id=tls0,endpoint=server,dir={Path(psk).parent}"
            assert Path(psk).name == "keys.psk", "qemu-nbd reads DIR/keys.psk"
        else:
            creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={x509},verify-peer=off"
        self.log = Path(workdir) / f"tls-qemu-nbd-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["qemu-nbd", "-f", fmt, "-b", "127.0.0.1", "-p", str(self.port), "--object", creds,
                 "--tls-creds", "tls0", "--pid-file", str(self.pidfile), "--persistent",
                 "--shared=16", "--cache=writeback", "--discard=unmap", str(image)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        if not wait_for_pidfile(self.proc, self.pidfile):
            self.stop()
            raise AssertionError(f"qemu-nbd failed: {self.log.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
