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

    @property
    def backing(self):
        return self.chain[1] if len(self.chain) > 1 else None


def _run(argv, what):
    try:
        res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed (run 'make setup')") from None
    if res.returncode != 0:
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        msg = lines[-1] if lines else f"exit status {res.returncode}"
        msg = msg.removeprefix("qemu-img: ")
        raise ImageError(f"{what}: {msg}")
    return res.stdout


def info(path):
    """Probe an image file and its backing chain. Fails if any file in the chain is missing."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: permission denied")
    out = _run(["qemu-img", "info", "--output=json", "--backing-chain", str(path)], str(path))
    layers = json.loads(out)
    top = layers[0]
    fmt = top["format"]
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(f"{path}: unsupported format '{fmt}' (supported: {', '.join(SUPPORTED_FORMATS)})")
    chain = tuple(Path(layer["filename"]).resolve() for layer in layers)
    return ImageInfo(path=path.resolve(), format=fmt, virtual_size=top["virtual-size"], chain=chain,
                     cluster_size=top.get("cluster-size"))
