"""The guests' file systems checked from the host: the chain as raw bytes, e2fsck, and each file read
back with debugfs (never mounted)."""

import hashlib
import subprocess

from lib.commands import run


def check_filesystem(image, fmt, workdir, expected):
    """The chain `image` as raw bytes: a clean ext4 (e2fsck -fn) holding the files the guest wrote
    (read with debugfs, not mounted). Returns the commands it ran for the first file."""
    raw = workdir / "check.raw"
    convert = ["qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw]
    run(*convert)
    fsck = ["e2fsck", "-fn", raw]
    res = subprocess.run(fsck, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    ran = [convert, fsck]
    found = {}
    for name in sorted(expected):
        cat = ["debugfs", "-R", f"cat /{name}", raw]
        res = subprocess.run(cat, capture_output=True)
        assert res.returncode == 0, res.stderr.decode()
        found[name] = hashlib.sha256(res.stdout).hexdigest()
        if len(ran) == 2:
            ran.append(cat)
    assert found == expected
    raw.unlink()
    return ran
