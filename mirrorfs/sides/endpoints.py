"""SOURCE and DEST as a user names them: an image file, an RBD image, or the URI of any NBD server.

An image file or an RBD image (`rbd:POOL/IMAGE...`, mirrorfs/sides/rbd.py) is probed with qemu-img
(format, size, backing chain) and later exported by a qemu-storage-daemon that mirrorfs owns; a URI
is used as it is. Either way the data path only sees an
NBD URI.
"""

import os
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit


from mirrorfs.system import access
from mirrorfs.sides import images
from mirrorfs.sides import rbd
from mirrorfs.datapath.sides import backend
from mirrorfs.errors import BackendError, UsageError

URI_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")


@dataclass
class Endpoint:
    label: str                  # "source" or "destination", for messages
    spec: str                   # what the user gave
    image: images.ImageInfo | None = None
    uri: str | None = None      # set for URIs now, for images once their daemon runs
    size: int | None = None

    @property
    def is_image(self):
        return self.image is not None


def is_uri(spec):
    return spec.startswith(URI_SCHEMES)


def resolve(label, spec, writable=True):
    """Check what the user named: an image file (probed now) or an NBD URI (reached in `probe`)."""
    if not spec:
        raise UsageError(f"{label}: empty path")
    if is_uri(spec):
        _check_tls_files(label, spec)
        return Endpoint(label, spec, uri=spec)
    if rbd.is_spec(spec):
        image = rbd.probe(label, rbd.parse(label, spec))
        return Endpoint(label, spec, image=image, size=image.virtual_size)
    if "://" in spec:
        raise UsageError(f"{label} {spec!r}: unsupported URI scheme (expected one of "
                         f"{', '.join(s.rstrip('/:') for s in URI_SCHEMES[:4])})")
    info = images.info(spec)
    if writable and not os.access(info.path, os.W_OK):
        raise UsageError(f"{label} {info.path}: not writable")
    return Endpoint(label, spec, image=info, size=info.virtual_size)


def _check_tls_files(label, uri):
    """The files an nbds:// URI names for its TLS credentials (libnbd reads them when connecting):
    checked now, so that a typo is one clear line rather than a failed handshake."""
    query = parse_qs(urlsplit(uri).query)
    for path in query.get("tls-psk-file", []):
        access.check_psk_file(path, option=f"{label}: tls-psk-file")
    for path in query.get("tls-certificates", []):
        access.check_certificates(path, names=("ca-cert.pem",), option=f"{label}: tls-certificates")
    if (query.get("tls-psk-file") or query.get("tls-certificates")) and not uri.startswith("nbds"):
        raise UsageError(f"{label} {uri}: TLS credentials in a URI without TLS (nbds:// or "
                         "nbds+unix://)")


def _same_file(a, b):
    """Compared by inode, not by name: a hard link is the same image under another path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def check_distinct(source, dest):
    """Source and destination must not share a file that mirrorfs writes."""
    if source.is_image and dest.is_image:
        if _same_file(source.image.path, dest.image.path):
            raise UsageError(f"source and destination are the same image: {source.image.path}")
        if any(_same_file(source.image.path, p) for p in dest.image.chain):
            raise UsageError(f"destination {dest.image.path} has the source {source.image.path} in its "
                             "backing chain; mirrorfs writes the source, so that chain would change")
        if any(_same_file(dest.image.path, p) for p in source.image.chain):
            raise UsageError(f"source {source.image.path} has the destination {dest.image.path} in its "
                             "backing chain")
    elif not source.is_image and not dest.is_image and source.uri == dest.uri:
        raise UsageError(f"source and destination are the same URI: {source.uri}")


def probe(endpoint):
    """Connect once to the endpoint's URI, the way the data path will: is it reachable, how large,
    writable? Fills `size`."""
    try:
        h = backend.open_handle(endpoint.uri, endpoint.label, allocation=False)
    except backend.SideUnreachable as e:
        raise BackendError(f"{endpoint.label} {endpoint.spec}: {e.reason}") from None
    try:
        endpoint.size = h.get_size()
        return {"size": endpoint.size, "read_only": h.is_read_only()}
    finally:
        h.shutdown()
