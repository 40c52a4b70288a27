"""Commands that take a disk by name (issue #26): `mirrorfs start vm1 --dest-dir /srv/b`, `mirrorfs
status vm1`, `mirrorfs pivot vm1`, ... A name is looked up in the registry (mirrorfs.host.registry):

- `start NAME` borrows the disk from the host service (control.lender.HostLender);
- `start PATH` (no name) still starts a migration of an image file, unless that image belongs to a
  named disk: then it is refused with the disk's name and chain, since a migration behind the
  registry's back would leave the record naming a chain that lacks the migration's writes;
- `status|copy|pivot|cancel|hand-back|rate NAME` talk to the migration the disk is lent to (the
  record names its control socket); a disk that is not lent says, in one line, what it is doing
  and what to do. A path (a control socket) works as before.
"""

import os
from pathlib import Path

from mirrorfs.control.lender import HostLender
from mirrorfs.errors import UsageError
from mirrorfs.host import registry as disks


def registry(args, create=False):
    """The registry of `--registry`, $MIRRORFS_REGISTRY or the default; None if it does not exist
    (no disk was ever added) and `create` is false."""
    path = Path(args.registry) if getattr(args, "registry", None) else disks.default_path()
    if not create and not path.exists():
        return None
    return disks.Registry(path, create=create)


def is_name(text):
    return text is not None and "/" not in text and disks.NAME.match(text) is not None


def start_lender(args, run_dir):
    """`start`'s first argument: (HostLender, None) for a named disk, else (None, SOURCE_TOP), after
    refusing an image that a named disk holds."""
    target = args.source_top
    if target is None or args.take_over:
        return None, target
    reg = registry(args)
    if is_name(target) and reg is not None and reg.file(target).exists():
        reg.get(target)         # a damaged record is refused here, before anything starts
        return HostLender(reg, run_dir, target), None
    refuse_named(args, target, "migrate the disk by its name: mirrorfs start NAME --dest-dir DIR")
    if is_name(target) and not os.path.exists(target):
        where = reg.path if reg is not None else disks.default_path()
        raise UsageError(f"no disk named {target} in {where}, and no image file {target}")
    return None, target


def group_lender(args, run_dir, name):
    """A member of `start NAME NAME...`: a named disk (an unknown name refused in one line)."""
    reg = registry(args)
    if not is_name(name) or reg is None or not reg.file(name).exists():
        where = reg.path if reg is not None else disks.default_path()
        raise UsageError(f"no disk named {name} in {where}: a group moves named disks "
                         "(mirrorfs add NAME IMAGE --socket PATH)")
    reg.get(name)
    return HostLender(reg, run_dir, name)


def group_control(run_dir, first):
    """Where a group puts its control socket when --control is not given (every member's record
    names it)."""
    return str(run_dir.file(f"{first}.group.ctl"))


def refuse_named(args, image, what_to_do):
    """Refuse to serve `image` outside the host service when a named disk holds it (its current
    chain, a loan's, or a retired image): served twice, or served old, it would lose writes."""
    reg = registry(args)
    if reg is None or image is None or not os.path.exists(image):
        return
    owner = reg.owner(image)
    if owner is not None:
        record, role = owner
        raise UsageError(f"{image} belongs to the disk {disks.describe(record)} ({role}): "
                         + what_to_do.replace("NAME", record["name"]))


def control_of(args):
    """The control socket a client command talks to: --control, a path given as TARGET, or the
    migration a named disk is lent to."""
    target = getattr(args, "target", None)
    if target is None:
        if not args.control:
            raise UsageError("give a disk's NAME or --control PATH (or set MIRRORFS_CONTROL)")
        return args.control
    if not is_name(target) or os.path.exists(target):
        return target
    reg = registry(args)
    if reg is None:
        raise UsageError(f"no disk named {target}: the registry {disks.default_path()} does not "
                         "exist (mirrorfs add creates it)")
    record = reg.get(target)
    lent = record["lent"]
    if lent is None:
        raise UsageError(f"the disk {target} is not lent to a migration: the host service serves "
                         f"{disks.top(record)} (start one: mirrorfs start {target} --dest-dir DIR "
                         "--state-dir DIR)")
    if not disks.borrower_alive(lent):
        resume = (f"resume it: {resume_command(target, lent)}" if lent["state_dir"] else
                  "it had no state directory: the host service takes the disk back")
        raise UsageError(f"the disk {target} is lent to migration {lent['migration']}, whose "
                         f"process (pid {lent['pid']}) died; {resume}")
    if not lent.get("control"):
        raise UsageError(f"the disk {target} is lent to migration {lent['migration']} (pid "
                         f"{lent['pid']}), which has no control socket")
    return lent["control"]


def migration_control(run_dir, name):
    """Where `start NAME` puts its control socket when --control is not given."""
    return str(run_dir.file(f"{name}.migration.ctl"))


def resume_command(name, lent):
    """The command line that resumes the migration of a loan (the record knows its directories)."""
    dest = lent["destination"][0]["path"]
    if dest.startswith("rbd:"):     # rbd:POOL/IMAGE[:options] -> rbd:POOL[:options]
        pool, _, rest = dest.partition("/")
        dest_dir = pool + rest[len(rest.split(":")[0]):]
    else:
        dest_dir = os.path.dirname(dest)
    switch_first = " --switch-first" if lent.get("evacuation") else ""
    return (f"mirrorfs start {name} --dest-dir {dest_dir} --state-dir {lent['state_dir']}"
            f"{switch_first}")
