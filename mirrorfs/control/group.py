"""A group migration (issue #27): the named disks of one VM moved as one, switched at one instant.

    mirrorfs start vm1-sys vm1-data --dest-dir /srv/b --state-dir /var/lib/mirrorfs/m/vm1

Each member is an ordinary Migration (control.migration: its own nbdkit and storage daemons, its
own state in STATE_DIR/NAME); this module runs them in **one process** and makes their ends one:

- `copy` copies every member's base; the group is one copy of the host budget, its share divided
  between the members copying.
- `pivot` verifies every member and rebases every destination overlay first (nothing held yet);
  then each member's switch holds its clients' new requests and drains those in flight, and waits,
  inside its hold, at the group's gate. Once *every* member holds, the group commit record
  (STATE_DIR/group.json, `"serving": "destination"`) is written durably, once; only then does
  each member record the switch in its state and release its clients, reading from the
  destination (the safety net: changes still go to both sides). Each disk's registry record
  follows after the release (the group's record is what a take-back reads). A member that cannot
  hold (not synchronized, its destination does not answer, its process died) opens the gate with
  a "no": every member refuses, nothing switched.
- `revert` and `commit` (the end of the net: the destinations alone, the sources retired at one
  instant) and `cancel` (`"end": "cancelled"`) go through the same gate and record.

Why one process: the hold is a barrier between threads, not a protocol between processes, and a
kill -9 of the group's process takes every member's nbdkit with it at once (datapath.nbdkit.lifeline):
no member serves on while the others' fate is undecided.

Why the group record decides, whatever was killed when: before it is written, no member serves from
its destination (each waits at the gate, inside its hold), so every member's source has every
acknowledged write; after it, every member's destination does (each was synchronized and held when
it was written). A restart with the same command line reads it first and brings every member's
state to that end before serving anything (`_apply_end`); the host service, taking a dead group's
disks back, reads it too (registry.serving_side: each loan names the record, `join_group`).
"""

import functools
import threading
import time
from pathlib import Path

from mirrorfs.common.phases import Phase
from mirrorfs.control import lender as lenders
from mirrorfs.control.controller import Controller, PhaseError, rate
from mirrorfs.control.migration import INCOMPLETE_SOURCE, Migration, net_cost
from mirrorfs.datapath.state import State, StateError
from mirrorfs.errors import Error, ProcessError, UsageError
from mirrorfs.host import grouprecord
from mirrorfs.host.grouprecord import GroupRecord

__all__ = ["Group"]

RECORD = grouprecord.NAME
ENDS = {Phase.SWITCHED: "switched", Phase.CANCELLED: "cancelled"}
# How long a member waits inside its hold for the others (on top of their drains).
GATE_TIMEOUT = 30.0


def _check_member(o):
    """The rules a group adds to its members' options (ServeOptions), past a migration's: the CLI
    and the Python API both come through here."""
    if o.rate is not None:
        raise UsageError("a group's base copies take 'mirrorfs copy --rate'")
    if o.lag:
        # The net after the pivot writes both sides synchronously; a lag writes one behind.
        raise UsageError("--lag: a group keeps a safety net after its pivot, which writes "
                         "both sides at once; a group has no lag")


