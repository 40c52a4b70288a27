"""`mirrorfs serve`'s controller: one disk mirrored from SOURCE to DEST, switched or cancelled.

Phases (status):
    copying        the destination may still differ: full mode's first pass, or regions to copy
                   again after a destination failure
    synchronized   the destination holds the whole disk; every change goes to both
    switched       the destination alone serves the disk (pivot)
    cancelled      the source alone serves it (cancel)
    serving        --readonly: the source alone, no mirror
    hydrating      --switch-first: the destination serves, regions not hydrated yet are read from
                   the read-only source and copied in the background (mirrorfs.datapath.evacuation.evacuee)
    hydrated       --switch-first: the destination holds everything and serves alone
    stopped
The first two are the data path's to tell (the controller's own phase is "mirroring" meanwhile):
only the data path knows, under its drain, whether anything may differ.
"""

from mirrorfs.common.pacing import eta_seconds
from mirrorfs.common.phases import Phase
from mirrorfs.control.controller import Controller, PhaseError
from mirrorfs.common.sizes import human_size
from mirrorfs.errors import Error, UsageError
from mirrorfs.daemons.tree import ProcessTree

# How long the data path may take to compare the sides (a `--copy none` pivot or verify): within
# the CLI's wait for a control command's reply (600 s); it stops then, reading nothing more.
COMPARE_TIMEOUT = 580


class Hydrating:
    """What a controller of an evacuation (serve's Mirror, start's Evacuation) does on each look:
    once the data path says the hydration ended, release the source and say `hydrated`.

    The hydration is a copy of the host budget like any other (Controller.copy_probe, with
    HYDRATING among the controller's `datapath_copies`): it takes a slot of the concurrent-copy
    limit, and while it waits for one its phase shows as `queued`."""

    def shown_phase(self):
        if self.phase == Phase.HYDRATING and self.queued:
            return Phase.QUEUED
        return super().shown_phase()

    def check(self, seen):
        super().check(seen)
        if self.phase == Phase.HYDRATING:
            dp = self.tree.datapath_status()
            if dp.get("ended") == Phase.SWITCHED:
                with self.internal_change():
                    self.tree.release_source()
                    self.enter(Phase.HYDRATED, **hydration_progress(dp))


