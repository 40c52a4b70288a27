"""The host's commands: `mirrorfs list` (or `top`), `mirrorfs budget`, `mirrorfs rate`, `mirrorfs
metrics`, and the named disks' `mirrorfs host`, `add`, `remove`, `shutdown` (their options are in
cli.parser, with every other command's)."""

import json
import os
import signal
import sys
import threading
import time

from mirrorfs.cli import display
from mirrorfs.cli import named
from mirrorfs.cli.parser import rate as rate_type
from mirrorfs.common import jsonlines
from mirrorfs.common.sizes import human_size
from mirrorfs.errors import Error, UsageError
from mirrorfs.host import budget as host_budget
from mirrorfs.host import view
from mirrorfs.host import hostctl
from mirrorfs.host.rundir import RunDir, process_running


def run_dir(args, create=True):
    return RunDir(args.run_dir, create=create)


def _rate(text, what):
    """A rate, or None for 'none' / 'unlimited' (common.sizes.parse_rate)."""
    return rate_type(what, unlimited=True)(text)


# list / top

def _size(n):
    return human_size(n) if n is not None else "-"


def line(record):
    copy = record.get("copy") or {}
    if copy.get("bytes_total") is not None:
        copied = f"{_size(copy.get('bytes_done'))}/{_size(copy['bytes_total'])}"
    else:
        copied = "-"
    rate = f"{_size(copy['rate'])}/s" if copy.get("rate") else "-"
    if copy.get("share") is not None and copy.get("running", True):
        rate += f" (share {_size(copy['share'])}/s)" if copy["share"] else " (queued)"
    eta = display.duration(copy["eta_seconds"]) if copy.get("eta_seconds") is not None else "-"
    errors = " ".join(f"{side[:3]}:{n}" for side, n in record.get("errors", {}).items()) or "-"
    holder = "-"
    if record.get("kind") == "named":
        holder = f"{record['name']}: {record.get('top') or '-'}"
        if record.get("lent"):
            lent = record["lent"]
            holder += f", lent to {lent['migration']} (pid {lent['pid']}{'' if lent.get('alive') else ', dead'})"
        if record.get("error"):
            holder += f"; {record['error']}"
    elif record.get("group"):
        holder = f"group of {' '.join(record['group'])}"
    elif record.get("lent_to"):
        holder = f"lent to pid {record['lent_to']['pid']}"
    elif record.get("taken_over_from"):
        holder = f"from export pid {record['taken_over_from']['pid']}"
    return (f"{record['socket'] or '-':<32} {record['kind']:<9} {record['phase']:<14} {copied:<22} "
            f"{rate:<30} {eta:<7} {errors:<12} {holder}")


HEADER = (f"{'SOCKET':<32} {'KIND':<9} {'PHASE':<14} {'COPIED':<22} {'RATE':<30} {'ETA':<7} "
          f"{'ERRORS':<12} HOLDER")


