"""Images made with qemu-img/qemu-io, and checks of what they hold."""

import hashlib
from pathlib import Path

from lib.commands import run

MiB = 1024 * 1024


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def qemu_io(target, *commands, fmt="raw"):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    res = run(*argv, target)
    # qemu-io reports failed commands on stdout and still exits 0.
    assert "failed" not in res.stdout.lower() and "error" not in res.stdout.lower(), res.stdout
    return res.stdout


def images_identical(a, b):
    res = run("qemu-img", "compare", a, b, check=False)
    return res.returncode == 0, (res.stdout + res.stderr).strip()


def make_base(path, size=64 * MiB, fmt="qcow2"):
    """A base image with recognizable data: a pattern per MiB in the first half, holes after."""
    run("qemu-img", "create", "-q", "-f", fmt, path, str(size))
    commands = [f"write -P {0x10 + i} {i * MiB} {MiB}" for i in range(0, size // MiB // 2, 3)]
    qemu_io(path, *commands, fmt=fmt)
    return Path(path)


def make_overlay(path, backing, backing_fmt="qcow2"):
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path)
    return Path(path)


def make_full_pair(workdir, size):
    """src.qcow2 with a pattern in every other MiB (0x30, 0x31, ...), and an empty dst.qcow2 of the
    same size: the endpoints of a full copy."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", src, str(size))
    qemu_io(src, *[f"write -P {0x30 + i} {i * 2 * MiB} {MiB}" for i in range(size // (2 * MiB))],
            fmt="qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", dst, str(size))
    return src, dst


class Chains:
    """src/base ← src/snap (source) and src/base ← dst/snap (destination), as during a migration."""

    def __init__(self, root, size=64 * MiB):
        (root / "src").mkdir()
        (root / "dst").mkdir()
        self.base = make_base(root / "src" / "base.qcow2", size)
        self.source = make_overlay(root / "src" / "snap.qcow2", self.base)
        self.dest = make_overlay(root / "dst" / "snap.qcow2", self.base)


def check_images(chains):
    """Both overlays are consistent qcow2 images (no leaks, no corruption) and hold the same data."""
    for image in (chains.source, chains.dest):
        res = run("qemu-img", "check", image, check=False)
        assert res.returncode == 0, f"qemu-img check {image}: {res.stdout}{res.stderr}"
    identical, detail = images_identical(chains.source, chains.dest)
    assert identical, detail
