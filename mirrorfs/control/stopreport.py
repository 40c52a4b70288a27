"""What mirrorfs says when it stops while the sides may differ.

Stopping is always allowed, but a destination that is not a copy of the source must never look like
one. The data path's last status (taken after quiescing, with nothing in flight) says how much may
differ. Without a state directory that knowledge dies with the process, so the operator gets one
line and the exit status EXIT_DIVERGED: nothing else will ever know which regions to copy again.
With a state directory the difference is recorded there and the same command line copies it: one
line says where, and the exit status stays 0 (stopping mid-copy is a normal, resumable operation).
"""

from mirrorfs.common.sizes import human_size

# The exit status of `serve` and `start` when they stopped with the sides different and nothing
# records where (README: "Exit status").
EXIT_DIVERGED = 3


def divergence(tree):
    """(line, exit status) for a ProcessTree that has stopped, or None when the sides are known
    identical or only one side was being written (readonly, switched, cancelled)."""
    final = tree.final_status
    if final is None or len(final.get("writers", ())) < 2 or final.get("synchronized", True):
        return None
    amount = human_size(final.get("dirty_bytes", 0))
    if tree.options.state_path is not None:
        return (f"mirrorfs: stopped with up to {amount} that may differ between the sides, recorded "
                f"in {tree.options.state_path}; the same command line copies them again", 0)
    return (f"mirrorfs: stopped with up to {amount} that may differ between the sides: the "
            f"destination is not a copy of the source, and nothing records where they differ "
            f"(copy it again, or use --state-dir)", EXIT_DIVERGED)
