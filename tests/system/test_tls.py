"""TCP and TLS, on loopback only: `--tls require` with a PSK file or X.509 certificates (nbdkit's
own TLS), clients without TLS or with the wrong key refused, destinations reached over nbds://, and
every mistake in the options refused in one line before anything starts."""

import nbd
import pytest

from lib.commands import EXIT_USAGE, MIRRORFS, run
from lib.failures import serve_fails
from lib.images import MiB, images_identical, qemu_io
from lib.tlscreds import PSK_USER, TlsQemuNbd, free_port, make_psk, make_x509


@pytest.fixture(scope="session")
def x509(tmp_path_factory):
    """(server dir, client dir), made once per session."""
    return make_x509(tmp_path_factory.mktemp("x509"))


@pytest.fixture
def psk(workdir):
    (workdir / "tls").mkdir()
    return make_psk(workdir / "tls" / "keys.psk")


def connect(uri):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)        # tls-psk-file= in the URI
    h.connect_uri(uri)
    return h


def refused(uri):
    """The error a client gets when it tries `uri`; fails the test if it gets in."""
    try:
        h = connect(uri)
    except nbd.Error as e:
        return e.string
    h.shutdown()
    raise AssertionError(f"{uri}: connected")


def write_and_read(uri, pattern, offset):
    h = connect(uri)
    try:
        assert h.get_size() == 64 * MiB
        h.pwrite(bytes([pattern]) * MiB, offset)
        h.flush()
        assert h.pread(MiB, offset) == bytes([pattern]) * MiB
    finally:
        h.shutdown()


def test_psk_over_tcp(chains, serve, psk, workdir):
    port = free_port()
    disk = serve(chains.source, chains.dest, "--listen", f"127.0.0.1:{port}", "--tls", "require",
                 "--tls-psk", psk)
    assert disk.uri == f"nbds://127.0.0.1:{port}/"
    write_and_read(f"nbds://{PSK_USER}@127.0.0.1:{port}/?tls-psk-file={psk}", 0x5a, 3 * MiB)
    # QEMU as the client: its own TLS objects, reading DIR/keys.psk.
    out = run("qemu-io", "--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={psk.parent},"
              f"username={PSK_USER}", "--image-opts",
              f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0",
              "-c", f"read -P 0x5a {3 * MiB} {MiB}", "-c", f"write -P 0x5b {9 * MiB} 64k").stdout
    assert "read 1048576/1048576" in out and "wrote 65536/65536" in out, out
    # Without TLS: refused before any export is opened.
    assert "requires TLS" in refused(f"nbd://127.0.0.1:{port}/")
    # With a key the server does not have, and with a user it does not know.
    other = make_psk(workdir / "tls" / "other.psk")
    refused(f"nbds://{PSK_USER}@127.0.0.1:{port}/?tls-psk-file={other}")
    stranger = make_psk(workdir / "tls" / "stranger.psk", user="mallory")
    refused(f"nbds://mallory@127.0.0.1:{port}/?tls-psk-file={stranger}")
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    qemu_io(chains.dest, f"read -P 0x5a {3 * MiB} {MiB}", f"read -P 0x5b {9 * MiB} 64k", fmt="qcow2")


def test_x509_on_the_unix_socket_and_tcp(chains, serve, x509, workdir):
    server, client = x509
    port = free_port()
    disk = serve(chains.source, chains.dest, "--socket", workdir / "disk.sock",
                 "--listen", f"127.0.0.1:{port}", "--tls-certificates", server)
    assert disk.uri == f"nbds+unix:///?socket={workdir}/disk.sock"
    write_and_read(f"nbds://localhost:{port}/?tls-certificates={client}", 0x61, 0)
    write_and_read(f"nbds+unix:///?socket={workdir}/disk.sock&tls-certificates={client}", 0x62, MiB)
    # TLS applies to every socket served.
    assert "requires TLS" in refused(f"nbd+unix:///?socket={workdir}/disk.sock")
    assert "requires TLS" in refused(f"nbd://127.0.0.1:{port}/")
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    qemu_io(chains.dest, f"read -P 0x61 0 {MiB}", f"read -P 0x62 {MiB} {MiB}", fmt="qcow2")


