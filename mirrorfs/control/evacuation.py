"""`mirrorfs start --switch-first`: a disk's chain evacuated into one new image, switch first.

    start     [src/...base] <- [src/top]                     read-only from now on, never written
              [dst/top]  (no backing file)  <= every write; reads of what is not hydrated yet
                                               come from the source chain (datapath.evacuation.evacuee)
    hydrated  [dst/top]  stands alone; the source chain is released (its daemon stopped)
    hand-back (--take-over) the export serves dst/top

`dst/top` has the name and format of the source's top and the disk's size, and is empty: a qcow2
one hydrates in place (datapath.evacuation.evacuee: the destination's daemon has the source chain as its
runtime backing, never written to the header, and copies it with copy-on-read). Either way the
destination is the whole disk flattened into one image: the chain does not grow from one
evacuation to the next, and nothing is rebased at the end.

Why no overlays here (the Mirrored-Snapshot migration, control.migration, makes two): the source is
the storage being evacuated, often full, so it gets no new file; and a destination overlay would
need a backing that does not exist yet (dst/base, being copied), which is the sub-cluster hazard: a
qcow2 overlay written while its backing is absent fills the unwritten part of every touched
cluster with zeros, and those zeros hide the backing's data once it arrives. A destination with no
backing file has no "later": what it reads as is what was written to it, and the hydration map
alone says which regions that is. A partial write into a region not hydrated copies the whole
region (a multiple of the cluster size) first (datapath.evacuation.evacuee), so qcow2's zero fill never
stands where the source had data.

Phases: hydrating, hydrated, handed-back, stopped. There is nothing to copy, verify (beyond "is it
hydrated"), pivot or cancel: see docs/EVACUATION.md.
"""

from pathlib import Path

from mirrorfs.common.phases import Phase
from mirrorfs.control.controller import Controller, PhaseError
from mirrorfs.control.migration import Migration
from mirrorfs.control.mirror import Hydrating, hydration_progress, switch_first_refusal
from mirrorfs.daemons.tree import ProcessTree
from mirrorfs.datapath import statedir
from mirrorfs.errors import UsageError
from mirrorfs.sides import images, rbd


class RbdDestination:
    """An evacuation's destination image in a Ceph pool (`--dest-dir rbd:POOL[:conf=..][:id=..]`),
    with the few verbs the evacuation uses on a destination file's Path. Its name is its spec."""

    def __init__(self, image):
        self.image = image
        self.name = image.name

    def __str__(self):
        return self.image.spec

    def __eq__(self, other):
        return str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def exists(self):
        return rbd.exists(self.image)

    def unlink(self, missing_ok=False):
        rbd.remove(self.image)