def cmd_list(args):
    rundir = run_dir(args, create=False)
    # --watch ends at SIGINT/SIGTERM after the refresh under way: a KeyboardInterrupt raised while
    # view.disks joins its threads could leave the interpreter waiting for one at exit, forever
    # (seen: `top --json` still running 30 s after its SIGINT, tests/system/test_host_list.py).
    stop = threading.Event()
    if args.watch:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
    while True:
        records = view.disks(rundir)
        if args.json:
            for r in records:
                r.pop("status", None)
            print(json.dumps(records, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            budget = host_budget.load(rundir)
            print(f"{len(records)} disks; budget: {host_budget.describe(budget)}")
            print(HEADER)
            for r in records:
                print(line(r))
            sys.stdout.flush()
        if not args.watch or stop.wait(1):
            return 0


# budget

def cmd_budget(args):
    changes = {}
    if args.action == "clear":
        changes = {k: None for k in host_budget.FIELDS}
    elif args.action == "set":
        if args.rate is None and args.max_copies is None and args.floor is None:
            raise UsageError("budget set: give a rate (e.g. 400M), --max-copies or --floor")
        if args.rate is not None:
            changes["rate"] = _rate(args.rate, "budget set")
        if args.max_copies is not None:
            if args.max_copies.lower() in ("none", "unlimited"):
                changes["max_copies"] = None
            elif not args.max_copies.isdigit():
                raise UsageError(f"--max-copies {args.max_copies!r}: expected a positive number")
            else:
                changes["max_copies"] = int(args.max_copies)      # its rule: host_budget.check
        if args.floor is not None:
            changes["floor"] = _rate(args.floor, "--floor")
            changes["busy_writes"] = _rate(args.busy_writes or "64M", "--busy-writes")
    elif args.rate is not None:
        raise UsageError(f"budget {args.rate!r}: to change the budget, 'mirrorfs budget set "
                         f"{args.rate}'")
    host_budget.check(changes)
    rundir = run_dir(args)              # after the arguments are checked: a mistake creates nothing
    budget = host_budget.save(rundir, **changes) if changes else host_budget.load(rundir)
    if args.json:
        print(json.dumps(budget), flush=True)
    else:
        print(f"budget: {host_budget.describe(budget)}", flush=True)
    return 0


# rate

def cmd_rate(args):
    control = named.control_of(args)
    rate = _rate(args.rate, "rate")
    try:
        jsonlines.call(control, {"cmd": "rate", "rate": rate}, timeout=30)
    except jsonlines.ControlError as e:
        raise Error(str(e)) from None
    print(f"copy rate: {_size(rate) + '/s' if rate else 'unlimited'} (under the host budget)",
          flush=True)
    return 0


# metrics

def cmd_metrics(args, stop=None):
    from mirrorfs.host import metrics          # prometheus_client: only this command needs it
    rundir = run_dir(args)
    server = metrics.MetricsServer(rundir, args.listen)
    print(f"metrics {server.url}", flush=True)
    try:
        server.serve(stop)
    finally:
        server.close()
    return 0


# named disks: the host service and its commands

def cmd_host(args):
    from mirrorfs.host.registry import Registry
    from mirrorfs.host.service import HostOptions, HostService
    options = HostOptions(args.cache, args.take_back_after, args.group)     # before anything is made
    registry = Registry(args.registry)
    rundir = run_dir(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    service = HostService(registry, rundir, options=options)
    service.start()
    print(f"host service: {len(service.disks)} disks from {registry.path}; control "
          f"{service.control_path}", flush=True)
    try:
        service.run(stop)
    finally:
        service.close(shutdown=service.shutdown_requested)
    print("stopped; every disk stopped" if service.shutdown_requested
          else "stopped; the disks are still served (the next `mirrorfs host` adopts them)", flush=True)
    return 0


def cmd_add(args):
    rundir = run_dir(args, create=False)
    reply = hostctl.call(rundir, "add", disk=args.name, image=os.path.abspath(args.image),
                         socket=os.path.abspath(args.socket))
    disk = reply["disk"]
    if disk["phase"] == "failed":
        raise Error(f"{args.name} added but not served: {disk['error']}")
    print(f"{args.name}: serving {disk['top']} on nbd+unix:///?socket={disk['socket']}", flush=True)
    return 0


def cmd_remove(args):
    rundir = run_dir(args, create=False)
    reply = hostctl.call(rundir, "remove", disk=args.name)
    print(f"{args.name} removed; its images are left as they are: {' <- '.join(reply['chain'])}",
          flush=True)
    return 0


def cmd_shutdown(args):
    rundir = run_dir(args, create=False)
    service = next((e for e in rundir.entries(view.DISKS) if e.get("kind") == "host"), None)
    reply = hostctl.call(rundir, "shutdown")
    if service is not None:
        deadline = time.monotonic() + 300
        while process_running(service["pid"], service["process_start"]):
            if time.monotonic() > deadline:
                raise Error(f"the host service (pid {service['pid']}) is still stopping its disks")
            time.sleep(0.1)
    print(f"stopped {reply['stopping']} disks and the host service", flush=True)
    return 0

