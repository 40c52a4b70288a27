"""Talking to the host service (mirrorfs.host.service) on RUN_DIR/host.ctl: what the CLI's `add`,
`remove`, `list` and a migration of a named disk call.

    listener, reply = borrow(run_dir, "vm1", migration=ID, control=CTL, state_dir=DIR,
                             source=[{"path", "format"}, ...], destination=[...], evacuation=False)
    ...                                         # serve the disk on `listener` (ours to close)
    give_back(run_dir, "vm1", migration=ID, chain=[...])

`borrow` records the loan in the registry (before the service stops the disk's daemon) and returns the
disk's listening socket; `reply["record"]` is the disk's record as it stands after the loan. A
migration that dies keeps nothing: the service holds its own copy of the socket, and takes the disk
back after --take-back-after seconds unless the same migration borrows it again (a resume).
"""

from mirrorfs.common import jsonlines
from mirrorfs.errors import Error
from mirrorfs.system import sockets

CONTROL = "host.ctl"


def control_path(rundir):
    return rundir.path / CONTROL


def running(rundir):
    """Whether a host service answers on this run directory's control socket."""
    try:
        jsonlines.call(control_path(rundir), {"cmd": "list"}, timeout=30)
    except jsonlines.ControlError:
        return False
    return True


def call(rundir, cmd, timeout=120, **fields):
    """One request to the host service; its refusal, or its absence, is one line."""
    path = control_path(rundir)
    try:
        return jsonlines.call(path, {"cmd": cmd, **fields}, timeout=timeout)
    except jsonlines.ControlError as e:
        raise Error(_explain(path, e)) from None


def _explain(path, error):
    text = str(error)
    if text.startswith(("no control socket", "nothing listens")):
        return f"no host service at {path} (start it: mirrorfs host, or the mirrorfs-host unit)"
    return text


def borrow(rundir, name, *, pid, migration, control, state_dir, source, destination,
           evacuation=False):
    """Borrow the named disk for the migration `migration` (process `pid`): (listener, reply)."""
    path = control_path(rundir)
    try:
        reply, fds = jsonlines.call_with_fds(path, {
            "cmd": "lend", "disk": name, "pid": pid, "migration": migration, "control": control,
            "state_dir": state_dir, "source": source, "destination": destination,
            "evacuation": evacuation}, timeout=120)
    except jsonlines.ControlError as e:
        raise Error(f"cannot borrow the disk {name}: {_explain(path, e)}") from None
    return sockets.received_listener(fds, f"the host service at {path}"), reply


def give_back(rundir, name, *, migration, chain, undone=False):
    """The migration ends on `chain`: the service records it and serves it again. `undone`: the
    migration's start was undone, `chain` is the disk's from before the loan."""
    return call(rundir, "give-back", disk=name, migration=migration, chain=chain,
                **({"undone": True} if undone else {}))
