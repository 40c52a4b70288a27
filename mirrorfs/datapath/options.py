"""The data path's options: one object from the supervisor to nbdkit's `key=value` parameters and
back, with the allowed values stated here and nowhere else.

The supervisor builds `DataPathOptions` from what the operator asked for (ServeOptions.datapath in
mirrorfs.control.options, called by mirrorfs.daemons.tree once the sides are known), and turns it
into nbdkit's parameters with `to_params()`; inside nbdkit, `from_params()` rebuilds the same
object from them. Both directions sit side by side so a new option cannot be added to one and
forgotten in the other (tests/unit/test_core.py round-trips every field).

Each rule is checked once, by the class that defines the option: the operator's options (copy
mode, policy, rate, region, lag, I/O timeout, what an evacuation needs) by ServeOptions, when the
operator gives them, using the values stated here (COPY_MODES, POLICIES, MIN_REGION); the
parameters only the process tree sets (which side the source is, the lock granularity, hydrating
in place, a group's net) by `from_params`, where they come into the data path. Building the object
checks nothing: the supervisor does not run the operator's rules a second time on its own output,
nor the data path a third.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

from dataclasses import dataclass, fields

# What `--copy` may be: none, the sides start equal (the Mirrored-Snapshot overlays, or a destination
# the operator already filled); full, the data path copies the whole source first.
COPY_MODES = ("none", "full")
# What a destination failure does to the client's request (see disk.Disk._settle).
POLICIES = ("fail", "degrade")
# Changes within one such unit are serialized (inflight.InFlight): qcow2's default cluster size,
# used for NBD URIs whose format cannot be known.
LOCK_GRANULARITY = 64 * 1024
# Regions of the dirty map: the unit of write intent and of copying again after a failure.
DEFAULT_REGION = 64 * 1024 * 1024
MIN_REGION = 1 << 20
# Regions of an evacuation's hydration map (--switch-first, datapath.evacuation.hydration): what a partial
# write into a region not hydrated yet copies first, so small.
DEFAULT_HYDRATION_REGION = 1 << 20
# A mirror side's request that waits longer is cut (backend.NbdBackend.expire); 0: never.
DEFAULT_IO_TIMEOUT = 30.0
# The longest a switch drains a --lag before its hold (datapath.mirror.lag.Lag.converge): a lag of 64 MiB
# to a destination taking 1 MiB/s drains in 64 s. The supervisor waits for the switch this long more.
LAG_CONVERGE_MAX = 300.0


@dataclass(frozen=True)
class DataPathOptions:
    source: str                         # NBD URI of the authoritative side
    # Which side `source` is: "destination" when a restart after a switch serves it alone.
    source_label: str = "source"
    dest: str | None = None             # NBD URI of the mirror's destination
    control: str | None = None          # the data path's control socket (the supervisor's)
    copy: str = "none"
    state: str | None = None            # state directory (created by the supervisor)
    policy: str = "fail"
    rate: int | None = None             # the copier's limit, bytes per second
    region: int = DEFAULT_REGION
    granularity: int = LOCK_GRANULARITY
    io_timeout: float = DEFAULT_IO_TIMEOUT
    parent: int | None = None           # the supervisor's pid: the data path ends with it (lifeline)
    # Evacuation (datapath.evacuation.evacuee): the destination serves from the start, the source is only read.
    switch_first: bool = False
    # The copier starts held, until the supervisor sets its rate (set-rate): its share of the host
    # budget (mirrorfs.host.budget), so a copy never runs unlimited before it has one.
    hold: bool | None = None
    # With switch_first: the destination's daemon has the source chain as its runtime backing, so
    # every request goes to the destination and hydration is NBD_CMD_CACHE (copy-on-read in that
    # daemon: the bytes never cross nbdkit; datapath.evacuation.evacuee).
    in_place: bool = False
    # With in_place: the destination image's allocation unit (its cluster, or subcluster), the
    # most a write that failed because the source could not be read is widened to (the rare path
    # in place, datapath.evacuation.evacuee). 0: no such path (such a write fails).
    in_place_unit: int = 0
    # With switch_first: a client's read of a region not hydrated also hydrates it
    # (datapath.evacuation.copyonread), so the working set leaves the source first.
    copy_on_read: bool = False
    # A group's safety net (control.group): reads from the destination, changes to both sides,
    # the destination first; what a restart between a group's pivot and its commit serves.
    net: bool = False
    # The bounded lag (datapath.mirror.lag): up to this many bytes of acknowledged changes may be on the
    # source only; 0: every change waits for both sides.
    lag: int = 0

    def problem(self):
        """What is wrong with the parameters the process tree sets (not the operator's options:
        ServeOptions checked those); None if nothing."""
        if not self.source:
            return "a source is required"
        if self.source_label not in ("source", "destination"):
            return f"source_label {self.source_label!r}: expected source or destination"
        if self.granularity < 512 or self.granularity & (self.granularity - 1):
            return f"granularity {self.granularity}: expected a power of two of at least 512"
        if self.net and (self.dest is None or self.switch_first):
            return "net: a mirror's destination serves reads: it needs a destination, no --switch-first"
        if self.in_place and not self.switch_first:
            return "in_place hydrates an evacuation: it needs --switch-first"
        if self.in_place_unit and (not self.in_place or self.in_place_unit < 512 or
                                   self.in_place_unit & (self.in_place_unit - 1) or
                                   self.granularity % self.in_place_unit):
            return (f"in_place_unit {self.in_place_unit}: expected, in place, a power of two of "
                    f"at least 512 dividing the granularity ({self.granularity})")
        return None

    def to_params(self):
        """nbdkit's `key=value` parameters: every field that is set."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_params(cls, params):
        """The options from nbdkit's parameters (a dict); ValueError names what is wrong: an
        unknown or missing parameter, a value of the wrong kind, or a `problem()`."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r} (expected one of {', '.join(known)})")
        values = {}
        for name, text in params.items():
            kind = _KINDS.get(name, str)
            try:
                values[name] = kind(text)
            except ValueError:
                raise ValueError(f"parameter {name}={text!r}: expected a {kind.__name__}") from None
        if "source" not in values:
            raise ValueError("missing parameter: source=URI")
        options = cls(**values)
        problem = options.problem()
        if problem:
            raise ValueError(problem)
        return options

    def alone(self, uri, label):
        """The same disk served from one side alone (after a switch or a cancel): nothing to mirror,
        copy or keep."""
        return DataPathOptions(source=uri, source_label=label, control=self.control,
                               granularity=self.granularity, io_timeout=self.io_timeout,
                               parent=self.parent)


def boolean(text):
    if text not in ("True", "False"):
        raise ValueError(text)
    return text == "True"


_KINDS = {"rate": int, "region": int, "granularity": int, "io_timeout": float, "parent": int,
          "switch_first": boolean, "hold": boolean, "in_place": boolean,
          "in_place_unit": int, "copy_on_read": boolean, "net": boolean,
          "lag": int}
