"""`mirrorfs serve`'s controller: one disk mirrored from SOURCE to DEST, switched or cancelled.

Phases (status):
    copying        the destination may still differ: full mode's first pass, or regions to copy
                   again after a destination failure
    synchronized   the destination holds the whole disk; every change goes to both
    switched       the destination alone serves the disk (pivot)
    cancelled      the source alone serves it (cancel)
    serving        --readonly: the source alone, no mirror
    stopped
The first two are the data path's to tell (the controller's own phase is "mirroring" meanwhile):
only the data path knows, under its drain, whether anything may differ.
"""

from mirrorfs.control.controller import Controller
from mirrorfs.common.sizes import human_size
from mirrorfs.errors import Error
from mirrorfs.daemons.tree import ProcessTree


class Mirror(Controller):
    """    with Mirror("disk.qcow2", "nbd://remote/", ServeOptions(socket=..., copy="full")) as m:
            m.run(stop_event)     # or: m.pivot() once synchronized
    """
    kind = "mirror"

    def __init__(self, source, dest, options):
        super().__init__()
        # The copier's rate as last set: held (0) until the host budget gives it a share.
        self._copy_rate = 0 if options.hold_copy else options.rate
        self.tree = ProcessTree(source, dest, options)
        self.options = options
        self.last_switch = None

    def start(self):
        with self.internal_change():
            self.tree.start()
            serving = self.tree.serving
            if self.tree.dest is None:
                self.enter("serving")
            elif serving == "destination":
                self.enter("switched", resumed=True)
            elif serving == "source":
                self.enter("cancelled", resumed=True)
            else:
                self.enter("mirroring", resumed=self.tree.resumed)

    def stop(self):
        """Stop serving; the sides stay as the state says (see docs/GUARANTEES.md)."""
        with self.internal_change():
            self.tree.stop()
            if self.phase not in ("new", "stopped"):
                self.enter("stopped")
            self.log.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def shown_phase(self):
        if self.phase != "mirroring":
            return self.phase
        dp = self.tree.datapath_status()
        if dp.get("synchronized"):
            return "synchronized"
        return "queued" if self.queued else "copying"

    # The host budget (mirrorfs.host.budget): the data path's copier, full copy and resync alike.

    copies = True
    _copy_rate = None

    def copy_cap(self):
        return self.options.rate

    def copy_probe(self):
        if self.phase != "mirroring":
            return None
        reply = self.tree.datapath("set-rate", rate=self._copy_rate, timeout=5)
        copy = reply.get("copy")
        if copy is None or reply.get("synchronized") or reply.get("ended"):
            return None
        return {"done": copy["paid_bytes"], "written": reply["written"]}

    def copy_apply(self, rate):
        self._copy_rate = rate
        if self.phase == "mirroring":
            self.tree.datapath("set-rate", rate=rate, timeout=5)

    # Commands.

    def verify(self):
        """Does the destination hold the whole disk? Returns (ok, detail)."""
        dp = self.tree.datapath_status()
        if "error" in dp:
            raise Error(f"cannot ask the data path: {dp['error']}")
        if dp.get("synchronized"):
            return True, "the destination holds the whole disk"
        return False, f"{human_size(dp['dirty_bytes'])} may still differ"

    def pivot(self, force=False, timeout=10.0):
        """Serve the destination alone. The data path refuses unless synchronized and unless the
        destination answers. `force` is accepted for symmetry with a migration and changes nothing:
        there is no base to verify here. Returns the stall clients saw, in seconds."""
        with self.changing("pivot", "mirroring"):
            try:
                stall = self.tree.switch("destination", "switched", timeout)
            except Error as e:
                self.log.add("error", what="switch refused", detail=str(e))
                raise
            self.last_switch = {"stall_ms": round(stall * 1000, 3)}
            self.enter("switched", **self.last_switch)
            return stall

    def cancel(self, timeout=10.0):
        """Stop mirroring; the source alone serves the disk, and the destination is let go."""
        with self.changing("cancel", "mirroring"):
            self.tree.switch("source", "cancelled", timeout)
            self.enter("cancelled")

    def status(self):
        status = super().status()
        status["source"] = {"spec": self.tree.source_spec}
        status["destination"] = {"spec": self.tree.dest_spec} if self.tree.dest_spec else None
        status["mirror"] = {"copy_mode": self.options.copy, "policy": self.options.policy,
                            "resumed": self.tree.resumed}
        if self.options.state_path:
            status["state"] = {"directory": str(self.options.state_path)}
        if self.last_switch:
            status["switch"] = self.last_switch
        copy = (status.get("datapath") or {}).get("copy")
        if copy and self.phase == "mirroring":
            status["copy"] = copy_progress(copy)
        return status

    def commands(self):
        table = super().commands()
        if self.tree.dest_spec is not None:
            table.update({
                "verify": lambda r: dict(zip(("identical", "detail"), self.verify())),
                "pivot": lambda r: {"stall_ms": round(self.pivot(force=r.get("force") is True)
                                                      * 1000, 3)},
                "cancel": lambda r: self.cancel() or {},
            })
        return table


def copy_progress(copier):
    """The data path's copier status as the common `copy` section: bytes done of bytes to do."""
    size = copier["size"]
    done = copier["first_pass_bytes"]
    return {"bytes_done": done, "bytes_total": size, "percent": round(100 * done / size, 2) if size
            else 100.0, "rate": copier["read_rate"], "rate_limit": copier["rate_limit"],
            "eta_seconds": round((size - done) / copier["read_rate"]) if copier["read_rate"] and
            done < size else None, "running": done < size, "error": None}