def test_start_with_tls(migration, psk):
    """`mirrorfs start` takes the same options; the control commands work as ever."""
    disk = migration.start("--tls-psk", psk)
    assert disk.uri.startswith("nbds+unix://")
    uri = f"nbds+unix://{PSK_USER}@/?socket={disk.socket}&tls-psk-file={psk}"
    write_and_read(uri, 0x71, 2 * MiB)
    assert "requires TLS" in refused(f"nbd+unix:///?socket={disk.socket}")
    migration.ctl("copy")
    migration.ctl("pivot")
    write_and_read(uri, 0x72, 5 * MiB)
    assert disk.stop() == 0
    qemu_io(migration.dest_overlay, f"read -P 0x71 {2 * MiB} {MiB}", f"read -P 0x72 {5 * MiB} {MiB}",
            fmt="qcow2")


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_destination_over_nbds(kind, chains, serve, workdir, x509, psk):
    """DEST is a remote NBD server that requires TLS (qemu-nbd on loopback), named by its URI."""
    if kind == "psk":
        remote = TlsQemuNbd(chains.dest, workdir, psk=psk)
        dest = f"nbds://{PSK_USER}@127.0.0.1:{remote.port}/?tls-psk-file={psk}"
    else:
        remote = TlsQemuNbd(chains.dest, workdir, x509=x509[0])
        dest = f"nbds://localhost:{remote.port}/?tls-certificates={x509[1]}"
    try:
        disk = serve(chains.source, dest)
        qemu_io(disk.uri, "write -P 0x81 7M 1M", "write -z 9M 1M", "discard 0 64k", "read -P 0x81 7M 1M")
        assert disk.stop() == 0, disk.stderr
    finally:
        remote.stop()
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


# Mistakes: one line each, nothing started, nothing changed.

def _sock(w):
    return ["--socket", w / "disk.sock"]


def _psk(w):
    (w / "k").mkdir(exist_ok=True)
    return make_psk(w / "k" / "keys.psk")


def _certs(w, *names, content="-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"):
    d = w / "certs"
    d.mkdir(exist_ok=True)
    for name in names:
        (d / name).write_text(content)
    return d


def _file(w, name, text):
    (w / name).write_text(text)
    return w / name


