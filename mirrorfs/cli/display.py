"""What the CLI shows a person: sizes, a progress bar, a one-screen status.

The status is the controllers' one schema (mirrorfs.control.controller): the common fields always, and a line
for each optional section (copy, switch, state, mirror) only when it is there.
"""

import time

from mirrorfs.common.sizes import human_size

BAR_WIDTH = 30


def duration(seconds):
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def progress_bar(fraction, label=""):
    """One line, redrawn in place: the bar keeps its width whatever the label says."""
    fraction = min(max(fraction, 0.0), 1.0)
    done = int(fraction * BAR_WIDTH)
    return f"\r[{'#' * done}{'.' * (BAR_WIDTH - done)}] {fraction * 100:5.1f}% {label}\033[K"


def copy_line(copy):
    """'200.0 MiB of 1.0 GiB, 40.0 MiB/s, 20s left'."""
    text = f"{human_size(copy['bytes_done'])} of {human_size(copy['bytes_total'])}"
    if copy.get("rate"):
        text += f", {human_size(copy['rate'])}/s"
    if copy.get("eta_seconds") is not None:
        text += f", {duration(copy['eta_seconds'])} left"
    return text


def _side(side):
    if side is None:
        return "-"
    if side.get("removed"):
        text = f"{side['overlay']} (removed by cancel)"
        if side.get("base_exists"):
            text += f"; {side['base']} kept"
        return text
    if "overlay" in side:
        text = f"{side['overlay']} on {side['base']}"
        if side.get("base_exists") is False:
            text += " (base not copied yet)"
        return text
    return side["spec"]


def status_text(status):
    if status.get("kind") == "group":
        return group_text(status)
    lines = [f"phase:        {status['phase']} (for {duration(status['phase_seconds'])})"]
    for uri in status.get("uris", []):
        lines.append(f"serving:      {uri}")
    serving = status.get("serving")
    lines.append(f"source:       {_side(status.get('source'))}"
                 + (" <= serves the disk" if serving == "source" else ""))
    if status.get("destination") is not None:
        lines.append(f"destination:  {_side(status['destination'])}"
                     + (" <= serves the disk" if serving == "destination" else ""))
    mirror = status.get("mirror")
    if mirror:
        pids = list((status.get("storage_daemons") or {}).values())
        shared = ", one storage daemon for both sides" if len(pids) == 2 and pids[0] == pids[1] else ""
        copy_mode = mirror["copy_mode"]
        if copy_mode == "none" and not mirror.get("switch_first"):
            copy_mode = "none (the sides were said to be equal; pivot compares them first)"
        lines.append(f"mirror:       copy {copy_mode}, on destination error "
                     f"{mirror['policy']}{', resumed' if mirror['resumed'] else ''}{shared}")
    state = status.get("state")
    if state:
        lines.append(f"state:        {state['directory']}")
    copy = status.get("copy")
    if copy:
        if copy["running"]:
            what = "running"
        elif copy["error"]:
            what = f"failed: {copy['error']}"
        else:
            what = "done" + (" - ready to pivot (mirrorfs pivot)" if copy.get("ready_to_pivot") else "")
        lines.append(f"copy:         {copy['percent']:.1f}% {what} ({copy_line(copy)})")
    hydration = status.get("hydration")
    if hydration:
        lines.append(f"hydration:    {human_size(hydration['bytes_done'])} of "
                     f"{human_size(hydration['bytes_total'])} on the destination; "
                     f"{human_size(hydration['bytes_on_source_only'])} on the source alone")
        if hydration.get("copy_on_read"):
            lines.append(f"  copy-on-read: {human_size(hydration['bytes_copied_on_read'])} "
                         "hydrated by client reads")
        if hydration.get("bytes_held"):
            lines.append(f"  held:       {human_size(hydration['bytes_held'])} written into "
                         f"regions not hydrated while the source could not be read "
                         f"({hydration['held_changes']} changes); copied around later")
        if hydration.get("written_around"):
            lines.append(f"  holes:      {human_size(hydration['bytes_in_holes'])} around "
                         f"{hydration['written_around']} changes written while the source could "
                         "not be read, read from the source; copied later")
        if hydration["source_failing"]:
            lines.append(f"  at risk:    {human_size(hydration['bytes_at_risk'])} "
                         f"({hydration['bytes_at_risk']} bytes): the source fails; "
                         f"{hydration['source_read_errors']} client reads failed, "
                         f"{len(hydration['unreadable'])} regions it cannot copy yet")
        if hydration.get("destination_failing"):
            errnos = sorted({u["errno"] for u in hydration["unwritable"]})
            lines.append(f"  failing:    the destination ({', '.join(errnos)}): "
                         f"{len(hydration['unwritable'])} regions it cannot take yet "
                         f"({human_size(hydration['bytes_unwritable'])}), retried; nothing is at "
                         "risk on the source; clients' changes fail meanwhile")
    switch = status.get("switch")
    if switch:
        rebase = f" (backing change {switch['rebase_ms']:.1f} ms)" if "rebase_ms" in switch else ""
        lines.append(f"switch:       clients held {switch['stall_ms']:.1f} ms{rebase}")
    net = status.get("net")
    if net:
        lines += _net_lines(net, {"": net}, "destination")
    if status.get("snapshot"):
        lines.append(f"snapshot:     {status['snapshot']['what']}")
    lines += _datapath_lines(status.get("datapath"))
    return "\n".join(lines)


