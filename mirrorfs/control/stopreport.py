"""What mirrorfs says when it stops while the sides may differ.

Stopping is always allowed, but a destination that is not a copy of the source must never look like
one. The data path's last status (taken after quiescing, with nothing in flight) says how much may
differ. Without a state directory that knowledge dies with the process, so the operator gets one
line and the exit status EXIT_DIVERGED: nothing else will ever know which regions to copy again.
With a state directory the difference is recorded there and the same command line copies it: one
line says where, and the exit status stays 0 (stopping mid-copy is a normal, resumable operation).
"""

from mirrorfs.common.phases import Phase
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


def next_step(migration, command):
    """The line a migration (`start`) that stopped before its hand-back prints: how to go on, for
    every way it can be left. `command` is its own command line, which resumes it when it has a
    state directory. None when nothing is left to do (handed back, or never started)."""
    phase = migration.stopped_in
    if phase in (Phase.NEW, Phase.HANDED_BACK, None):
        return None
    lender = migration.lender
    if migration.state_dir is not None:
        line = (f"mirrorfs: stopped while {phase}; the state in {migration.state_dir} keeps it: "
                f"resume with the same command line ({command})")
        if lender is not None and lender.named:
            line += (f"; if it is not resumed, the host service takes the disk {lender.name} back "
                     f"on the chain its record names, and this migration is over")
        elif phase in (Phase.SWITCHED, Phase.CANCELLED, Phase.HYDRATED) and lender is not None:
            line += ", then hand the disk back (mirrorfs hand-back)"
        return line
    if lender is not None and lender.named:
        # Under the safety net (pivoted) the record says destination, which holds every write.
        side = "destination" if phase in (Phase.SWITCHED, Phase.HYDRATED, Phase.PIVOTED) \
            else "source"
        return (f"mirrorfs: stopped while {phase} without a state directory: the host service takes "
                f"the disk {lender.name} back on its {side} chain; to move it, start a new "
                f"migration (mirrorfs start {lender.name} --dest-dir DIR --state-dir DIR)")
    if phase == Phase.SWITCHED:
        return (f"mirrorfs: stopped after the switch: the disk is {migration.dest_overlay} now "
                "(serve that chain)")
    if phase == Phase.CANCELLED:
        return (f"mirrorfs: stopped after the cancel: the disk is {migration.source_overlay} "
                "(serve that chain)")
    return None