class Mirror(Hydrating, Controller):
    """    with Mirror("disk.qcow2", "nbd://remote/", ServeOptions(socket=..., copy="full")) as m:
            m.run(stop_event)     # or: m.pivot() once synchronized
    """
    kind = "mirror"

    def __init__(self, source, dest, options):
        super().__init__()
        # The copier's (or hydrator's) rate as last set: held (0) until the host budget gives it
        # a share.
        self._datapath_rate = 0 if options.hold_copy else options.rate
        self.tree = ProcessTree(source, dest, options)
        self.options = options
        self.last_switch = None

    def start(self):
        with self.internal_change():
            self.tree.start()
            serving = self.tree.serving
            if self.tree.dest is None:
                self.enter(Phase.SERVING)
            elif self.options.switch_first:
                self.enter(Phase.HYDRATED if serving == "destination" else Phase.HYDRATING,
                           resumed=self.tree.resumed)
            elif serving == "destination":
                self.enter(Phase.SWITCHED, resumed=True)
            elif serving == "source":
                self.enter(Phase.CANCELLED, resumed=True)
            else:
                self.enter(Phase.MIRRORING, resumed=self.tree.resumed)

    def stop(self):
        """Stop serving; the sides stay as the state says (see docs/GUARANTEES.md)."""
        with self.internal_change():
            self.tree.stop()
            if self.phase not in (Phase.NEW, Phase.STOPPED):
                self.enter(Phase.STOPPED)
            self.log.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def shown_phase(self):
        if self.phase != Phase.MIRRORING:
            return super().shown_phase()
        dp = self.tree.datapath_status()
        if dp.get("synchronized"):
            return Phase.SYNCHRONIZED
        return Phase.QUEUED if self.queued else Phase.COPYING

    # The host budget (mirrorfs.host.budget): the data path's copier (full copy and resync alike)
    # or, with --switch-first, its hydrator.

    copies = True
    datapath_copies = (Phase.MIRRORING, Phase.HYDRATING)

    def copy_cap(self):
        return self.options.rate

    # Commands.

    def verify(self):
        """Does the destination hold the whole disk? Returns (ok, detail). With --copy none
        nothing was copied: the sides are compared (datapath.mirror.compare), as pivot does."""
        dp = self.tree.datapath_status()
        if "error" in dp:
            raise Error(f"cannot ask the data path: {dp['error']}")
        if not dp.get("synchronized"):
            return False, (f"{human_size(dp['dirty_bytes'])} may still differ between the sides; "
                           "wait until synchronized")
        if self.options.copy == "none":
            return self._compare()
        lag = dp.get("lag") or {}
        if lag.get("bytes"):
            return True, (f"the destination holds the whole disk but the lag, "
                          f"{human_size(lag['bytes'])} it receives in the background (drained "
                          "by pivot)")
        return True, "the destination holds the whole disk"

    def _compare(self):
        """--copy none: the operator said the sides start equal, and nothing copied anything; are
        they? (ok, detail), the first differing offset in the detail."""
        try:
            reply = self.tree.datapath("compare", timeout=COMPARE_TIMEOUT + 10,
                                       seconds=COMPARE_TIMEOUT)
        except Error as e:
            raise Error(f"cannot compare the sides: {e}") from None
        if reply["identical"]:
            return True, (f"the destination holds the same {human_size(reply['bytes'])} as the "
                          "source (compared)")
        if reply["offset"] is None:
            return False, (f"compared {human_size(reply['bytes'])} of {human_size(reply['size'])} "
                           f"in {COMPARE_TIMEOUT} s without a difference; the rest is not "
                           "compared: with --copy none nothing copied the source, so the sides "
                           "are equal only if you know they were; then pivot --force")
        return False, (f"the destination differs from the source at offset {reply['offset']}: "
                       "with --copy none the sides were said to be equal, and nothing copied "
                       "the source; cancel (the source keeps the disk), then copy it with "
                       "'mirrorfs serve --copy full' and a new --state-dir")

    def pivot(self, force=False, timeout=10.0):
        """Serve the destination alone. The data path refuses unless synchronized and unless the
        destination answers. With --copy none the sides are compared first (the destination may
        be an image created empty by mistake) and a difference is refused with its first offset;
        `force` skips that comparison (recorded as an event). Returns the stall clients saw, in
        seconds."""
        self._refuse_with_switch_first("pivot")
        with self.changing("pivot", Phase.MIRRORING):
            if self.options.copy == "none":
                if force:
                    self.log.add("warning", what="switching without comparing the sides (forced)")
                else:
                    ok, detail = self.verify()
                    if not ok:
                        self.log.add("error", what="switch refused", detail=detail)
                        raise UsageError(f"switch refused: {detail}")
            try:
                stall = self.tree.switch("destination", Phase.SWITCHED, timeout)
            except Error as e:
                self.log.add("error", what="switch refused", detail=str(e))
                raise
            self.last_switch = {"stall_ms": round(stall * 1000, 3), "forced": force}
            self.enter(Phase.SWITCHED, **self.last_switch)
            return stall

    def cancel(self, timeout=10.0):
        """Stop mirroring; the source alone serves the disk, and the destination is let go."""
        self._refuse_with_switch_first("cancel")
        with self.changing("cancel", Phase.MIRRORING):
            self.tree.switch("source", Phase.CANCELLED, timeout)
            self.enter(Phase.CANCELLED)

    def _refuse_with_switch_first(self, command):
        if self.options.switch_first:
            raise switch_first_refusal(command, self.phase)

    def status(self):
        status = super().status()
        status["source"] = {"spec": self.tree.source_spec}
        status["destination"] = {"spec": self.tree.dest_spec} if self.tree.dest_spec else None
        status["mirror"] = {"copy_mode": self.options.copy, "policy": self.options.policy,
                            "resumed": self.tree.resumed, "lag": self.options.lag}
        if self.options.state_path:
            status["state"] = {"directory": str(self.options.state_path)}
        if self.last_switch:
            status["switch"] = self.last_switch
        dp = status.get("datapath") or {}
        copy = dp.get("copy")
        # Only a copy that runs: with --copy none the data path's copier only copies again what a
        # degraded write left behind, and the first pass it reports "done" never ran.
        if copy and self.phase == Phase.MIRRORING and self.options.copy == "full":
            status["copy"] = copy_progress(copy)
        if self.options.switch_first:
            status["mirror"]["switch_first"] = True
            if "hydration" in dp:
                status["hydration"] = hydration_progress(dp)
                if self.phase == Phase.HYDRATING:
                    status["copy"] = {**status["hydration"], "error": None}
        return status

    def commands(self):
        table = super().commands()
        if self.tree.dest_spec is not None:
            table.update(self.switch_commands())
        return table


