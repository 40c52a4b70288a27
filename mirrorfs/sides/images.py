"""qemu-img, wrapped: what an image file is (format, size, backing chain), and operations on it.

QEMU owns the qcow2 format; we never parse it. Every call here runs qemu-img and turns its failures into
one-line `ImageError`s.
"""

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mirrorfs.errors import ImageError

# Formats we serve. qemu-storage-daemon could export more, but these are the ones the migration
# workflow (overlays, rebase, compare) is designed and tested for.
SUPPORTED_FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class ImageInfo:
    path: Path          # absolute path of the image
    format: str
    virtual_size: int
    chain: tuple        # absolute paths, this image first, then its backing files down to the base
    cluster_size: int | None = None
    # The unit in which the image itself holds data or not: its clusters, or their 32
    # subclusters with qcow2's extended L2 entries (None for raw).
    allocation_unit: int | None = None
    # Each layer's format, in the order of `chain` (a named disk's record keeps them: mirrorfs.host.registry).
    formats: tuple = ()



def _run(argv, what, pass_fds=()):
    try:
        res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             pass_fds=pass_fds)
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed (run 'make setup')") from None
    if res.returncode != 0:
        # The last few lines, joined: a lock failure's last line is only the question "Is another
        # process using the image?", and the cause ('Failed to get shared "write" lock') is the line before.
        lines = [line.strip().removeprefix("qemu-img: ") for line in res.stderr.splitlines() if line.strip()]
        msg = " | ".join(lines[-3:]) if lines else f"exit status {res.returncode}"
        raise ImageError(f"{what}: {msg}")
    return res.stdout


def info(path, force_share=False):
    """Probe an image file and its backing chain. Fails if any file in the chain is missing.
    `force_share`: also while another process has it open for writing (qemu-img -U), to name that
    process's disk rather than fail on its lock (mirrorfs.host.registry)."""
    path = Path(path)
    if "rbd:" in str(path) and not path.exists():
        # Only `serve` takes RBD images (mirrorfs/sides/rbd.py); the overlay workflow is built on qcow2
        # files and their backing chains. (`start` has made the spec an absolute path by now.)
        spec = str(path)[str(path).index("rbd:"):]
        raise ImageError(f"{spec}: an RBD image, not a file; to move a disk to or from Ceph use "
                         "'mirrorfs serve --copy full SOURCE DEST' (README: Moving a disk to Ceph)")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    # Only regular files: qemu-img would block forever opening a fifo, and the storage daemon's 'file'
    # driver refuses devices anyway (after the other side's daemon has already been started).
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: permission denied")
    out = _run(["qemu-img", "info", *(["-U"] if force_share else []), "--output=json",
                "--backing-chain", str(path)], str(path))
    layers = json.loads(out)
    top = layers[0]
    fmt = top["format"]
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(f"{path}: unsupported format '{fmt}' (supported: {', '.join(SUPPORTED_FORMATS)})")
    if fmt == "raw":
        _check_raw(path)
    chain = tuple(Path(layer["filename"]).resolve() for layer in layers)
    cluster = top.get("cluster-size")
    extended = (top.get("format-specific") or {}).get("data", {}).get("extended-l2", False)
    return ImageInfo(path=path.resolve(), format=fmt, virtual_size=top["virtual-size"], chain=chain,
                     cluster_size=cluster,
                     allocation_unit=cluster // 32 if cluster and extended else cluster,
                     formats=tuple(layer["format"] for layer in layers))


# A raw image is whatever qemu-img finds no format in, so any file "is" one: a 20-byte text file
# was once served as a disk of 20 bytes. A disk is made of 512-byte sectors, and its first sector
# holds a partition table, a boot sector, a file system's superblock, or zeros: never only text.
SECTOR = 512


def _check_raw(path):
    """Refuse a file probed as raw that cannot be a disk image: empty, not a whole number of
    512-byte sectors, or whose first sector is text (lines of printable ASCII, no zero byte).
    docs/USING.md ("Which files are disk images") says why these rules."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(SECTOR)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    if size == 0:
        raise ImageError(f"{path}: an empty file, not a disk image")
    if size % SECTOR:
        raise ImageError(f"{path}: not a disk image: {size} bytes, not a whole number of "
                         f"{SECTOR}-byte sectors (a raw image is; qcow2 is detected by its header)")
    if _is_text(first):
        raise ImageError(f"{path}: not a disk image: its first sector is text (a raw image "
                         "starts with a partition table, a boot sector, a file system or zeros)")


def _is_text(data):
    """Lines of printable ASCII: a test pattern that fills a sector with one letter is not text
    (it has no line break), nor is anything with a zero byte or a byte above 126."""
    return b"\n" in data and all(32 <= b < 127 or b in b"\t\n\r\f" for b in data)


def data_bytes(image):
    """How many bytes of the image's chain hold data (allocated and not known to read as zeros):
    what a sparse copy reads and writes, and what `qemu-img convert -p`'s percentage is a share of."""
    out = _run(["qemu-img", "map", "-U", "--output=json", "-f", image.format, os.fspath(image.path)],
               str(image.path))
    return sum(extent["length"] for extent in json.loads(out)
               if extent.get("data") and not extent.get("zero"))
