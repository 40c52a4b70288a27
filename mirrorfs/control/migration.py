"""The Mirrored-Snapshot migration (oVirt's design, Steps 3–5), on a disk served without interruption.

    Step 3  start   [src/base] <- [src/snap] <= reads and writes      (the source chain)
                    [src/base] <- [dst/snap] <= writes only
    Step 4  copy    src/base copied to dst/base (by `copy`, or by a manager with cp -a)
    Step 5  pivot   check dst/base == src/base, rebase dst/snap onto dst/base while it is open,
                    then [dst/base] <- [dst/snap] <= reads and writes; the source is released
    or      cancel  [src/base] <- [src/snap] <= reads and writes; dst/snap is removed

A named disk (`start NAME`, lent by the host service) keeps a **safety net** after its pivot, as a
group does (control.group): reads come from the destination, every change still goes to both sides
(the destination first), so `revert` puts it back on the source with nothing to copy, and `commit`
ends the net (the source retired, kept as the disk was at the commit). `pivot --commit` switches at
once, and `hand-back` after a pivot commits first. A migration of an image path (`start
SOURCE_TOP`, `--take-over`) has no net: its pivot is final, as the oVirt flow it follows expects
(its manager knows no revert), and `revert`/`commit` are refused in one line; so is a disk with
`--lag` (the net writes both sides at once, a lag one behind) or `--switch-first`.

"src/base" is the top of the chain as it was before the migration (`source_top`); it may itself have
backing files, and the copy flattens them into one dst/base.

Why dst/snap is backed by the *source* base until the switch: a qcow2 overlay is written a cluster at a
time, and qcow2 fills the part of a cluster that a write does not cover from the backing file, or with
zeros when there is none. Had dst/snap been created on a dst/base that does not exist yet, every small
write would zero the rest of its cluster, and those zeros would hide dst/base's data once it arrived.
Backed by src/base, the fill is the right data; at the switch the backing is changed to the verified
copy, whose content is the same, so nothing the overlay holds changes meaning.
"""

import shutil
import threading
import time
from pathlib import Path

from mirrorfs.common.phases import Phase
from mirrorfs.control import lender as lenders
from mirrorfs.host.registry import chain_of
from mirrorfs.sides import images
from mirrorfs.control.basecopy import BaseCopy
from mirrorfs.control.controller import Controller, PhaseError, rate
from mirrorfs.datapath import statedir
from mirrorfs.datapath.state import StateError
from mirrorfs.errors import Error, ImageError, UsageError
from mirrorfs.control.options import ServeOptions
from mirrorfs.daemons.tree import ProcessTree

__all__ = ["INCOMPLETE_SOURCE", "Migration", "PhaseError", "net_cost"]

# Why a net's commit keeps a source that is not the disk at the commit, when no source died
# before it (datapath.mirror.disk.Disk._kept_whole said so, inside the hold); after "its source"
# here, after "the source of A, B" in a group's record.
INCOMPLETE_SOURCE = ("did not hold every change at the commit (a write to it failed, or it did not "
                     "answer the commit's flush)")


