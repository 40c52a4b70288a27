"""The Mirrored-Snapshot migration (oVirt's design, Steps 3–5), on a disk served without interruption.

    Step 3  start   [src/base] <- [src/snap] <= reads and writes      (the source chain)
                    [src/base] <- [dst/snap] <= writes only
    Step 4  copy    src/base copied to dst/base (by `copy`, or by a manager with cp -a)
    Step 5  pivot   check dst/base == src/base, rebase dst/snap onto dst/base while it is open,
                    then [dst/base] <- [dst/snap] <= reads and writes; the source is released
    or      cancel  [src/base] <- [src/snap] <= reads and writes; dst/snap is removed

"src/base" is the top of the chain as it was before the migration (`source_top`); it may itself have
backing files, and the copy flattens them into one dst/base.

Why dst/snap is backed by the *source* base until the switch: a qcow2 overlay is written a cluster at a
time, and qcow2 fills the part of a cluster that a write does not cover from the backing file, or with
zeros when there is none. Had dst/snap been created on a dst/base that does not exist yet, every small
write would zero the rest of its cluster, and those zeros would hide dst/base's data once it arrived.
Backed by src/base, the fill is the right data; at the switch the backing is changed to the verified
copy, whose content is the same, so nothing the overlay holds changes meaning.
"""

import threading
import time
from pathlib import Path

from mirrorfs import images
from mirrorfs.datapath import jsonlines
from mirrorfs.basecopy import BaseCopy
from mirrorfs.errors import Error, ImageError, UsageError
from mirrorfs.events import EventLog
from mirrorfs.tree import MirrorServer
from mirrorfs.datapath.state import State, StateError


class PhaseError(UsageError):
    """A command that does not fit the migration's current phase."""


