"""`mirrorfs serve`'s controller: one disk mirrored from SOURCE to DEST, switched or cancelled.

Phases (status):
    copying        the destination may still differ: full mode's first pass, or regions to copy
                   again after a destination failure
    synchronized   the destination holds the whole disk; every change goes to both
    switched       the destination alone serves the disk (pivot)
    cancelled      the source alone serves it (cancel)
    serving        --readonly: the source alone, no mirror
    hydrating      --switch-first: the destination serves, regions not hydrated yet are read from
                   the read-only source and copied in the background (mirrorfs.datapath.evacuee)
    hydrated       --switch-first: the destination holds everything and serves alone
    stopped
The first two are the data path's to tell (the controller's own phase is "mirroring" meanwhile):
only the data path knows, under its drain, whether anything may differ.
"""

from mirrorfs.common.phases import Phase
from mirrorfs.control.controller import Controller, PhaseError
from mirrorfs.common.sizes import human_size
from mirrorfs.errors import Error
from mirrorfs.daemons.tree import ProcessTree


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
        """Does the destination hold the whole disk? Returns (ok, detail)."""
        dp = self.tree.datapath_status()
        if "error" in dp:
            raise Error(f"cannot ask the data path: {dp['error']}")
        lag = dp.get("lag") or {}
        if dp.get("synchronized") and lag.get("bytes"):
            return True, (f"the destination holds the whole disk but the lag, "
                          f"{human_size(lag['bytes'])} it receives in the background (drained "
                          "by pivot)")
        if dp.get("synchronized"):
            return True, "the destination holds the whole disk"
        return False, f"{human_size(dp['dirty_bytes'])} may still differ"

    def pivot(self, force=False, timeout=10.0):
        """Serve the destination alone. The data path refuses unless synchronized and unless the
        destination answers. `force` is accepted for symmetry with a migration and changes nothing:
        there is no base to verify here. Returns the stall clients saw, in seconds."""
        self._refuse_with_switch_first("pivot")
        with self.changing("pivot", Phase.MIRRORING):
            try:
                stall = self.tree.switch("destination", Phase.SWITCHED, timeout)
            except Error as e:
                self.log.add("error", what="switch refused", detail=str(e))
                raise
            self.last_switch = {"stall_ms": round(stall * 1000, 3)}
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
        if copy and self.phase == Phase.MIRRORING:
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
    the ETA, and what is at risk while the source fails (every byte the destination does not hold
    yet: it exists on the source alone; held ranges of regions not hydrated are on the
    destination)."""
    h, hydrator = dp["hydration"], dp.get("hydrator") or {}
    done, total = h["bytes_hydrated"], h["bytes_total"]
    source_only = total - done - h.get("bytes_held", 0)
    copy_on_read = h.get("copy_on_read")
    rate = hydrator.get("rate") or 0
    unreadable = hydrator.get("unreadable", [])
    return {"bytes_done": done, "bytes_total": total,
            "percent": round(100 * done / total, 2) if total else 100.0,
            "rate": rate, "rate_limit": hydrator.get("rate_limit"),
            "eta_seconds": round((total - done) / rate) if rate and done < total else None,
            "running": not h["complete"],
            "source_failing": bool(unreadable or h["source_read_errors"]),
            "bytes_on_source_only": source_only,
            "bytes_at_risk": source_only if unreadable or h["source_read_errors"] else 0,
            "bytes_held": h.get("bytes_held", 0), "held_changes": h.get("held_changes", 0),
            "bytes_in_holes": h.get("bytes_in_holes", 0),
            "written_around": h.get("written_around", 0),
            "copy_on_read": copy_on_read is not None,
            "bytes_copied_on_read": copy_on_read["bytes"] if copy_on_read else 0,
            "bytes_unreadable": sum(u["length"] for u in unreadable),
            "unreadable": unreadable,
            "source_read_errors": h["source_read_errors"], "failed_reads": h["failed_reads"]}


def copy_progress(copier):
    """The data path's copier status as the common `copy` section: bytes done of bytes to do."""
    size = copier["size"]
    done = copier["first_pass_bytes"]
    return {"bytes_done": done, "bytes_total": size, "percent": round(100 * done / size, 2) if size
            else 100.0, "rate": copier["read_rate"], "rate_limit": copier["rate_limit"],
            "eta_seconds": round((size - done) / copier["read_rate"]) if copier["read_rate"] and
            done < size else None, "running": done < size, "error": None}
