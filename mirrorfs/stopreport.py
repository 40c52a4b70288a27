"""What mirrorfs says when it stops while the sides may differ.

Stopping is always allowed, but a destination that is not a copy of the source must never look like
one. The data path's last status (taken after quiescing, with nothing in flight) says how much may
differ. Without a state directory that knowledge dies with the process, so the operator gets one
line and the exit status EXIT_DIVERGED: nothing else will ever know which regions to copy again.
With a state directory the difference is recorded there and the same command line copies it: one
line says where, and the exit status stays 0 (stopping mid-copy is a normal, resumable operation).
"""

# The exit status of `serve` and `start` when they stopped with the sides different and nothing
# records where (README: "Exit status").
EXIT_DIVERGED = 3


def _amount(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def divergence(server):
    """(line, exit status) for a MirrorServer that has stopped, or None when the sides are known
    identical or only one side was being written (readonly, switched, cancelled)."""
    final = server.final_status
    if final is None or len(final.get("writers", ())) < 2 or final.get("synchronized", True):
        return None
    amount = _amount(final.get("dirty_bytes", 0))
    if server.state_dir is not None:
        return (f"mirrorfs: stopped with up to {amount} that may differ between the sides, recorded "
                f"in {server.state_dir}; the same command line copies them again", 0)
    return (f"mirrorfs: stopped with up to {amount} that may differ between the sides: the "
            f"destination is not a copy of the source, and nothing records where they differ "
            f"(copy it again, or use --state-dir)", EXIT_DIVERGED)