# name: (workdir) -> (options, substrings of the one line expected)
BAD = {
    "tls_without_credentials": lambda w: (
        ["--tls", "require"], ["--tls require needs --tls-certificates DIR or --tls-psk FILE"]),
    "tls_on_without_credentials": lambda w: (["--tls", "on"], ["--tls on needs"]),
    "tls_off_with_credentials": lambda w: (["--tls", "off", "--tls-psk", _psk(w)], ["--tls off", "--tls-psk"]),
    "tls_bad_mode": lambda w: (["--tls", "maybe"], ["--tls", "'maybe'"]),
    "both_credentials": lambda w: (["--tls-psk", _psk(w), "--tls-certificates", w], ["not both"]),
    "psk_missing": lambda w: (["--tls-psk", w / "nope.psk"], [f"--tls-psk {w}/nope.psk", "no such file"]),
    "psk_is_directory": lambda w: (["--tls-psk", w], [f"--tls-psk {w}", "not a regular file"]),
    "psk_empty": lambda w: (["--tls-psk", _file(w, "empty.psk", "")], ["empty", "psktool"]),
    "psk_not_a_key": lambda w: (["--tls-psk", _file(w, "bad.psk", "alice:not-hex\n")],
                                ["line 1", "USERNAME:HEXKEY"]),
    "certificates_missing": lambda w: (["--tls-certificates", w / "nope"], [f"{w}/nope", "no such directory"]),
    "certificates_is_file": lambda w: (["--tls-certificates", _file(w, "f", "x")], ["not a directory"]),
    "certificates_without_key": lambda w: (
        ["--tls-certificates", _certs(w, "ca-cert.pem", "server-cert.pem")],
        [f"{w}/certs/server-key.pem", "no such file"]),
    "certificates_not_pem": lambda w: (
        ["--tls-certificates", _certs(w, "ca-cert.pem", "server-cert.pem") and
         _certs(w, "server-key.pem", content="garbage")],
        ["server-key.pem", "not a PEM file"]),
    "no_verify_peer_with_psk": lambda w: (["--tls-psk", _psk(w), "--tls-no-verify-peer"],
                                          ["--tls-no-verify-peer", "needs --tls-certificates"]),
    "no_verify_peer_without_tls": lambda w: (["--tls-no-verify-peer"], ["--tls-no-verify-peer"]),
    "group_unknown": lambda w: (["--group", "no-such-group-here"],
                                ["--socket-group no-such-group-here: no such group"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tls_options(case, workdir, chains):
    args, expect = BAD[case](workdir)
    serve_fails(workdir, chains.source, chains.dest, *_sock(workdir), *args, expect=expect,
                status=EXIT_USAGE)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_listen_beyond_loopback_needs_tls_or_insecure(host, workdir, chains):
    listen = f"[{host}]:{free_port()}" if ":" in host else f"{host}:{free_port()}"
    serve_fails(workdir, chains.source, chains.dest, "--listen", listen,
                expect=["can be reached from other machines", "--tls require", "--insecure"],
                status=EXIT_USAGE)
    # --tls on still lets a client in without TLS: the same answer.
    serve_fails(workdir, chains.source, chains.dest, "--listen", listen, "--tls", "on",
                "--tls-psk", _psk(workdir), expect=["--insecure"], status=EXIT_USAGE)


def test_access_check_allows_tls_or_insecure_beyond_loopback(workdir):
    """The other half, without binding anything beyond loopback: the check passes."""
    from mirrorfs.system.access import Access
    Access(psk=str(_psk(workdir))).check(("0.0.0.0", 10809))
    Access(insecure=True).check(("0.0.0.0", 10809))
    Access().check(("127.0.0.1", 10809))
    Access().check(("localhost", 10809))


@pytest.mark.parametrize("dest,expect", [
    ("nbds://127.0.0.1:1/?tls-psk-file={w}/nope.psk", ["destination: tls-psk-file {w}/nope.psk",
                                                       "no such file"]),
    ("nbds://127.0.0.1:1/?tls-certificates={w}/nope", ["destination: tls-certificates {w}/nope"]),
    ("nbd://127.0.0.1:1/?tls-certificates={w}", ["without TLS"]),
])
def test_bad_tls_destination_uri(dest, expect, workdir, chains):
    (workdir / "ca-cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    serve_fails(workdir, chains.source, dest.format(w=workdir), *_sock(workdir),
                expect=[e.format(w=workdir) for e in expect], status=EXIT_USAGE)


def test_start_refuses_bad_tls_options(migration):
    res = run(*MIRRORFS, "start", migration.base, "--dest-dir", migration.workdir / "dst",
              "--socket", migration.workdir / "x.sock", "--tls-psk", migration.workdir / "nope",
              check=False)
    assert res.returncode == EXIT_USAGE and res.stderr.count("\n") == 1, res.stderr
    assert "no such file" in res.stderr
    assert not migration.source_overlay.exists() and not migration.dest_overlay.exists()
    assert not (migration.workdir / "x.sock").exists() and not (migration.workdir / "x.sock.ctl").exists()


# Client certificates (X.509): only clients whose certificate the CA signed get in.

def stranger_clients(x509, root):
    """Two client directories that trust the server's CA but have no CA-signed certificate of
    their own: one with no certificate, one with a self-signed one."""
    _, client = x509
    none, selfsigned = root / "no-cert", root / "self-signed"
    for d in (none, selfsigned):
        d.mkdir()
        (d / "ca-cert.pem").write_bytes((client / "ca-cert.pem").read_bytes())
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", selfsigned / "client-key.pem", "-out", selfsigned / "client-cert.pem",
        "-days", "2", "-subj", "/CN=mirrorfs test client", "-addext", "extendedKeyUsage=clientAuth")
    return none, selfsigned


def only_signed_clients_get_in(disk, x509, workdir, pattern):
    _, client = x509
    uri = f"nbds+unix:///?socket={disk.socket}&tls-certificates="
    for stranger in stranger_clients(x509, workdir):
        refused(uri + str(stranger))
    write_and_read(uri + str(client), pattern, 4 * MiB)


def test_x509_refuses_clients_without_a_signed_certificate(chains, serve, x509, workdir):
    disk = serve(chains.source, chains.dest, "--tls-certificates", x509[0])
    only_signed_clients_get_in(disk, x509, workdir, 0x91)
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    qemu_io(chains.dest, f"read -P 0x91 {4 * MiB} {MiB}", fmt="qcow2")


def test_start_x509_refuses_clients_without_a_signed_certificate(migration, x509):
    disk = migration.start("--tls-certificates", x509[0])
    only_signed_clients_get_in(disk, x509, migration.workdir, 0x92)
    assert disk.stop() == 0
    qemu_io(migration.dest_overlay, f"read -P 0x92 {4 * MiB} {MiB}", fmt="qcow2")


def test_x509_no_verify_peer_lets_any_tls_client_in(chains, serve, x509, workdir):
    """The explicit way back to encryption without client authentication."""
    disk = serve(chains.source, chains.dest, "--tls-certificates", x509[0], "--tls-no-verify-peer")
    none, _ = stranger_clients(x509, workdir)
    write_and_read(f"nbds+unix:///?socket={disk.socket}&tls-certificates={none}", 0x93, 0)
    assert disk.stop() == 0