def switch_first_refusal(command, phase):
    """Why an evacuation has no pivot and no cancel: the destination serves from the start, and
    the source, read-only, has none of the writes made since (see docs/EVACUATION.md, "Cancel")."""
    if command == "pivot":
        return PhaseError("cannot pivot: with --switch-first the destination already serves "
                          "the disk; it stands alone once hydrated")
    return PhaseError(f"cannot cancel while {phase}: with --switch-first the source is "
                      "read-only and lacks every write made since the start, which only the "
                      "destination holds; let the hydration finish (or stop and restart with "
                      "the same --state-dir)")


def hydration_progress(dp):
    """An evacuation's progress from the data path's status: bytes hydrated of the disk, the rate,
    the ETA, and each side's failures, counted against the side that failed (the data path says
    which): while the **source** fails, every byte the destination does not hold yet is at risk (it
    exists on the source alone; held ranges of regions not hydrated are on the destination); while
    the **destination** fails (full: ENOSPC), nothing is at risk on the source, the hydration waits
    for room and the clients' changes fail."""
    h, hydrator = dp["hydration"], dp.get("hydrator") or {}
    done, total = h["bytes_hydrated"], h["bytes_total"]
    source_only = total - done - h.get("bytes_held", 0)
    copy_on_read = h.get("copy_on_read")
    rate = hydrator.get("rate") or 0
    unreadable = hydrator.get("unreadable", [])
    unwritable = hydrator.get("unwritable", [])
    source_failing = bool(unreadable or h["source_read_errors"])
    dest_side = (dp.get("sides") or {}).get("destination") or {}
    return {"bytes_done": done, "bytes_total": total,
            "percent": round(100 * done / total, 2) if total else 100.0,
            "rate": rate, "rate_limit": hydrator.get("rate_limit"),
            "eta_seconds": eta_seconds(total - done, rate, hydrator.get("rate_limit")),
            "running": not h["complete"],
            "source_failing": source_failing,
            "destination_failing": bool(unwritable),
            "bytes_on_source_only": source_only,
            "bytes_at_risk": source_only if source_failing else 0,
            "bytes_held": h.get("bytes_held", 0), "held_changes": h.get("held_changes", 0),
            "bytes_in_holes": h.get("bytes_in_holes", 0),
            "written_around": h.get("written_around", 0),
            "copy_on_read": copy_on_read is not None,
            "bytes_copied_on_read": copy_on_read["bytes"] if copy_on_read else 0,
            "bytes_unreadable": sum(u["length"] for u in unreadable),
            "unreadable": unreadable,
            "bytes_unwritable": sum(u["length"] for u in unwritable),
            "unwritable": unwritable,
            # The destination's failed requests (clients' and the hydrator's) and commits.
            "destination_errors": dest_side.get("errors", 0) + hydrator.get("commit_failures", 0),
            "source_read_errors": h["source_read_errors"], "failed_reads": h["failed_reads"]}


def copy_progress(copier):
    """The data path's copier status as the common `copy` section: bytes done of bytes to do."""
    size = copier["size"]
    done = copier["first_pass_bytes"]
    return {"bytes_done": done, "bytes_total": size, "percent": round(100 * done / size, 2) if size
            else 100.0, "rate": copier["read_rate"], "rate_limit": copier["rate_limit"],
            "eta_seconds": eta_seconds(size - done, copier["read_rate"], copier["rate_limit"]),
            "running": done < size, "error": None}
