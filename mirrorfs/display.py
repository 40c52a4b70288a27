"""What the CLI shows a person: sizes, a progress bar, a one-screen status."""

import shutil
import time


def size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def progress_bar(fraction, label="", width=None):
    width = width or min(50, max(10, shutil.get_terminal_size((80, 20)).columns - len(label) - 12))
    done = int(fraction * width)
    return f"\r[{'#' * done}{'.' * (width - done)}] {fraction * 100:5.1f}% {label}"


def copy_line(copy):
    rate = ""
    if copy.get("seconds"):
        rate = f", {size(copy['bytes_copied'] / copy['seconds'])}/s"
    return f"{size(copy['bytes_copied'])} of {size(copy['bytes_total'])}{rate}"


def status_text(status):
    lines = [f"phase:        {status['phase']} (for {status['phase_seconds']:.0f}s)"]
    for uri in status.get("uris", []):
        lines.append(f"serving:      {uri}")
    src, dst = status["source"], status["destination"]
    lines.append(f"source:       {src['overlay']} on {src['base']}")
    lines.append(f"destination:  {dst['overlay']} on {dst['base']}"
                 f"{'' if dst['base_exists'] else ' (base not copied yet)'}")
    copy = status.get("copy")
    if copy:
        state = "running" if copy["running"] else ("failed: " + copy["error"] if copy["error"] else "done")
        lines.append(f"base copy:    {copy['percent']:.1f}% {state} ({copy_line(copy)})")
    switch = status.get("switch")
    if switch:
        lines.append(f"switch:       clients held {switch['stall_ms']:.1f} ms "
                     f"(backing change {switch['rebase_ms']:.1f} ms)")
    dp = status.get("datapath") or {}
    if "error" in dp:
        lines.append(f"data path:    unavailable ({dp['error']})")
    elif dp:
        req = ", ".join(f"{k} {v}" for k, v in sorted(dp.get("requests", {}).items())) or "none"
        lines.append(f"requests:     {req}; {dp['in_flight']} in flight")
        lines.append(f"reads from:   {dp['reader']}; writes to: {', '.join(dp['writers'])}")
        for name, side in dp.get("sides", {}).items():
            lat = side["latency_ms"]
            lat_text = (f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms" if lat["samples"]
                        else "no samples")
            lines.append(f"  {name + ':':13} {side['errors']} errors; write latency {lat_text}")
            last = side.get("last_error")
            if last:
                when = time.strftime("%H:%M:%S", time.localtime(last["time"]))
                lines.append(f"  {'':13} last error {when}: {last['op']} at {last['offset']} "
                             f"length {last['length']}: {last['error']}")
    return "\n".join(lines)