class Migration:
    """One migration of one disk. The CLI and the control socket are thin layers over this class.

        m = Migration("/src/base.qcow2", "/dst", socket="/run/vm1.sock")
        m.start()                   # Step 3: overlays created, disk served, writes mirrored
        m.copy(rate=200 << 20)      # Step 4: blocks until the base is copied (or wait=False)
        m.pivot()                   # Step 5: verified, switched; returns the client-visible stall
        m.stop()                    # stop serving (images stay as they are)
    """

    def __init__(self, source_top, dest_dir, *, socket=None, listen=None, overlay_name=None,
                 threads=16, state_dir=None, policy=None, access=None, io_timeout=None, cache="auto"):
        self.source_top = Path(source_top).absolute()
        self.dest_dir = Path(dest_dir).absolute()
        name = overlay_name or f"{self.source_top.stem}-snap.qcow2"
        if "/" in name or name in ("", ".", ".."):
            raise UsageError(f"--overlay-name {name!r}: expected a file name, not a path")
        self.source_overlay = self.source_top.parent / name
        self.dest_overlay = self.dest_dir / name
        self.dest_base = self.dest_dir / self.source_top.name
        self._socket, self._listen, self._threads = socket, listen, threads
        self.state_dir = Path(state_dir).absolute() if state_dir else None
        self._policy = policy
        self._access = access
        self._io_timeout, self._cache = io_timeout, cache
        self.server = None
        self.base = None                # ImageInfo of source_top
        self.phase = "new"
        self.phase_since = time.monotonic()
        self.copier = None
        self.last_switch = None
        self._created = []              # files this migration made, removed again by cancel
        self._lock = threading.RLock()
        self.log = EventLog()

    # Events and phases.

    def _event(self, kind, **details):
        self.log.add(kind, **details)

    def _enter(self, phase, **details):
        with self._lock:
            self.phase = phase
            self.phase_since = time.monotonic()
            self._event("phase", phase=phase, **details)

    def _require(self, command, *phases):
        if self.phase not in phases:
            raise PhaseError(f"cannot {command} while {self.phase}"
                             f" (possible when {' or '.join(phases)})")

    def events(self, since=0, timeout=None):
        """Yield events after sequence number `since`, waiting for new ones (see EventLog)."""
        return self.log.follow(since, timeout)

    # Step 3.

    def start(self):
        """Step 3; or, when the state directory holds this migration's state, resume it."""
        with self._lock:
            self._require("start", "new")
            saved = self._saved_state()
            if saved is not None:
                return self._resume(saved)
            self._check_paths()
            self.base = images.info(self.source_top)
            try:
                images.create_overlay(self.source_overlay, self.base)
                self._created.append(self.source_overlay)
                images.create_overlay(self.dest_overlay, self.base)
                self._created.append(self.dest_overlay)
                self.server = self._server()
                self.server.start()
            except BaseException:
                self._undo_start()
                raise
            self._enter("mirroring", source_overlay=str(self.source_overlay),
                        dest_overlay=str(self.dest_overlay))

    def _server(self):
        return MirrorServer(str(self.source_overlay), str(self.dest_overlay), socket=self._socket,
                            listen=self._listen, threads=self._threads, state_dir=self.state_dir,
                            policy=self._policy, access=self._access, io_timeout=self._io_timeout,
                            cache=self._cache)

    def _saved_state(self):
        if self.state_dir is None:
            return None
        try:
            return State.load(self.state_dir)
        except StateError as e:
            raise UsageError(str(e)) from None

    def _resume(self, saved):
        """After a crash or a stop: serve the overlays again; the data path copies whatever the
        state says may differ."""
        if saved.phase == "cancelled":
            raise UsageError(f"the migration in {self.state_dir} was cancelled; the disk is "
                             f"{self.source_overlay}")
        for path in (self.source_overlay, self.dest_overlay):
            if not path.exists():
                raise UsageError(f"the state in {self.state_dir} is for a migration whose overlay "
                                 f"{path} is missing")
        self.base = images.info(self.source_top)
        self.dest_base.with_name(self.dest_base.name + ".partial").unlink(missing_ok=True)
        self.server = self._server()
        self.server.start()
        if saved.phase == "switched":
            self._enter("switched", resumed=True)
        else:
            self._enter("mirroring", resumed=True, dirty_regions=len(saved.dirty))

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
        if self.server is not None:
            self.server.stop()
        # The source overlay is removed only if nothing was ever served from it.
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created.clear()

    # Step 4.

    def copy(self, rate=None, wait=True):
        """Copy the source base to the destination with qemu-img convert. With wait=False it runs in
        the background; follow it with status() or events()."""
        with self._lock:
            self._require("copy", "mirroring")
            if self.dest_base.exists():
                raise UsageError(f"destination base {self.dest_base} already exists "
                                 "(copied by a manager? then pivot verifies it)")
            self.copier = BaseCopy(self.base, self.dest_base, rate=rate)
            self.copier.start()
            self._created.append(self.dest_base)
            self._enter("copying", bytes_total=self.copier.total, rate=rate)
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
        with self._lock:
            if self.phase != "copying":
                return                      # cancelled or stopped meanwhile
            seconds = round(copier.finished - copier.started, 3)
            if copier.error:
                self._event("error", what="base copy failed", detail=copier.error)
            self._enter("mirroring", copied=not copier.error, seconds=seconds)

    # Step 5.

    def verify(self):
        """Is the destination base a faithful copy of the source base? Returns (ok, detail)."""
        if not self.dest_base.exists():
            return False, (f"destination base {self.dest_base} does not exist: run 'mirrorfs copy' "
                           "or copy it there")
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

    def pivot(self, force=False, timeout=10.0):
        """Switch the disk to the destination chain without disconnecting clients. Returns the
        stall clients saw, in seconds."""
        with self._lock:
            self._require("pivot", "mirroring")
            if not self.dest_base.exists():
                raise UsageError(f"destination base {self.dest_base} does not exist: run "
                                 "'mirrorfs copy' or copy it there first")
            if force:
                self._event("warning", what="switching without verification (forced)")
            else:
                ok, detail = self.verify()
                if not ok:
                    raise UsageError(f"switch refused: {detail}")
            self._enter("switching")
            try:
                # QEMU flushes the overlay inside the reopen, with its I/O held: under write load
                # that hold (100-300 ms here) is what clients notice, not the data path's switch.
                # A flush just before does not help: it holds qcow2's lock about as long.
                started = time.monotonic()
                self.server.daemon("dst").rebase(images.info(self.dest_base))
                rebase = time.monotonic() - started
                reply = self.server.datapath("switch", reader="destination",
                                             writers=["destination"], phase="switched",
                                             timeout=timeout)
            except (Error, jsonlines.ControlError) as e:
                self._enter("mirroring")
                self._event("error", what="switch failed", detail=str(e))
                raise Error(f"switch failed, still mirroring: {e}") from None
            stall = reply["stall_ms"] / 1000
            self.server.retire_daemon("src")
            self.last_switch = {"stall_ms": round(stall * 1000, 3), "rebase_ms": round(rebase * 1000, 3)}
            self._created.clear()           # nothing is ours to remove any more
            self._enter("switched", **self.last_switch)
            return stall

    def cancel(self, timeout=10.0):
        """Stop mirroring and keep serving the source; remove what the migration made on the
        destination."""
        with self._lock:
            self._require("cancel", "mirroring", "copying")
            if self.copier is not None and self.copier.running:
                self.copier.cancel()
            try:
                self.server.datapath("switch", reader="source", writers=["source"],
                                     phase="cancelled", timeout=timeout)
            except jsonlines.ControlError as e:
                raise Error(f"cancel failed, still mirroring: {e}") from None
            self.server.retire_daemon("dst")
            for path in self._created:
                if path != self.source_overlay:
                    path.unlink(missing_ok=True)
            self._created.clear()
            self._enter("cancelled", serving=str(self.source_overlay))

    # Running.

    def status(self):
        with self._lock:
            status = {
                "phase": self.phase,
                "phase_seconds": round(time.monotonic() - self.phase_since, 3),
                "source": {"base": str(self.source_top), "overlay": str(self.source_overlay)},
                "destination": {"base": str(self.dest_base), "overlay": str(self.dest_overlay),
                                "base_exists": self.dest_base.exists()},
                "uris": self.server.uris if self.server else [],
            }
            if self.copier is not None:
                c = self.copier
                end = c.finished or time.monotonic()
                status["copy"] = {"bytes_copied": c.copied, "bytes_total": c.total,
                                  "percent": round(c.fraction * 100, 2), "running": c.running,
                                  "seconds": round(end - c.started, 3), "rate_limit": c.rate,
                                  "error": c.error}
            if self.last_switch:
                status["switch"] = self.last_switch
        if self.server is not None and self.phase != "stopped":
            try:
                status["datapath"] = self.server.datapath("status")["status"]
            except jsonlines.ControlError as e:
                status["datapath"] = {"error": str(e)}
        return status

    def wait(self, stop, interval=0.5):
        """Serve until `stop` is set; a child dying on its own raises."""
        self.server.wait(stop, interval)

    def stop(self):
        """Stop serving. Images stay as they are: both chains are consistent at every phase."""
        with self._lock:
            if self.copier is not None and self.copier.running:
                self.copier.cancel()
                if self.dest_base in self._created:
                    self._created.remove(self.dest_base)
            if self.server is not None:
                self.server.stop()
            if self.phase != "new":
                self._enter("stopped")
            self.log.close()
