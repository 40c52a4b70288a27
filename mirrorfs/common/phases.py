"""Every phase a served disk can be in, in one table: what `status` shows, what events carry, what
the state journal saves as a mirror's end.

A `Phase` is a `str` (StrEnum): it compares equal to its name, and JSON writes it as that string, so
the status schema, the control protocol and saved state are unchanged by naming phases here.
Standard library only: the data path's state journal uses the ends too.
"""

import enum


class Phase(enum.StrEnum):
    # Every controller.
    NEW = "new"                         # made, not started
    STOPPED = "stopped"                 # its processes are gone; the images stay as they are
    # `serve` (control.mirror) and `start` (control.migration).
    SERVING = "serving"                 # serve --readonly: the source alone, no mirror
    MIRRORING = "mirroring"             # reads from the source, changes to both sides
    COPYING = "copying"                 # serve, shown: mirroring while the sides may still differ
    SYNCHRONIZED = "synchronized"       # serve, shown: mirroring with nothing left to copy
    QUEUED = "queued"                   # shown: a copy (serve's, a base copy, a hydration) waits
                                        # for a slot of the host's concurrent copies
    COPYING_BASE = "copying-base"       # start: mirroring while Step 4 copies the base
    SWITCHING = "switching"             # start: a pivot holds the clients' requests
    PIVOTED = "pivoted"                 # a group's safety net: reads from the destination, changes
                                        # still to both (destination first); revert or commit
    SWITCHED = "switched"               # the destination alone (an end, saved in the state)
    CANCELLED = "cancelled"             # the source alone (an end, saved in the state)
    HANDED_BACK = "handed-back"         # start --take-over: the disk went back to its export
    # --switch-first (datapath.evacuation.evacuee): the destination serves from the start.
    HYDRATING = "hydrating"             # unhydrated regions are read from the read-only source
    HYDRATED = "hydrated"               # the destination holds everything; the source is released
    # `export` (control.export).
    EXPORTING = "exporting"             # a plain storage daemon serves the disk
    LENT = "lent"                       # a migration serves the disk on the export's socket


# How a mirror can end, in the state journal and the data path's switch.
ENDS = (Phase.SWITCHED, Phase.CANCELLED)