class Migration(Controller):
    """One migration of one disk. The CLI and the control socket are thin layers over this class.

        m = Migration("/src/base.qcow2", "/dst", ServeOptions(socket="/run/vm1.sock"))
        m.start()                   # Step 3: overlays created, disk served, writes mirrored
        m.copy(rate=200 << 20)      # Step 4: blocks until the base is copied (or wait=False)
        m.pivot()                   # Step 5: verified, switched; returns the client-visible stall
        m.stop()                    # stop serving (images stay as they are)

    Phases: mirroring (writes go to both overlays), copying-base (Step 4 running), switching,
    switched, cancelled, stopped.
    """
    kind = "migration"
    # The phases in which the disk is on one chain again, which `hand-back` gives to the export.
    ENDED = (Phase.SWITCHED, Phase.CANCELLED)

    def __init__(self, source_top, dest_dir, options=None, *, overlay_name=None, lender=None,
                 control=None, **serve_options):
        """`options`: ServeOptions (or its fields as keyword arguments: socket=, state_dir=, ...).
        The disk is borrowed at start from `lender` (control.lender: the host service for a named
        disk), or from the export whose control socket is `options.take_over`; `source_top` may
        then be None: the lender says what the disk is. `control`: this migration's own control
        socket, which the disk's record names while the disk is lent to it."""
        super().__init__()
        self.options = options or ServeOptions(**serve_options)
        self._check_options()
        self.take_over = self.options.take_over
        self.lender = lender or (lenders.ExportLender(self.take_over) if self.take_over else None)
        self.control = str(control) if control else None
        if source_top is None and self.lender is None:
            raise UsageError("give SOURCE_TOP, or --take-over the control socket of an export")
        if overlay_name is not None and ("/" in overlay_name or overlay_name in ("", ".", "..")):
            raise UsageError(f"--overlay-name {overlay_name!r}: expected a file name, not a path")
        self._overlay_name = overlay_name
        if str(dest_dir).startswith("rbd:") and not self.options.switch_first:
            raise UsageError(f"--dest-dir {dest_dir}: a migration's overlays are qcow2 files; into "
                             "a Ceph pool, evacuate (--switch-first) or use 'mirrorfs serve --copy "
                             "full'")
        self.dest_dir = Path(dest_dir).absolute()
        self.source_top = self.source_overlay = self.dest_overlay = self.dest_base = None
        if source_top is not None:
            self._locate(source_top)
        self.state_dir = self.options.state_path
        self.base = None                # ImageInfo of source_top
        self.copier = None
        self.last_switch = None
        self._created = []              # files this migration made, removed again by cancel
        self._listener = None           # the disk's socket, borrowed from its lender
        self.migration_id = None        # made with the state (control.lender.migration_id)
        self._before = None             # the disk's chain before the migration (from the lender)
        self.stopped_in = None          # the phase `stop` found (control.stopreport.next_step)
        self._rebased = False           # the destination overlay is on the destination base
        self.net_since = None           # the safety net: up since (time.time())
        self.snapshot = None            # the commit of the net: when, the retired source chain
        self._loan_serving = None       # the side the disk's record said at the borrow
        self.chains = None              # {"before", "source", "destination"}: top first, formats
        # The copies' own limit: `mirrorfs copy --rate` (or `mirrorfs rate`); an evacuation's --rate.
        self._cap = self.options.rate
        # The data path's copier (the resync of degraded writes; an evacuation's hydrator), held
        # (0) until the host budget gives it a share.
        self._datapath_rate = 0 if self.options.hold_copy else self.options.rate
        self._running = (False, False)  # (base copy, data path's copy) at the budget's last look

    def _check_options(self):
        """What a migration's options may not be (an evacuation's own rules replace these): the
        CLI and the Python API both come through here."""
        if self.options.copy != "none" or self.options.readonly or self.options.switch_first:
            raise UsageError("a migration mirrors two overlays that start equal: no --copy, no "
                             "--readonly, no --switch-first (that is control.evacuation's)")
        if self.options.rate is not None:
            raise UsageError("--rate limits the hydration of --switch-first; a migration's base "
                             "copy takes 'mirrorfs copy --rate'")

    @property
    def has_net(self):
        """Does a bare `pivot` keep the safety net (see the module's docstring)?"""
        return (self.lender is not None and self.lender.named and not self.options.lag
                and not self.options.switch_first)

    def _need_net(self, command):
        if not self.has_net:
            why = ("a disk with --lag" if self.options.lag else
                   "a migration of an image path" if not (self.lender and self.lender.named) else
                   "this migration")
            raise UsageError(f"{command}: {why} has no safety net: its pivot is final (a named "
                             "disk keeps one: mirrorfs start NAME, or a group of them)")

    def _locate(self, source_top):
        """Where the migration's files are, from the top of the source chain."""
        self.source_top = Path(source_top).absolute()
        name = self._overlay_name or f"{self.source_top.stem}-snap.qcow2"
        self.source_overlay = self.source_top.parent / name
        self.dest_overlay = self.dest_dir / name
        self.dest_base = self.dest_dir / self.source_top.name

    # Step 3.

    def start(self):
        """Step 3; or, when the state directory holds this migration's state, resume it. With a
        lender, everything is checked before it stops serving, and a failure after that gives the
        disk back to it as it was."""
        with self.changing("start", Phase.NEW):
            saved = self._saved_state()
            self.migration_id = self.options.migration = lenders.migration_id(
                saved, self.lender.name if self.lender and self.lender.named else None)
            if self.lender is not None:
                self._locate_lent()
            if saved is None:
                self._check_paths()
            if self.lender is not None:
                self._borrow()
            try:
                if saved is not None:
                    self._resume(saved)
                else:
                    self._start_new()
            except BaseException:
                self._return_disk(saved)
                raise

    def _return_disk(self, saved):
        """A start that failed after the borrow: the lender serves the disk again, on the chain
        that holds it, if one image does."""
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        top = self._authoritative_top(saved)
        if top is not None:
            chain = self._chain_of(top)
            # Nothing of the loan is left (the overlays removed): the record as before the loan.
            self.lender.give_back(chain, undone=chain is self.chains["before"])

    def undo(self):
        """Undo this migration's start as if it had never happened (a group whose other member
        failed to start: control.group). The data path stops (requests in flight finish; held
        ones are sent again by the clients once the lender serves), what clients wrote meanwhile
        into the source overlay is committed into the chain below it (qemu-img commit; nothing is
        opened for writing when they wrote nothing), both overlays and the state are removed, and
        the lender serves the chain from before the loan again, its record as before the loan
        (registry.undone: nothing retired)."""
        with self.internal_change():
            if self.tree is not None:
                self.tree.stop()
            if self.source_overlay.exists():
                images.commit_own_data(images.info(self.source_overlay))
            for path in (self.source_overlay, self.dest_overlay):
                path.unlink(missing_ok=True)
            self._created.clear()
            if self.state_dir is not None:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self.lender.give_back(self.chains["before"], undone=True)
            self.enter(Phase.CANCELLED, undone=True)

    def _chain_of(self, top):
        """The chain (top first, with formats) whose top is `top`: one of the loan's."""
        for chain in (self.chains["destination"], self.chains["source"], self.chains["before"]):
            if chain[0]["path"] == str(top):
                return chain
        raise Error(f"{top} is the top of none of the migration's chains")

    def _authoritative_top(self, saved=None):
        """The top of the chain that holds every acknowledged write: the destination overlay once
        switched; the source overlay once anything was served from it; else the source's top."""
        phase = self.phase if self.phase not in (Phase.NEW, Phase.STOPPED) else (saved.phase if saved
                                                                          else Phase.NEW)
        if phase in (Phase.SWITCHED, Phase.PIVOTED):
            return self.dest_overlay
        if phase == Phase.NEW and self.source_overlay not in self._created and saved is None:
            return self.source_top
        return self.source_overlay

    def _locate_lent(self):
        """What the lender serves: the top of the source chain."""
        self._before = self.lender.served(self.migration_id)
        served = self._before[0]["path"]
        if self.source_top is not None and Path(served) != self.source_top.resolve():
            raise UsageError(f"{self.lender.what} is {served}, not {self.source_top}")
        self._locate(served)

    def _loan_chains(self, before):
        """The chains of the loan, top first, every layer with its format: `before` (the disk
        before the migration), `source` (what the disk is until a switch) and `destination` (what
        it is after one)."""
        return {"before": before,
                "source": [{"path": str(self.source_overlay), "format": "qcow2"}, *before],
                "destination": [{"path": str(self.dest_overlay), "format": "qcow2"},
                                {"path": str(self.dest_base), "format": before[0]["format"]}]}

    def _borrow(self):
        """Take the disk over from its lender: it records the loan, stops serving (its clients'
        requests in flight finish, nothing is answered with an error) and passes its listening
        socket."""
        # A named disk's record knows the chain and its formats; an export's image is probed once
        # the export has let it go (its daemon holds the image's lock until then).
        known = self._before[0]["format"] is not None
        self.chains = self._loan_chains(self._before) if known else None
        loan = {"migration": self.migration_id, "control": self.control,
                "state_dir": str(self.state_dir) if self.state_dir else None,
                "evacuation": self.options.switch_first, **({
                    "source": self.chains["source"], "destination": self.chains["destination"]}
                    if known else {})}
        self._listener, reply = self.lender.borrow(loan)
        self._loan_serving = ((reply.get("record") or {}).get("lent") or {}).get("serving")
        if not known:
            self.chains = self._loan_chains(chain_of(images.info(self.source_top)))
        if "image" in reply and Path(reply["image"]) != self.source_top:
            self._listener.close()
            self._listener = None
            self.lender.give_back([{"path": reply["image"]}])
            raise UsageError(f"the export's disk changed meanwhile: {reply['image']}")
        self.options.socket_path = Path(reply["socket"])
        self.log.add("taken-over", image=str(self.source_top), socket=reply["socket"],
                     migration=self.migration_id)

    def _commit(self, end):
        """The commit of a switch for the lender's record (None: the lender keeps none)."""
        if self.lender is None or not self.lender.named:
            return None
        return self.lender.switched if end == Phase.SWITCHED else self.lender.cancelled

    def _start_new(self):
        self.base = images.info(self.source_top)
        try:
            images.create_overlay(self.source_overlay, self.base)
            self._created.append(self.source_overlay)
            images.create_overlay(self.dest_overlay, self.base)
            self._created.append(self.dest_overlay)
            self.tree = self._tree()
            self.tree.start()
        except BaseException:
            self._undo_start()
            raise
        self.enter(Phase.MIRRORING, source_overlay=str(self.source_overlay),
                   dest_overlay=str(self.dest_overlay))

    def _tree(self):
        return ProcessTree(str(self.source_overlay), str(self.dest_overlay), self.options,
                           listener=self._listener)

    def _saved_state(self):
        """The state in the state directory, every file of it checked (datapath.statedir) before
        anything is borrowed or started; None if there is none."""
        if self.state_dir is None:
            return None
        try:
            return statedir.load(self.state_dir)
        except StateError as e:
            raise UsageError(str(e)) from None

    def _resume(self, saved):
        """After a crash or a stop: serve the overlays again; the data path copies whatever the
        state says may differ."""
        if saved.phase == Phase.CANCELLED:
            raise UsageError(f"the migration in {self.state_dir} was cancelled; the disk is "
                             f"{self.source_overlay}")
        for path in (self.source_overlay, self.dest_overlay):
            if not path.exists():
                raise UsageError(f"the state in {self.state_dir} is for a migration whose overlay "
                                 f"{path} is missing")
        self.base = images.info(self.source_top)
        self.dest_base.with_name(self.dest_base.name + ".partial").unlink(missing_ok=True)
        net = saved.reader == "destination" and not saved.ended
        if (saved.phase == Phase.SWITCHED or net) and self._commit(Phase.SWITCHED):
            # The state says switched, and the tree serves the destination alone: the record says
            # so first (a crash inside the switch, after the state and before the record). The
            # same for a group's net (reads from the destination).
            self._commit(Phase.SWITCHED)()
        elif self._loan_serving == "destination" and self._commit(Phase.CANCELLED):
            # The record took a switch the state never saw (a crash inside the switch's hold,
            # between the two): nothing was served from the destination, and the resumed mirror
            # reads the source again, which the record must say before it serves.
            self.log.add("warning", what="the switch was recorded but not made; the disk is the "
                         "source chain again")
            self._commit(Phase.CANCELLED)()
        # The overlays are this migration's, made by the start that saved the state: a cancel
        # removes the destination's again. Whether a destination base there was copied by
        # mirrorfs or put there by a manager (cp) is not known after a restart: a cancel keeps it
        # and says so.
        self._created = [self.source_overlay, self.dest_overlay]
        self.tree = self._tree()
        self.tree.start()
        if saved.phase == Phase.SWITCHED:
            self.enter(Phase.SWITCHED, resumed=True)
        elif net:
            self._rebased = True
            self.net_since = time.time()
            self.enter(Phase.PIVOTED, resumed=True, dirty_regions=len(saved.dirty))
        else:
            self.enter(Phase.MIRRORING, resumed=True, dirty_regions=len(saved.dirty))

    def _check_paths(self):
        if not self.dest_dir.is_dir():
            raise UsageError(f"destination directory {self.dest_dir} does not exist")
        if self.dest_dir.resolve() == self.source_top.parent.resolve():
            raise UsageError(f"destination directory {self.dest_dir} is the source's directory")
        for path in (self.source_overlay, self.dest_overlay):
            images.refuse_symlink(path, "overlay")
            if path.exists():
                raise UsageError(f"overlay {path} already exists (a migration already started?)")
        # `copy` creates the base there later (qemu-img convert follows links): refuse it now, while
        # nothing has been created yet.
        images.refuse_symlink(self.dest_base, "destination base")

    def _undo_start(self):
        if self.tree is not None:
            self.tree.stop()
        # The source overlay is removed only if nothing was ever served from it.
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created.clear()

    # Step 4.

    def copy(self, rate=None, wait=True):
        """Copy the source base to the destination with qemu-img convert. With wait=False it runs in
        the background; follow it with status() or events()."""
        with self.changing("copy", Phase.MIRRORING):
            if self.dest_base.exists():
                raise UsageError(f"destination base {self.dest_base} already exists "
                                 "(copied by a manager? then pivot verifies it)")
            self._cap = rate
            if self.host_share is not None:
                self.host_share.set_cap(rate)
            # Under a host budget the copy starts held: the budget's next look gives it its share.
            self.copier = BaseCopy(self.base, self.dest_base,
                                   rate=0 if self.host_share is not None else rate)
            self.copier.rate = rate
            if self.host_share is not None:
                self.host_share.renew()
            self.copier.start()
            self._created.append(self.dest_base)
            self.enter(Phase.COPYING_BASE, bytes_total=self.copier.total, rate=rate)
        watcher = threading.Thread(target=self._finish_copy, name="base copy", daemon=True)
        watcher.start()
        if wait:
            watcher.join()
            if self.copier.error:
                raise ImageError(f"base copy failed: {self.copier.error}")

    def _finish_copy(self):
        copier = self.copier
        try:
            copier.wait()
        except ImageError:
            pass
        with self.internal_change():
            if self.phase != Phase.COPYING_BASE:
                return                      # cancelled or stopped meanwhile
            seconds = round(copier.finished - copier.started, 3)
            if copier.error:
                self.log.add("error", what="base copy failed", detail=copier.error)
            self.enter(Phase.MIRRORING, copied=not copier.error, seconds=seconds)

    # Step 5.

    def verify(self):
        """Is the destination base a faithful copy of the source base? Returns (ok, detail)."""
        with self.changing("verify", Phase.MIRRORING, Phase.COPYING_BASE):
            return self._verify()

    def _verify(self):
        if not self.dest_base.exists():
            return False, (f"destination base {self.dest_base} does not exist: run 'mirrorfs copy' "
                           "or copy it there")
        if self.copier is not None and self.copier.running:
            return False, f"destination base {self.dest_base} is still being copied"
        copy = images.info(self.dest_base)
        shared = set(copy.chain) & set(self.base.chain)
        if shared:
            return False, (f"destination base {self.dest_base} uses the source file "
                           f"{sorted(shared)[0]} as backing; the destination must not depend on it")
        if copy.format != self.base.format:
            return False, (f"destination base {self.dest_base} is {copy.format}, the source base is "
                           f"{self.base.format}; copy it in the same format")
        same, detail = images.compare(self.base, copy)
        if not same:
            return False, f"destination base differs from the source base: {detail}"
        return True, "destination base matches the source base"

    def pivot(self, force=False, timeout=10.0, gate=None, prepared=False):
        """Switch the disk to the destination chain without disconnecting clients. Returns the
        stall clients saw, in seconds.

        A group (control.group) pivots its members in two steps: `prepare_pivot` (verified and
        rebased, every member, before any holds its clients), then `pivot(prepared=True,
        gate=...)`: `gate(commit)` runs inside the hold in place of the record's `commit`, so the
        group can wait there until every member holds, write its own record, then commit each."""
        with self.changing("pivot", Phase.MIRRORING):
            if not prepared:
                self._prepare_pivot(force)
            self.enter(Phase.SWITCHING, forced=force)
            try:
                started = time.monotonic()
                if not self._rebased:
                    self._rebase()
                rebase = time.monotonic() - started
                commit = self._commit(Phase.SWITCHED)
                stall = self.tree.switch("destination", Phase.SWITCHED, timeout,
                                         commit=gate(commit) if gate else commit)
            except Error as e:
                self.enter(Phase.MIRRORING)
                self.log.add("error", what="switch failed", detail=str(e))
                raise Error(f"switch failed, still mirroring: {e}") from None
            self.last_switch = {"stall_ms": round(stall * 1000, 3),
                                "rebase_ms": round(rebase * 1000, 3), "forced": force}
            self._created.clear()           # nothing is ours to remove any more
            self.enter(Phase.SWITCHED, **self.last_switch)
            return stall

    # A group's safety net (control.group): after its pivot, reads come from the destination and
    # changes still go to both sides, until `commit` (the destination alone) or `revert`.

    def net_pivot(self, timeout=10.0, gate=None):
        """Read from the destination, write to both (after `prepare_pivot`). The disk's record
        says the destination from now on (its commit, inside the hold)."""
        with self.changing("pivot", Phase.MIRRORING):
            self.enter(Phase.SWITCHING)
            commit = self._commit(Phase.SWITCHED)
            try:
                stall = self.tree.read_from("destination", timeout,
                                            commit=gate(commit) if gate else commit)
            except Error as e:
                self.enter(Phase.MIRRORING)
                self.log.add("error", what="switch failed", detail=str(e))
                raise Error(f"switch failed, still mirroring: {e}") from None
            self.net_since = time.time()
            self.last_switch = {"stall_ms": round(stall * 1000, 3), "net": True}
            self.enter(Phase.PIVOTED, **self.last_switch)
            return stall

    def pivot_net(self, force=False, timeout=10.0):
        """A named disk's bare `pivot`: verified, rebased, then the safety net (`net_pivot`)."""
        self._need_net("pivot")
        self.prepare_pivot(force)
        return self.net_pivot(timeout)

    def revert(self, timeout=10.0, gate=None):
        """Read from the source again: every change since the pivot is there already."""
        with self.changing("revert", Phase.PIVOTED):
            commit = self.lender.reverted if self.lender is not None and self.lender.named \
                else None
            try:
                stall = self.tree.read_from("source", timeout,
                                            commit=gate(commit) if gate else commit)
            except Error as e:
                raise Error(f"revert failed, still on the destination: {e}") from None
            self.net_since = None
            self.enter(Phase.MIRRORING, reverted=True, stall_ms=round(stall * 1000, 3))
            return stall

    def commit_net(self, timeout=10.0, gate=None, degraded=None):
        """End the net: the destination alone; the source's daemon flushes and closes its images,
        which stay as they were at the commit's hold. `degraded`: why the disk commits on its
        own (its source failed): then the retired source is not the disk at the commit."""
        with self.changing("commit", Phase.PIVOTED):
            net = round(time.time() - self.net_since, 3) if self.net_since else None
            commit = self._commit(Phase.SWITCHED)
            try:
                stall = self.tree.switch("destination", Phase.SWITCHED, timeout,
                                         commit=gate(commit) if gate else commit)
            except Error as e:
                raise Error(f"commit failed, the net is still up: {e}") from None
            self._created.clear()
            self.net_since = None
            if degraded is None and self.tree.retired_complete is not True:
                degraded = f"its source {INCOMPLETE_SOURCE}"
            self.snapshot = {"time": time.time(), "consistent": degraded is None,
                             "sources": {self._name: self.chains["source"] if self.chains else
                                         [{"path": str(self.source_overlay)}]},
                             **({"degraded": degraded} if degraded else {})}
            self.enter(Phase.SWITCHED, committed=True, stall_ms=round(stall * 1000, 3),
                       net_seconds=net)
            return stall

    @property
    def _name(self):
        return self.lender.name if self.lender is not None and self.lender.named else \
            str(self.source_top)

    def prepare_pivot(self, force=False):
        """A pivot's checks, and the rebase of the destination overlay onto the destination base,
        without the switch: what a group does for every member before any member holds."""
        with self.changing("pivot", Phase.MIRRORING):
            self._prepare_pivot(force)
            if not self._rebased:
                self._rebase()

    def _prepare_pivot(self, force):
        if not self.dest_base.exists():
            raise UsageError(f"destination base {self.dest_base} does not exist: run "
                             "'mirrorfs copy' or copy it there first")
        if force:
            self.log.add("warning", what="switching without verification (forced)")
        else:
            ok, detail = self._verify()
            if not ok:
                raise UsageError(f"switch refused: {detail}")

    def _rebase(self):
        """QEMU flushes the overlay inside the reopen, with its I/O held: under write load that
        hold (100-300 ms here) is what clients notice, not the data path's switch. A flush just
        before does not help: it holds qcow2's lock about as long. A crash after the rebase and
        before the switch is harmless: the destination overlay's new backing holds the same bytes
        as the old one. A switch refused after the rebase (the record could not be written, the
        destination did not answer) leaves it done: a second pivot does not redo it."""
        try:
            self.tree.daemon("destination").rebase(images.info(self.dest_base))
        except Error as e:
            raise Error(f"switch failed, still mirroring: {e}") from None
        self._rebased = True

    def cancel(self, timeout=10.0, gate=None):
        """Stop mirroring and keep serving the source; remove what the migration made on the
        destination."""
        with self.changing("cancel", Phase.MIRRORING, Phase.COPYING_BASE):
            if self.copier is not None and self.copier.running:
                self.copier.cancel()
            try:
                commit = self._commit(Phase.CANCELLED)
                self.tree.switch("source", Phase.CANCELLED, timeout,
                                 commit=gate(commit) if gate else commit)
            except Error as e:
                raise Error(f"cancel failed, still mirroring: {e}") from None
            removed = []
            for path in self._created:
                if path != self.source_overlay and path.exists():
                    path.unlink()
                    removed.append(str(path))
            self._created.clear()
            kept = [str(path) for path in (self.dest_overlay, self.dest_base) if path.exists()]
            self.enter(Phase.CANCELLED, serving=str(self.source_overlay), removed=removed,
                       kept=kept)
            return {"removed": removed, "kept": kept}

    # After Step 5: the disk goes back to a plain export.

    def hand_back(self):
        """Give the disk back to its lender (the host service, or the export it was taken over
        from), on the chain that now holds it (the destination after a pivot, the source after a
        cancel), and end this migration. The data path is quiesced and killed (held requests stay
        unanswered; clients send them again to the lender), the storage daemons flush and close
        the images, then the lender records the chain (a named disk's `returned`) and serves it on
        the same socket. The chain does not grow from one migration to the next: the base copy
        flattens the source's chain, so the destination is always its copy plus one overlay.
        Under the safety net, the net is committed first (the destination alone)."""
        if self.phase == Phase.PIVOTED and self.has_net:
            self.commit_net()
        with self.changing("hand-back", *self.ENDED):
            if self.lender is None:
                raise UsageError("this migration did not take the disk over (start NAME, or start "
                                 "--take-over): there is nothing to hand it back to")
            top = self._authoritative_top()
            self.lender.ready()
            self.tree.stop()
            self.lender.give_back(self._chain_of(top))
            if self.state_dir is not None:
                # The migration is over: a restart must not take the disk again for it.
                state = self.state_dir / "state.json"
                if state.exists():
                    state.rename(state.with_name("state.json.handed-back"))
            self.enter(Phase.HANDED_BACK, image=str(top))
            self.finished.set()
            return {"image": str(top), "to": self.lender.who}

    # The host budget (mirrorfs.host.budget): the base copy draws from it, and so does the data
    # path's copier when it copies regions again after degraded writes (--on-dest-error degrade).
    # They are one copy of the host (one entry, one share); when both run at once, each gets half
    # of the share.

    copies = True
    datapath_copies = (Phase.MIRRORING, Phase.COPYING_BASE, Phase.PIVOTED)

    def shown_phase(self):
        return Phase.QUEUED if self.phase == Phase.COPYING_BASE and self.queued else self.phase

    def copy_cap(self):
        return self._cap

    def set_cap(self, cap):
        self._cap = cap
        if self.copier is not None:
            self.copier.rate = cap
        super().set_cap(cap)

    def copy_probe(self):
        copier = self.copier
        base = copier is not None and copier.running
        resync, paid, written = (self._datapath_copy() if self.phase in self.datapath_copies
                                 else (False, 0, 0))
        self._running = (base, resync)
        if not (base or resync):
            return None
        return {"done": (copier.copied if copier is not None else 0) + paid, "written": written}

    def copy_apply(self, rate):
        base, resync = self._running
        if rate and base and resync:
            rate = max(1, rate // 2)
        if self.copier is not None:
            self.copier.pacer.set(rate)
        super().copy_apply(rate)

    # Running.

    def status(self):
        status = super().status()
        status["source"] = {"base": str(self.source_top), "overlay": str(self.source_overlay)}
        if self.phase == Phase.CANCELLED and not self.dest_overlay.exists():
            # What the file system says, not what the migration meant to remove.
            status["destination"] = {"removed": True, "overlay": str(self.dest_overlay),
                                     "base": str(self.dest_base),
                                     "base_exists": self.dest_base.exists()}
        else:
            status["destination"] = {"base": str(self.dest_base), "overlay": str(self.dest_overlay),
                                     "base_exists": self.dest_base.exists()}
        if self.state_dir:
            status["state"] = {"directory": str(self.state_dir)}
        if self.copier is not None:
            status["copy"] = self.copier.progress()
            status["copy"]["ready_to_pivot"] = (not self.copier.running and not self.copier.error
                                                and self.phase == Phase.MIRRORING)
        if self.last_switch:
            status["switch"] = self.last_switch
        if self.phase == Phase.PIVOTED and self.tree is not None:
            status["net"] = {"up_seconds": round(time.time() - self.net_since, 3)
                             if self.net_since else None, **net_cost(self.tree)}
        if self.snapshot:
            status["snapshot"] = {**self.snapshot, "what": (
                "the retired source: the disk as it was at the commit (it stopped receiving "
                "writes at the commit's hold); kept until removed"
                if self.snapshot.get("consistent", True) else
                f"degraded to the destination alone: {self.snapshot.get('degraded')}; the retired "
                "source is NOT the disk at the commit")}
        return status

    # Running: under the net, a source that fails degrades the disk to its destination.

    def run(self, stop, interval=0.5):
        seen = {}
        while not stop.wait(interval) and not self.finished.is_set():
            if self.phase == Phase.PIVOTED and self.has_net:
                self._degrade_if_the_source_died()
            self.check(seen)

    def _degrade_if_the_source_died(self):
        """The source's storage daemon died under the net: the data is safe on the destination,
        which serves reads and takes every write first; the source can no longer be reverted
        to. The disk commits on its own and says so (a group does this for all its members at
        once: control.group)."""
        daemon = self.tree.daemon("source")
        if daemon is None or not daemon.died():
            return
        why = "the source failed (its storage daemon died)"
        self.log.add("degraded", why=why)
        self.tree.drop_source()
        try:
            self.commit_net(degraded=why)
        except PhaseError:
            return                      # a command runs: the next look commits

    def commands(self):
        table = super().commands()
        table.update({
            "copy": lambda r: self.copy(rate=rate(r), wait=False)
            or {"started": True},
            **self.switch_commands(),
            "hand-back": lambda r: self.hand_back(),
            # Who the disk goes back to (the CLI says the next step): pivot's and cancel's replies.
            "pivot": self._pivot_command,
            "revert": lambda r: self._need_net("revert") or {
                "stall_ms": round(self.revert() * 1000, 3)},
            "commit": lambda r: self._need_net("commit") or {
                "stall_ms": round(self.commit_net() * 1000, 3),
                "sources": [str(self.source_overlay)]},
            "cancel": lambda r: {**self.cancel(), "lent": self.lender and self.lender.who},
        })
        return table

    def _pivot_command(self, request):
        """`pivot`: the safety net of a named disk, or (`commit`, or no net) the final switch."""
        force = request.get("force") is True
        net = self.has_net and request.get("commit") is not True
        stall = self.pivot_net(force) if net else self.pivot(force=force)
        return {"stall_ms": round(stall * 1000, 3), "net": net,
                "lent": self.lender and self.lender.who}

    def stop(self):
        """Stop serving. Images stay as they are: both chains are consistent at every phase."""
        with self.internal_change():
            if self.copier is not None and self.copier.running:
                self.copier.cancel()
                if self.dest_base in self._created:
                    self._created.remove(self.dest_base)
            if self.tree is not None:
                self.tree.stop()
            if self.stopped_in is None:
                self.stopped_in = self.phase    # what the stop's last words are about
            if self.phase != Phase.NEW:
                self.enter(Phase.STOPPED)
            self.log.close()


def net_cost(tree):
    """What the safety net costs one disk now: every write waits for the slower of both sides, so
    the source's latency (and its failures, degraded) is that cost; and whether a revert is
    possible (the sides synchronized)."""
    dp = tree.datapath_status() if tree is not None else {"error": "not running"}
    sides = dp.get("sides") or {}
    return {"source_latency_ms": (sides.get("source") or {}).get("latency_ms"),
            "destination_latency_ms": (sides.get("destination") or {}).get("latency_ms"),
            "source_degraded": (sides.get("source") or {}).get("degraded", 0),
            "may_differ_bytes": dp.get("dirty_bytes"),
            "revert_possible": dp.get("synchronized", False)}