def _datapath_lines(dp):
    if not dp:
        return []
    if "error" in dp:
        return [f"data path:    unavailable ({dp['error']})"]
    req = ", ".join(f"{k} {v}" for k, v in sorted(dp.get("requests", {}).items())) or "none"
    lines = [f"requests:     {req}; {dp['in_flight']} in flight",
             f"reads from:   {dp['reader']}; writes to: {', '.join(dp['writers'])}"]
    if dp.get("dirty_bytes"):
        lines.append(f"may differ:   {human_size(dp['dirty_bytes'])}")
    lag = dp.get("lag")
    if lag and lag["mode"] != "ended":
        lines.append(f"lag:          {human_size(lag['bytes'])} of {human_size(lag['limit'])} "
                     f"({lag['mode']}; oldest change {lag['oldest_age_s']:.1f} s; "
                     f"{lag['waits']} writes waited for room)")
    for name, side in dp.get("sides", {}).items():
        lat = side["latency_ms"]
        lat_text = (f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms" if lat["samples"]
                    else "no samples")
        text = f"  {name + ':':13} {side['errors']} errors"
        if side.get("degraded"):
            text += f", {side['degraded']} degraded writes"
        lines.append(f"{text}; write latency {lat_text}")
        last = side.get("last_error")
        if last:
            when = time.strftime("%H:%M:%S", time.localtime(last["time"]))
            lines.append(f"  {'':13} last error {when}: {last['op']} at {last['offset']} "
                         f"length {last['length']}: {last['error']}")
    return lines


def _net_lines(net, costs, where):
    """The safety net (a named disk's, or a group's): how long it is up, and what each disk's
    writes pay for it (`costs`: name -> control.migration.net_cost; name "" for one disk)."""
    up = duration(net["up_seconds"]) if net.get("up_seconds") is not None else "?"
    lines = [f"safety net:   up for {up}: reads from the {where}, every write to both sides "
             "(mirrorfs commit ends it, mirrorfs revert goes back)"]
    for name, m in costs.items():
        src = (m.get("source_latency_ms") or {}).get("p50")
        dst = (m.get("destination_latency_ms") or {}).get("p50")
        lines.append(f"  cost{' ' + name if name else ''}: write p50 source {src} ms, "
                     f"destination {dst} ms; {m['source_degraded']} degraded on the source"
                     + ("" if m["revert_possible"] else
                        f"; revert refused until {human_size(m['may_differ_bytes'] or 0)} "
                        "are copied back"))
    return lines


def group_text(status):
    """A group migration (control.group): the group's phase and record, then each member."""
    group = status["group"]
    lines = [f"group:        {' '.join(group['members'])} ({status['phase']} for "
             f"{duration(status['phase_seconds'])}; record {group['record']}"
             f"{', ended ' + group['end'] if group.get('end') else ''})"]
    switch = status.get("switch")
    if switch:
        lines.append(f"switch:       one hold of every member, clients held at most "
                     f"{switch['hold_ms']:.1f} ms ("
                     + ", ".join(f"{n} {ms:.1f}" for n, ms in switch["members_ms"].items()) + ")")
    net = status.get("net")
    if net:
        lines += _net_lines(net, net["members"], "destinations")
    snapshot = status.get("snapshot")
    if snapshot:
        lines.append(f"snapshot:     {snapshot['what']}")
    copy = status.get("copy")
    if copy:
        lines.append(f"copy:         {copy['percent']:.1f}% of every member's base "
                     f"({copy_line(copy)})")
    for name, member in status["members"].items():
        lines.append(f"--- {name}")
        member = {k: v for k, v in member.items() if k not in ("net", "snapshot")}    # above
        lines += ["  " + line for line in status_text(member).splitlines()]
    return "\n".join(lines)
