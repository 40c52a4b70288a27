"""Who lends a migration its disk, and where the migration records each of its ends.

A migration that serves a disk somebody else serves between migrations borrows it: the lender stops
serving and passes the disk's listening socket, so clients wait in its backlog while the disk changes
hands, and the migration gives the disk back on the chain it ended on. Two lenders:

    ExportLender(EXPORT_CONTROL)    `start --take-over`: a `mirrorfs export` (control.export); it
                                    keeps no record, and its image is whatever it is given back.
    HostLender(registry, run_dir, NAME)
                                    `start NAME`: the host service (`mirrorfs host`) and the disk's
                                    durable record (mirrorfs.host.registry). Every transition is
                                    recorded *before* anything is served from the chain it leads
                                    to: `lend` (by the service, before it stops its daemon),
                                    `switched` / `cancelled` (by the migration itself, inside the
                                    switch's hold: the service may be dead then), `returned` (by
                                    the service at give-back, before it serves the chain again).

One interface, so the migration never asks which one it holds:

    chain = lender.served(id)       the chain the disk was before the migration `id`, top first
                                    (an export knows only its top: its format is None)
    listener, socket = lender.borrow(loan)
    lender.switched(); lender.cancelled()       the switch's commit points (inside the hold)
    lender.give_back(chain)         serve `chain` (top first, [{"path", "format"}]) again

`loan` is what the record keeps of the migration (its id, control socket, state directory and the
two chains); the export needs only the pid.
"""

import os
import secrets

from mirrorfs.control import export
from mirrorfs.errors import UsageError
from mirrorfs.host import hostctl
from mirrorfs.host import registry as disks


class ExportLender:
    """A `mirrorfs export` (its control socket): today's --take-over."""

    named = False

    def __init__(self, control):
        self.control = control
        self.what = f"the export at {control}"

    def served(self, migration):
        return [{"path": export.served_image(self.control), "format": None}]

    def borrow(self, loan):
        listener, reply = export.borrow(self.control)
        return listener, reply

    def switched(self):
        """An export keeps no record: nothing to commit."""

    cancelled = reverted = switched

    def ready(self):
        """An export that is gone fails the give-back itself (as it always did)."""

    def give_back(self, chain, undone=False):
        return export.give_back(self.control, chain[0]["path"])

    @property
    def who(self):
        return "the export"


class HostLender:
    """A named disk of the host service: its record says what the disk is, and is kept true at every
    transition of the loan."""

    named = True

    def __init__(self, registry, run_dir, name):
        self.registry = registry
        self.name = name
        self.run_dir = run_dir
        self.what = f"the disk {name}"
        self.migration = None           # the loan's migration id, once borrowed

    def record(self):
        return self.registry.get(self.name)

    def served(self, migration):
        """The disk's chain before this migration: the record's chain now, or, for a resume of
        `migration` (its id in the state directory), the chain its loan started from. A disk lent
        to another migration is refused, in one line that says what to do."""
        record = self.record()
        lent = record["lent"]
        if not lent:
            return record["chain"]
        if lent["migration"] == migration:
            return lent["source"][0 if lent["evacuation"] else 1:]
        if disks.borrower_alive(lent):
            raise UsageError(f"the disk {self.name} is lent to migration {lent['migration']} (pid "
                             f"{lent['pid']}, running): see mirrorfs status {self.name}")
        raise UsageError(f"the disk {self.name} is still lent to migration {lent['migration']}, "
                         f"whose process (pid {lent['pid']}) died: resume it with its own "
                         f"--state-dir ({lent['state_dir'] or 'it had none'}), or wait until the "
                         "host service takes the disk back (mirrorfs list shows it)")

    def borrow(self, loan):
        """Ask the host service for the disk: it records the loan, stops the disk's daemon and
        passes the listening socket."""
        listener, reply = hostctl.borrow(self.run_dir, self.name, pid=os.getpid(), **loan)
        self.migration = loan["migration"]
        return listener, {"socket": reply["socket"], "record": reply["record"]}

    def switched(self):
        """The switch's commit point for the host (inside the hold): the disk is the destination's
        chain from now on. Written to the registry directly, so a dead service does not stop it."""
        self.registry.switched(self.name, self.migration)

    def cancelled(self):
        self.registry.cancelled(self.name, self.migration)

    def reverted(self):
        """A group's revert: the disk is the source's chain again (inside the hold)."""
        self.registry.reverted(self.name, self.migration)

    def ready(self):
        """Before a hand-back stops serving the disk: the service must be there to take it."""
        if not hostctl.running(self.run_dir):
            raise UsageError(f"no host service answers at {hostctl.control_path(self.run_dir)}: "
                             "start it (mirrorfs host, or the mirrorfs-host unit), then hand back "
                             "again; the migration serves the disk meanwhile")

    def give_back(self, chain, undone=False):
        """The service records the end of the loan (`returned`, or `undone`: a start undone, the
        chain from before the loan) and serves `chain` again."""
        return hostctl.give_back(self.run_dir, self.name, migration=self.migration, chain=chain,
                                 undone=undone)

    @property
    def who(self):
        return f"the host service ({self.name})"


# The migration's identity: made when its state is first made (datapath.statedir keeps it in
# owner.json, with the disk's name), named by the disk's record while the disk is lent to it. A
# resume reads it back from the state, so it borrows the same loan. Without a state directory it
# lives as long as the process: nothing can resume such a migration anyway.

def migration_id(saved, disk=None):
    """The id of the migration whose state `saved` is (a State, or None: a new id); refused if the
    state is another disk's."""
    if saved is None:
        return secrets.token_hex(16)
    if disk is not None and saved.disk is not None and saved.disk != disk:
        raise UsageError(f"the state in {saved.directory} is a migration of the disk {saved.disk}, "
                         f"not of {disk}; give another --state-dir")
    return saved.migration
