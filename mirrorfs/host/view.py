"""What the host's mirrorfs processes are doing, gathered from the run directory: one record per disk,
for `mirrorfs list` (and its --json) and for the metrics.

Each registered process is asked for its status on its control socket (what `mirrorfs status`
shows), and its copy's entry in the budget (mirrorfs.host.budget) adds the rate measured over the
last second and the share it was given. A process that does not answer within TIMEOUT is listed
as unreachable rather than holding up the whole view.
"""

import concurrent.futures

from mirrorfs.common import jsonlines
from mirrorfs.host import budget as host_budget
from mirrorfs.host.rundir import COPIES, DISKS

TIMEOUT = 5.0


def _socket(entry):
    for uri in entry.get("uris") or []:
        if "socket=" in uri:
            return uri.split("socket=", 1)[1]
    return (entry.get("uris") or [entry.get("control")])[0]


def _ask(entry):
    try:
        return jsonlines.call(entry["control"], {"cmd": "status"}, timeout=TIMEOUT)["status"]
    except (jsonlines.ControlError, OSError, ValueError) as e:
        return {"error": str(e)}


def named(entry):
    """The named disks of the host service registered as `entry` (mirrorfs.host.service), one record
    each: the fields of every other disk's record, and the named disk's own (name, top, chain, the
    loan). A service that does not answer is one record saying so."""
    try:
        listed = jsonlines.call(entry["control"], {"cmd": "list"}, timeout=TIMEOUT)["disks"]
    except (jsonlines.ControlError, OSError, ValueError, KeyError) as e:
        return [{"pid": entry["pid"], "kind": "host", "socket": entry["control"],
                 "control": entry["control"], "uris": [], "phase": "unreachable", "error": str(e),
                 "status": {"error": str(e)}, "copy": None, "errors": {}}]
    records = []
    for disk in listed:
        record = {"pid": disk.get("pid"), "kind": "named", "control": entry["control"],
                  "uris": [f"nbd+unix:///?socket={disk['socket']}"] if disk.get("socket") else [],
                  "status": {}, "copy": None, "errors": {}, **disk}
        if disk.get("lent"):
            record["lent_to"] = {"pid": disk["lent"]["pid"], "alive": disk["lent"].get("alive"),
                                 "control": disk["lent"].get("control")}
        records.append(record)
    return records


def disks(rundir):
    """One record per live registered disk, oldest first (see the module's docstring); the host
    service's named disks in its place, by name."""
    entries = rundir.entries(DISKS)
    hosts = [e for e in entries if e.get("kind") == "host"]
    entries = [e for e in entries if e.get("kind") != "host"]
    copies = {c["pid"]: c for c in rundir.entries(COPIES)}
    budget = host_budget.load(rundir)
    shares = host_budget.shares(budget, list(copies.values()))
    by_control = {e.get("control"): e for e in entries}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(entries)))) as pool:
        statuses = list(pool.map(_ask, entries))
    records = []
    for entry, status in zip(entries, statuses):
        record = {"pid": entry["pid"], "kind": entry["kind"], "socket": _socket(entry),
                  "control": entry.get("control"), "uris": entry.get("uris", []),
                  "phase": status.get("phase", "unreachable"), "status": status}
        if "error" in status:
            record["error"] = status["error"]
        copy = dict(status.get("copy") or {})
        entry_copy = copies.get(entry["pid"])
        if entry_copy is not None:
            copy.update({"rate": entry_copy.get("rate"), "cap": entry_copy.get("cap"),
                         "share": shares.get(entry["pid"]), "client_writes": entry_copy.get("writes")})
            done, total = copy.get("bytes_done"), copy.get("bytes_total")
            if copy.get("rate") and done is not None and total is not None and total > done:
                copy["eta_seconds"] = round((total - done) / copy["rate"])
        record["copy"] = copy or None
        dp = status.get("datapath") or {}
        record["errors"] = {side: s.get("errors", 0) for side, s in (dp.get("sides") or {}).items()}
        lent = status.get("lent")
        if lent and status.get("phase") == "lent":
            holder = next((e for e in entries if e["pid"] == lent["pid"]), None)
            record["lent_to"] = {"pid": lent["pid"], "alive": lent.get("alive"),
                                 "control": holder.get("control") if holder else None}
        if entry.get("group"):
            record["group"] = entry["group"]        # a group migration: its members' names
        if entry.get("take_over"):
            export = by_control.get(entry["take_over"])
            record["taken_over_from"] = {"control": entry["take_over"],
                                         "pid": export["pid"] if export else None}
        records.append(record)
    for entry in hosts:
        records += named(entry)
    return records