class Group(Controller):
    """Several Migrations of named disks, with one copy, one switch, one cancel and one hand-back.

        g = Group(["vm1-sys", "vm1-data"], [lender1, lender2], "/srv/b", options, "/var/lib/m/vm1")
        g.start(); g.copy(); g.pivot(); g.hand_back()

    `options(name, state_dir)` makes a member's ServeOptions."""

    kind = "group"
    copies = True

    def __init__(self, names, lenders_, dest_dir, options, state_dir, control):
        super().__init__()
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise UsageError(f"the disk {twice} is named twice: a group moves each disk once")
        if state_dir is None:
            raise UsageError("a group migration needs --state-dir: its commit record is kept there")
        self.names = list(names)
        self.state_dir = Path(state_dir).absolute()
        self.record = GroupRecord(self.state_dir / RECORD)
        created = self._made_state_dir = not self.state_dir.exists()
        try:
            self.state_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--state-dir {self.state_dir}: {e.strerror or e}") from None
        self.control = str(control)
        try:
            made = {name: options(name, self.state_dir / name) for name in names}
            for o in made.values():
                _check_member(o)
            self.members = {name: Migration(None, dest_dir, made[name], lender=lender,
                                            control=control)
                            for name, lender in zip(names, lenders_)}
        except UsageError:
            if created:                         # refused before anything was put in it
                self.state_dir.rmdir()
            raise
        first = self.members[names[0]]
        self.options = first.options          # where the CLI finds the access rules
        self.end = None                         # the group's end, as its record says
        self.serving = "source"                 # where every member reads, as its record says
        self.net_since = None                   # the safety net is up since (time.time())
        self.snapshot = None                    # the committed sources: when, which chains
        self.broken = None                      # a member failed after the group's commit
        self.last_switch = None
        self.stopped_in = None                  # the phase `stop` found (stopreport.next_step)
        self.lender = None                      # each member has its own
        self._cap = None

    # Start, or resume.

    def start(self):
        with self.changing("start", Phase.NEW):
            saved = self.record.load()
            if saved is not None and saved["members"] != self.names:
                raise UsageError(f"the group in {self.state_dir} is {' '.join(saved['members'])}, "
                                 f"not {' '.join(self.names)}: give the same disks, or another "
                                 "--state-dir")
            self._check_members(saved)
            if saved is not None and saved["end"] == "cancelled":
                self._cancelled_before(saved)
            if saved is not None:
                self._apply_record(saved)
            started = []
            created = saved is None and not self.record.path.exists()
            try:
                for name in self.names:
                    self.members[name].start()
                    started.append(self.members[name])
                ids = {name: m.migration_id for name, m in self.members.items()}
                if saved is None:
                    self.record.write({"members": self.names, "migrations": ids, "end": None,
                                       "created": time.time()})
                for name, m in self.members.items():
                    m.lender.registry.join_group(name, m.migration_id, self.record.path)
            except BaseException:
                self._undo_start(started, resumed=saved is not None, created=created)
                raise
            self.end = saved["end"] if saved else None
            self.serving = (saved or {}).get("serving") or "source"
            self.snapshot = (saved or {}).get("snapshot")
            if self.end == "switched":
                phase = Phase.SWITCHED
            elif self.serving == "destination":
                phase, self.net_since = Phase.PIVOTED, time.time()
            else:
                phase = Phase.MIRRORING
            self.enter(phase, members=self.names, resumed=saved is not None)

    def _check_members(self, saved):
        """Everything that can be refused is refused before any member is borrowed: a disk lent
        to another migration (or unknown: the CLI looked the names up), two members whose
        destination files would be the same."""
        where = {}
        for name, m in self.members.items():
            mid = lenders.migration_id(m._saved_state(), name)
            before = m.lender.served(mid)
            if saved is not None and saved["migrations"].get(name) not in (None, mid):
                raise UsageError(f"the state of {name} in {m.state_dir} is not the group's "
                                 "(another migration id)")
            m._locate(before[0]["path"])
            if saved is None:
                m._check_paths()
            for path in (m.dest_overlay, m.dest_base):
                if path in where:
                    raise UsageError(f"the disks {where[path]} and {name} would both be copied "
                                     f"to {path}: move them with separate --dest-dir")
                where[path] = name
            m.source_top = m.source_overlay = m.dest_overlay = m.dest_base = None

    def _apply_record(self, saved):
        """The group's record says where every member is: every member's state says so too
        before anything is served (a crash inside a group's switch, after the record and before
        some member's own state). Each member then resumes there."""
        end = {"switched": Phase.SWITCHED}.get(saved["end"])
        reader = saved.get("serving") or "source"
        for name, m in self.members.items():
            try:
                state = State.load(m.state_dir)
            except StateError as e:
                raise UsageError(str(e)) from None
            if state is None:
                if end is None and reader == "source":
                    continue            # a member that never started: nothing to bring anywhere
                raise UsageError(f"the group's record says {saved['end'] or reader}, but "
                                 f"{m.state_dir} holds no state of {name}")
            if end is not None and state.phase != end:
                state.record(end=end)
                self.log.add("completed", member=name, end=saved["end"])
            elif end is None and not state.ended and state.reader != reader:
                state.record(reader=reader)
                self.log.add("completed", member=name, reads_from=reader)

    def _cancelled_before(self, saved):
        """The group was cancelled, and its process died before the hand-back: every member is
        on its source. Each record says so (cancelled inside the hold, or now), and the host
        service serves the sources again once it takes the disks back."""
        for name, m in self.members.items():
            record = m.lender.registry.get(name)
            lent = record["lent"]
            if lent and lent["migration"] == saved["migrations"].get(name) and \
                    lent["serving"] != "source":
                m.lender.registry.cancelled(name, lent["migration"])
        raise UsageError(f"the group {' '.join(self.names)} was cancelled: every member is on its "
                         "source; the host service takes the disks back (mirrorfs list)")

    def _undo_start(self, started, resumed, created):
        """A member failed to start. A new group is undone whole: each member started already
        is returned exactly as it was (control.migration.Migration.undo: the same chain, its
        overlays and state removed, what its clients wrote meanwhile committed into that chain,
        its record as before the loan), and so is the group's own record. A resume only stops:
        its state is there to resume again."""
        for m in started:
            try:
                if not resumed:
                    m.undo()
            except Error as e:
                self.log.add("error", what="undoing the start", detail=str(e))
            m.stop()
        if created and not resumed:
            self.record.path.unlink(missing_ok=True)
            if self._made_state_dir:
                try:
                    self.state_dir.rmdir()
                except OSError:
                    pass                # something else is there: not ours to remove

    # Copy.

    def copy(self, rate=None, wait=True):
        with self.changing("copy", Phase.MIRRORING):
            for m in self.members.values():
                if m.phase == Phase.MIRRORING and not m.dest_base.exists():
                    m.copy(rate=rate, wait=False)
        if wait:
            for m in self.members.values():
                while m.copier is not None and m.copier.running:
                    time.sleep(0.1)

    # The switch.

    def verify(self):
        results = [m.verify() for m in self.members.values()]
        bad = [(name, d) for name, (ok, d) in zip(self.names, results) if not ok]
        return (False, "; ".join(f"{n}: {d}" for n, d in bad)) if bad else \
            (True, "every destination base matches its source base")

    def pivot(self, force=False, timeout=10.0, commit=False):
        """Verify every member, then switch them all at one instant (see the module's docstring)
        to the safety net: reads from the destinations, changes still to both sides. With
        `commit`, the net is committed at once. Returns the longest hold a member's clients saw,
        in seconds."""
        with self.changing("pivot", Phase.MIRRORING):
            for name, m in self.members.items():
                try:
                    m.prepare_pivot(force)
                except Error as e:
                    raise type(e)(f"{name}: {e}; no member switched") from None
            stalls = self._switch("switch", {"serving": "destination"},
                                  lambda m, gate: m.net_pivot(timeout, gate=gate))
            self.net_since = time.time()
            self.last_switch = self._holds("pivot", stalls)
            self.enter(Phase.PIVOTED, **self.last_switch)
        if commit:
            self.commit(timeout)
        return self.last_switch["hold_ms"] / 1000

    def revert(self, timeout=10.0):
        """Every member reads from its source again, at one instant: every change since the pivot
        is there already (nothing to copy). The group mirrors again: cancel, or pivot again."""
        with self.changing("revert", Phase.PIVOTED):
            stalls = self._switch("revert", {"serving": "source"},
                                  lambda m, gate: m.revert(timeout, gate=gate))
            self.net_since = None
            self.last_switch = self._holds("revert", stalls)
            self.enter(Phase.MIRRORING, reverted=True, **self.last_switch)
            return self.last_switch["hold_ms"] / 1000

    def commit(self, timeout=10.0, degraded=None):
        """End the net: every member on its destination alone. Every member holds at once, so
        the sources stop receiving changes at one instant: together they are a crash-consistent
        image of the whole group at the commit (kept: retired, never served again by mirrorfs).
        `degraded`: why the group commits on its own (a source failed): then they are not."""
        with self.changing("commit", Phase.PIVOTED):
            net = round(time.time() - self.net_since, 3) if self.net_since else None
            snapshot = {"time": time.time(), "consistent": degraded is None, "sources": {
                n: m.chains["source"] if m.chains else None for n, m in self.members.items()}}
            if degraded:
                snapshot["degraded"] = degraded
            stalls = self._switch("commit", {"end": "switched", "serving": "destination",
                                             "snapshot": snapshot},
                                  lambda m, gate: m.commit_net(timeout, gate=gate))
            self.net_since = None
            self.last_switch = self._holds("commit", stalls)
            self.snapshot = self.record.load().get("snapshot")
            self.enter(Phase.SWITCHED, net_seconds=net, **self.last_switch)
            return self.last_switch["hold_ms"] / 1000

    def cancel(self, timeout=10.0):
        with self.changing("cancel", Phase.MIRRORING):
            results = self._switch("cancel", {"end": "cancelled", "serving": "source"},
                                   lambda m, gate: m.cancel(timeout, gate=gate))
            self.enter(Phase.CANCELLED)
            return results

    @staticmethod
    def _holds(what, stalls):
        return {"what": what, "hold_ms": round(max(stalls.values()) * 1000, 3),
                "members_ms": {n: round(s * 1000, 3) for n, s in stalls.items()}}

    def _switch(self, what, fields, run):
        """Run `run(member, gate)` for every member at once; the gate makes their commits one:
        once every member holds, `fields` are written into the group's record (see the
        module's docstring). Returns {name: what run returned}."""
        cond = threading.Condition()
        gate_state = {"held": 0, "go": None}
        results, failures, complete = {}, {}, {}
        later = []

        def gate(commit, name):
            def inside():
                with cond:
                    # What the member's data path said of its retired side, just before this
                    # call (ProcessTree's commit handler): the commit's snapshot needs it.
                    complete[name] = self.members[name].tree.retired_complete
                    gate_state["held"] += 1
                    cond.notify_all()
                    cond.wait_for(lambda: gate_state["go"] is not None, GATE_TIMEOUT)
                    go = gate_state["go"]
                if not go:
                    raise Error("another member of the group cannot switch: no member switched")
                if commit is not None:
                    # The member's registry record follows the group's record after the hold:
                    # the group's record is what a take-back reads (registry.serving_side), and
                    # the members' records written one after the other, under the registry's
                    # lock, inside the hold, tripled the group's hold (scripts/bench/group.py).
                    later.append(commit)
            return inside

        def member(name, m):
            try:
                results[name] = run(m, functools.partial(gate, name=name))
            except Exception as e:          # noqa: BLE001 -- reported as the group's failure
                failures[name] = e
            with cond:
                cond.notify_all()

        threads = [threading.Thread(target=member, args=(n, m), name=f"switch {n}", daemon=True)
                   for n, m in self.members.items()]
        for t in threads:
            t.start()
        with cond:
            cond.wait_for(lambda: gate_state["held"] == len(threads) or failures, GATE_TIMEOUT + 30)
            go = gate_state["held"] == len(threads) and not failures
            if go:
                try:
                    saved = self.record.load()
                    if "snapshot" in fields:
                        fields = {**fields, "snapshot": _kept(fields["snapshot"], complete)}
                    self.record.write({**saved, **fields, "time": time.time(),
                                       "generation": saved.get("generation", 0) + 1})
                    self.end = fields.get("end")
                    self.serving = fields["serving"]
                except Error as e:
                    failures["group"] = e
                    go = False
            gate_state["go"] = go
            cond.notify_all()
        for t in threads:
            t.join()
        if not go:
            first = next((e for n, e in failures.items() if "another member" not in str(e)),
                         next(iter(failures.values()), None))
            reason = f"{self._who(failures, first)}: {first}" if first else "timed out"
            raise Error(f"the group did not {what}; no member changed sides ({reason})")
        for commit in later:
            try:
                commit()
            except Error as e:
                # Not fatal: the group's record decides, and a resume records it again.
                self.log.add("error", what="the disk's record could not follow the group's",
                             detail=str(e))
        if failures:
            # The group's record says where every member is: one that failed after it must get
            # there too. This process stops; the same command line finishes it from the record.
            self.broken = "; ".join(f"{n}: {e}" for n, e in failures.items())
            raise Error(f"the group's record says {fields}, but {self.broken}: stopping; run the "
                        f"same start command again to finish the {what} of every member")
        return results

    @staticmethod
    def _who(failures, error):
        return next((n for n, e in failures.items() if e is error), "?")

    # After the switch.

    def hand_back(self):
        if self.phase == Phase.PIVOTED:
            self.commit()               # the net ends first: the destinations alone
        with self.changing("hand-back", *Migration.ENDED):
            handed = {name: m.hand_back() for name, m in self.members.items()}
            if self.state_dir is not None:
                self.record.path.rename(self.record.path.with_name(RECORD + ".handed-back"))
            self.enter(Phase.HANDED_BACK)
            self.finished.set()
            return {"members": handed, "to": "the host service"}

    # The host budget: one copy of the host, its share divided between the members copying.

    def copy_cap(self):
        return self._cap

    def set_cap(self, cap):
        self._cap = cap
        for m in self.members.values():
            m._cap = cap
            if m.copier is not None:
                m.copier.rate = cap
        super().set_cap(cap)

    def copy_probe(self):
        probes = [m.copy_probe() for m in self.members.values()]
        probes = [p for p in probes if p is not None]
        if not probes:
            return None
        return {"done": sum(p["done"] for p in probes),
                "written": sum(p.get("written", 0) for p in probes)}

    def copy_apply(self, rate):
        copying = [m for m in self.members.values() if any(m._running)] or \
            list(self.members.values())
        each = rate if not rate else max(1, rate // len(copying))
        for m in self.members.values():
            m.copy_apply(each)

    @property
    def host_share(self):
        return self._share

    @host_share.setter
    def host_share(self, share):
        self._share = share
        for m in getattr(self, "members", {}).values():
            m.host_share = share

    _share = None

    # Running.

    @property
    def uris(self):
        return [uri for m in self.members.values() for uri in m.uris]

    @property
    def tree(self):
        return None

    @tree.setter
    def tree(self, value):
        pass

    def run(self, stop, interval=0.5):
        seen = {name: {} for name in self.names}
        while not stop.wait(interval) and not self.finished.is_set():
            if self.broken:
                raise ProcessError(f"the group must be restarted to finish its switch: {self.broken}")
            if self.phase == Phase.PIVOTED:
                self._degrade_if_a_source_died()
            for name, m in self.members.items():
                try:
                    m.check(seen[name])
                except Error as e:
                    raise type(e)(f"{name}: {e}") from None

    def _degrade_if_a_source_died(self):
        """A member's source failed (its storage daemon died) under the safety net: the data is
        safe on the destinations, which serve reads and take every write first; the sources can
        no longer be reverted to. The group commits on its own (every member on its destination
        alone) and says so: the retired sources are not a consistent image of the group."""
        failed = [name for name, m in self.members.items()
                  if (d := m.tree.daemon("source")) is not None and d.died()]
        if not failed:
            return
        why = f"the source of {', '.join(failed)} failed (its storage daemon died)"
        self.log.add("degraded", members=failed, why=why)
        for name in failed:
            self.members[name].tree.drop_source()
        try:
            self.commit(degraded=why)
        except PhaseError:
            return                      # a command runs: the next look commits

    def status(self):
        status = {"kind": self.kind, "phase": self.shown_phase(),
                  "phase_seconds": round(time.monotonic() - self.phase_since, 3),
                  "uris": self.uris, "group": {"members": self.names, "end": self.end,
                                               "record": str(self.record.path)},
                  "members": {name: m.status() for name, m in self.members.items()},
                  "events": self.log.recent(5), "state": {"directory": str(self.state_dir)}}
        status["group"]["serving"] = self.serving
        if self.phase == Phase.PIVOTED:
            status["net"] = self._net_status()
        if self.snapshot:
            status["snapshot"] = {**self.snapshot, "what": (
                "the retired sources: a crash-consistent image of the whole group at the commit "
                "(every member stopped receiving writes at one instant); kept until removed"
                if self.snapshot.get("consistent", True) else
                f"degraded to the destinations alone: {self.snapshot.get('degraded')}; the retired "
                "sources are NOT a consistent image of the group")}
        copies = [m.copier.progress() for m in self.members.values() if m.copier is not None]
        if copies:
            done = sum(c["bytes_done"] for c in copies)
            total = sum(c["bytes_total"] for c in copies)
            running = any(c["running"] for c in copies)
            etas = [c["eta_seconds"] for c in copies if c["eta_seconds"] is not None]
            status["copy"] = {
                "bytes_done": done, "bytes_total": total,
                "percent": round(100 * done / total, 2) if total else 100.0, "running": running,
                "seconds": max(c["seconds"] for c in copies), "rate": sum(c["rate"] for c in copies),
                "eta_seconds": max(etas) if etas else None,
                "error": next((c["error"] for c in copies if c["error"]), None),
                "ready_to_pivot": not running and self.phase == Phase.MIRRORING and all(
                    m.dest_base.exists() for m in self.members.values())}
        if self.last_switch:
            status["switch"] = self.last_switch
        return status

    def _net_status(self):
        """How long the safety net is up and what it costs: every write waits for the slower of
        both sides; the source's latency (and its failures, degraded) is that cost."""
        net = {"up_seconds": round(time.time() - self.net_since, 3) if self.net_since else None,
               "members": {name: net_cost(m.tree) for name, m in self.members.items()}}
        return net

    def commands(self):
        table = super().commands()
        table.update({
            "copy": lambda r: self.copy(rate=rate(r), wait=False) or {"started": True},
            "verify": lambda r: dict(zip(("identical", "detail"), self.verify())),
            "pivot": lambda r: {"stall_ms": round(self.pivot(force=r.get("force") is True,
                                                             commit=r.get("commit") is True)
                                                  * 1000, 3),
                                "members_ms": self.last_switch["members_ms"],
                                "net": self.phase == Phase.PIVOTED,
                                "lent": "the host service", "group": self.names},
            "revert": lambda r: {"stall_ms": round(self.revert() * 1000, 3),
                                 "members_ms": self.last_switch["members_ms"]},
            "commit": lambda r: {"stall_ms": round(self.commit() * 1000, 3),
                                 "members_ms": self.last_switch["members_ms"],
                                 "sources": [layer["path"] for chain in
                                             self.snapshot["sources"].values() if chain
                                             for layer in chain[:1]]},
            "cancel": lambda r: {"removed": [], "kept": [], "cancelled": self.names,
                                 "lent": "the host service", "group": self.names,
                                 **_merge(self.cancel())},
            "hand-back": lambda r: self.hand_back(),
        })
        return table

    def stop(self):
        with self.internal_change():
            for m in self.members.values():
                m.stop()
            if self.stopped_in is None:
                self.stopped_in = self.phase
            if self.phase != Phase.NEW:
                self.enter(Phase.STOPPED)
            self.log.close()


def _merge(results):
    """The members' cancel replies as one: every file removed and kept."""
    return {"removed": [p for r in results.values() for p in r.get("removed", [])],
            "kept": [p for r in results.values() for p in r.get("kept", [])]}


_ = PhaseError


def _kept(snapshot, complete):
    """The commit's snapshot as the members' data paths found their sources inside the hold:
    consistent only if every one was flushed whole there (Disk._kept_whole); otherwise degraded,
    naming those that were not. A source daemon killed just before the hold, or just after it
    before its flush, made the record call a source consistent that had lost changes."""
    missing = sorted(name for name in snapshot["sources"] if complete.get(name) is not True)
    if not missing or not snapshot["consistent"]:
        return snapshot
    return {**snapshot, "consistent": False,
            "degraded": f"the source of {', '.join(missing)} {INCOMPLETE_SOURCE}"}