class Evacuation(Hydrating, Migration):
    """    e = Evacuation("/old/vm1.qcow2", "/new", ServeOptions(socket=..., state_dir=...,
                                                           switch_first=True, copy="full"))
        e.start()       # /new/vm1.qcow2 created and serving; hydration runs in the background
        ...             # `run` notices the end: phase hydrated, the source released
        e.hand_back()   # with take_over: the export serves /new/vm1.qcow2
    """
    ENDED = (Phase.HYDRATED,)

    def __init__(self, source_top, dest_dir, options=None, **kw):
        """`dest_dir`: a directory, or a Ceph pool (`rbd:POOL[:conf=FILE][:id=USER]`): the new
        image is then POOL/<the source top's stem>, raw."""
        self._pool = (rbd.pool_of("--dest-dir", str(dest_dir)) if rbd.is_spec(str(dest_dir))
                      else None)
        super().__init__(source_top, dest_dir, options, **kw)
    # The host budget: the hydration is the data path's copy (Migration.copy_probe); there is no
    # base copy.
    datapath_copies = (Phase.HYDRATING,)

    def _check_options(self):
        """An evacuation's options are switch-first ones; what those need (--copy full, a state
        directory, not --readonly) ServeOptions has refused already."""
        if not self.options.switch_first:
            raise UsageError("an evacuation is --switch-first with --copy full, not --readonly")

    def _locate(self, source_top):
        if self._overlay_name is not None:
            raise UsageError("--overlay-name: with --switch-first there is no overlay; the "
                             "destination image takes the source top's name")
        self.source_top = self.source_overlay = Path(source_top).absolute()
        if self._pool is not None:
            self.dest_base = self.dest_overlay = RbdDestination(
                rbd.image_in(self._pool, self.source_top.stem))
        else:
            self.dest_base = self.dest_overlay = self.dest_dir / self.source_top.name

    @property
    def dest_image(self):
        return self.dest_overlay

    def _check_paths(self):
        if self._pool is not None:
            if self.dest_image.exists():
                raise UsageError(f"destination image {self.dest_image} already exists (an "
                                 "evacuation already started? then give its --state-dir)")
            self._check_state_files()
            return
        if not self.dest_dir.is_dir():
            raise UsageError(f"destination directory {self.dest_dir} does not exist")
        if self.dest_dir.resolve() == self.source_top.parent.resolve():
            raise UsageError(f"destination directory {self.dest_dir} is the source's directory")
        images.refuse_symlink(self.dest_image, "destination image")
        if self.dest_image.exists():
            raise UsageError(f"destination image {self.dest_image} already exists (an evacuation "
                             "already started? then give its --state-dir)")
        self._check_state_files()

    def _check_state_files(self):
        for name in statedir.FILES:
            if (self.state_dir / name).exists():
                raise UsageError(f"{self.state_dir / name} exists: the state directory belongs to "
                                 "another evacuation")

    # Start and resume.

    def _loan_chains(self, before):
        """An evacuation's loan: the source is the chain as it was (read-only), the destination one
        image; the disk is the destination's from the first write (`_switch_first`)."""
        fmt = "raw" if self._pool is not None else before[0]["format"]
        return {"before": before, "source": before,
                "destination": [{"path": str(self.dest_image), "format": fmt}]}

    def _switch_first(self):
        """The destination takes every write from the start: a named disk's record says so before
        anything is served (the evacuation's switch). A take-back of a dead borrower then knows
        that the source lacks those writes."""
        commit = self._commit(Phase.SWITCHED)
        if commit is not None:
            commit()

    def _return_disk(self, saved):
        """A start that failed before anything was served gives the disk back on the source; the
        record, which said destination since `_switch_first`, says source again first."""
        if (self._listener is not None and self._authoritative_top(saved) == self.source_top
                and self._commit(Phase.CANCELLED) is not None):
            self._commit(Phase.CANCELLED)()
        super()._return_disk(saved)

    def _start_new(self):
        self.base = images.info(self.source_top)
        try:
            if self._pool is not None:
                rbd.create(self.dest_image.image, self.base.virtual_size)
            else:
                images.create_image(self.dest_image, self.base.format, self.base.virtual_size)
            self._created.append(self.dest_image)
            self._switch_first()
            self.tree = self._tree()
            self.tree.start()
        except BaseException:
            self._undo_start()
            raise
        self.enter(Phase.HYDRATING, destination=str(self.dest_image))

    def _undo_start(self):
        """Nothing was served yet: the new image and the state made for it go again, so the same
        command line starts afresh."""
        super()._undo_start()
        if self.state_dir is not None:
            for name in statedir.FILES:
                (self.state_dir / name).unlink(missing_ok=True)

    def _tree(self):
        return ProcessTree(str(self.source_top), str(self.dest_image), self.options,
                           listener=self._listener)

    def _resume(self, saved):
        if not saved.switch_first:
            raise UsageError(f"the state in {self.state_dir} is a migration's (start without "
                             "--switch-first)")
        if not self.dest_image.exists():
            raise UsageError(f"the state in {self.state_dir} is for an evacuation whose "
                             f"destination image {self.dest_image} is missing")
        self.base = images.info(self.source_top)
        self._switch_first()
        self.tree = self._tree()
        self.tree.start()
        if self.tree.serving == "destination":
            self.enter(Phase.HYDRATED, resumed=True)
        else:
            self.enter(Phase.HYDRATING, resumed=True)

    def _authoritative_top(self, saved=None):
        """The one image that holds the disk: the source's top until anything was served, the
        destination once hydrated. In between, none does (the destination holds the writes, the
        source what is not hydrated yet): a start that fails then gives nothing back, and the
        export stays lent until the same command line resumes."""
        phase = self.phase if self.phase not in (Phase.NEW, Phase.STOPPED) else (
            saved.phase if saved else Phase.NEW)
        if phase in (Phase.HYDRATED, Phase.SWITCHED):
            return self.dest_image
        if phase == Phase.NEW and saved is None:
            return self.source_top
        return None

    # Running.

    def copy(self, rate=None, wait=True):
        raise PhaseError("nothing to copy: with --switch-first the hydration copies the disk by "
                         "itself (mirrorfs status shows it)")

    def verify(self):
        with self.changing("verify", Phase.HYDRATING, Phase.HYDRATED):
            if self.phase == Phase.HYDRATED:
                return True, f"{self.dest_image} holds the whole disk"
            progress = hydration_progress(self.tree.datapath_status())
            return False, f"{progress['bytes_on_source_only']} bytes are on the source alone"

    def pivot(self, force=False, timeout=10.0):
        raise switch_first_refusal("pivot", self.phase)

    def cancel(self, timeout=10.0):
        raise switch_first_refusal("cancel", self.phase)

    def status(self):
        status = Controller.status(self)
        status["source"] = {"spec": str(self.source_top)}
        status["destination"] = {"spec": str(self.dest_image)}
        status["mirror"] = {"copy_mode": "full", "policy": self.options.policy,
                            "resumed": self.tree.resumed if self.tree else False,
                            "switch_first": True}
        if self.state_dir:
            status["state"] = {"directory": str(self.state_dir)}
        dp = status.get("datapath") or {}
        if "hydration" in dp:
            status["hydration"] = hydration_progress(dp)
            if self.phase == Phase.HYDRATING:
                status["copy"] = {**status["hydration"], "error": None}
        return status