def is_empty(image):
    """Whether the image (ImageInfo, without a backing file) has no cluster allocated at all: not
    even one that reads as zeros."""
    out = _run(["qemu-img", "map", "-U", "--output=json", "-f", image.format,
                os.fspath(image.path)], str(image.path))
    return not any(extent.get("present") for extent in json.loads(out))


def commit_own_data(image):
    """Write what the overlay `image` (ImageInfo) holds itself into its backing file, if it holds
    anything (qemu-img commit; -d: the overlay is removed by the caller anyway). An overlay
    holding nothing leaves its backing file untouched: not even opened for writing. Returns
    whether anything was committed."""
    out = _run(["qemu-img", "map", "--output=json", "-f", image.format, os.fspath(image.path)],
               str(image.path))
    if not any(extent.get("depth") == 0 and extent.get("present", extent.get("data"))
               for extent in json.loads(out)):
        return False
    _run(["qemu-img", "commit", "-q", "-d", "-f", image.format, os.fspath(image.path)],
         f"commit {image.path}")
    return True


# A new overlay holds whatever the guest writes from now on: readable by its owner alone (the user
# running mirrorfs and its storage daemons), whatever the umask. An operator can share it afterwards.
OVERLAY_MODE = 0o600


def refuse_symlink(path, what):
    """A symbolic link where we are about to create a file is refused, dangling or not: following it
    would create or write a file outside the directory the operator named."""
    if Path(path).is_symlink():
        raise ImageError(f"{what} {path} is a symbolic link; mirrorfs creates it itself and does "
                         "not follow links there")


def create_overlay(path, backing):
    """A new qcow2 overlay at `path` on top of the image `backing` (an ImageInfo). The backing is
    named by its absolute path and format, so the overlay never depends on the directory it is
    opened from or on format probing. -u: the backing may be open in a storage daemon, and its
    size is already known."""
    return _create(path, "qcow2", backing.virtual_size, "overlay",
                   ["-u", "-b", os.fspath(backing.path), "-F", backing.format])


def create_image(path, fmt, size):
    """A new, empty image at `path` of `size` bytes with no backing file: the destination of an
    evacuation (`start --switch-first`), which the hydration fills."""
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(f"{path}: unsupported format '{fmt}'")
    return _create(path, fmt, size, "destination image", [])


def _create(path, fmt, size, what, options):
    """The file is created here, exclusively and without following a symlink (O_EXCL |
    O_NOFOLLOW), mode OVERLAY_MODE; qemu-img then writes the image into that very file through
    /dev/fd/N, so a path swapped meanwhile cannot redirect it."""
    path = Path(path)
    refuse_symlink(path, what)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     OVERLAY_MODE)
    except FileExistsError:
        raise ImageError(f"{path}: already exists; remove it or choose another name") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot create: {e.strerror}") from None
    try:
        _run(["qemu-img", "create", "-q", "-f", fmt, *options, f"/dev/fd/{fd}", str(size)],
             str(path), pass_fds=(fd,))
        ours = os.fstat(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    now = os.lstat(path)
    if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
        raise ImageError(f"{path}: replaced by something else while it was being created")
    return info(path)


def compare(a, b):
    """Compare the guest-visible content of two images (ImageInfo), chains included.

    qemu-img compare walks both chains' allocation, so holes and zeros cost nothing. Returns
    (identical, detail).
    """
    if a.virtual_size != b.virtual_size:
        return False, f"sizes differ: {a.path} is {a.virtual_size} bytes, {b.path} is {b.virtual_size}"
    res = subprocess.run(["qemu-img", "compare", "-f", a.format, "-F", b.format,
                          os.fspath(a.path), os.fspath(b.path)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode == 0:
        return True, "identical"
    if res.returncode == 1:
        return False, res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "content differs"
    lines = [l.strip().removeprefix("qemu-img: ") for l in res.stderr.splitlines() if l.strip()]
    raise ImageError(f"cannot compare {a.path} and {b.path}: {lines[-1] if lines else res.returncode}")
