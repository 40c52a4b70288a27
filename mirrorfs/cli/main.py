"""The `mirrorfs` command: a thin layer over the package. Every `Error` becomes one line on stderr and
a non-zero exit; tracebacks only with --debug.

Signals: SIGINT and SIGTERM stop a server in order (clients' requests drained and flushed first).
SIGHUP is ignored: a served disk must not go away because the terminal that started it closed."""

import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from mirrorfs.control import socket as control
from mirrorfs.cli import display
from mirrorfs.cli import host
from mirrorfs.cli import named
from mirrorfs.system import notify
from mirrorfs.control import stopreport
from mirrorfs.system.access import Access
from mirrorfs.cli import parser as options
from mirrorfs.common import jsonlines
from mirrorfs.errors import Error, UsageError
from mirrorfs.control.evacuation import Evacuation
from mirrorfs.control.export import Export
from mirrorfs.control.group import Group
from mirrorfs.control.migration import Migration
from mirrorfs.control.mirror import Mirror
from mirrorfs.control.options import ServeOptions
from mirrorfs.host.budget import Share
from mirrorfs.host.rundir import Registration

EXIT_ERROR = 1
EXIT_USAGE = 2


def _stop_on_signals():
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return stop


def _serve_options(args, **extra):
    return ServeOptions(socket=args.socket, listen=args.listen, threads=args.threads,
                        state_dir=args.state_dir, policy=args.on_dest_error,
                        switch_first=args.switch_first, copy_on_read=args.copy_on_read,
                        io_timeout=args.io_timeout, cache=args.cache, one_daemon=args.one_daemon,
                        lag=args.lag, access=options.access_of(args), **extra)


def _control_path(args):
    path = args.control or (args.socket + ".ctl" if args.socket else None)
    take_over = getattr(args, "take_over", None)
    if path is None and take_over:
        # The export's control socket is <socket>.ctl: the migration's sits beside it.
        path = take_over.removesuffix(".ctl") + ".migration.ctl"
    if path is None:
        raise UsageError("give --control PATH (there is no --socket to put it next to)")
    return path


def _run_controller(controller, control_path, uris, rundir):
    """Serve the control socket and the disk until SIGINT/SIGTERM; stop everything after. The disk
    is registered in the host's run directory meanwhile, and its copies draw from the host budget."""
    stop = _stop_on_signals()
    options = getattr(controller, "options", None)      # an Export has no ServeOptions
    access = options.access if options else controller.access
    if options is not None:
        access.check(options.listen_address)            # before the control socket exists
    ctl = control.serve(control_path, controller) if control_path else None
    try:
        if ctl is not None:
            access.share(control_path)
        controller.start()
        for uri in uris():
            print(f"serving {uri}", flush=True)
        if ctl is not None:
            print(f"control {control_path}", flush=True)
        notify.ready(f"{controller.kind} {controller.phase}: {', '.join(uris())}")
        with Registration(rundir, controller.kind, control_path, uris(),
                          take_over=getattr(controller, "take_over", None),
                          disk=getattr(getattr(controller, "lender", None), "name", None),
                          **({"group": controller.names} if isinstance(controller, Group) else {})):
            _run_registered(controller, stop, rundir, uris())
        if not stop.is_set():
            print(f"{controller.phase}; stopping", flush=True)
    finally:
        notify.stopping()
        controller.stop()
        if ctl is not None:
            ctl.stop()
            Path(control_path).unlink(missing_ok=True)
    return _stopped(controller)


def _run_registered(controller, stop, rundir, uris):
    share = None
    if controller.copies:
        share = Share(rundir, uris[0] if uris else "?", controller.copy_probe,
                      controller.copy_apply, cap=controller.copy_cap())
        controller.host_share = share.start()
    try:
        controller.run(stop)
    finally:
        if share is not None:
            share.stop()
            controller.host_share = None


def _stopped(controller):
    """The last words of a server: "stopped", or, when the sides may differ, a line saying so
    (stopreport.py) and its exit status."""
    tree = controller.tree
    report = stopreport.divergence(tree) if tree is not None else None
    step = (stopreport.next_step(controller, shlex.join(["mirrorfs", *sys.argv[1:]]))
            if isinstance(controller, (Migration, Group)) else None)
    if report is None:
        print("stopped", flush=True)
        if step:
            print(step, file=sys.stderr, flush=True)
        return 0
    line, status = report
    print(line, file=sys.stderr, flush=True)
    if step and status == 0:
        print(step, file=sys.stderr, flush=True)
    return status


def cmd_serve(args):
    for image in (args.source, args.dest):
        named.refuse_named(args, image, "move a named disk with mirrorfs start NAME --dest-dir DIR")
    rundir = host.run_dir(args)
    options = _serve_options(args, readonly=args.readonly, copy=args.copy,
                             rate=args.rate, region=args.region,
                             hold_copy=True)
    mirror = Mirror(args.source, args.dest, options)
    control_path = args.control or (args.socket + ".ctl" if args.socket else None)
    return _run_controller(mirror, control_path, lambda: mirror.tree.uris, rundir)


def cmd_start(args):
    if args.members:
        return _start_group(args)
    rundir = host.run_dir(args)
    lender, source_top = named.start_lender(args, rundir)
    disk = lender.name if lender else None
    control_path = (args.control or named.migration_control(rundir, disk)) if disk \
        else _control_path(args)
    # The options go to the class as given: what each may not take (--rate without
    # --switch-first, say) is refused there, for the Python API too.
    common = {"take_over": args.take_over, "disk": disk, "hold_copy": True, "rate": args.rate}
    if args.switch_first:
        migration = Evacuation(source_top, args.dest_dir,
                               _serve_options(args, copy="full", **common),
                               overlay_name=args.overlay_name, lender=lender, control=control_path)
    else:
        migration = Migration(source_top, args.dest_dir, _serve_options(args, **common),
                              overlay_name=args.overlay_name, lender=lender, control=control_path)
    return _run_controller(migration, control_path, lambda: migration.tree.uris, rundir)


def _start_group(args):
    """`mirrorfs start NAME NAME... --dest-dir DIR --state-dir DIR`: one group (control.group)."""
    names = [args.source_top, *args.members]
    # Arguments of `start` that a group's command has no use for (Group takes no such thing):
    # refused here. What a member's options may not be is Group's to refuse (its --rate, --lag).
    if args.take_over or args.switch_first or args.overlay_name or args.socket or args.listen:
        raise UsageError("a group moves named disks: no --take-over, --switch-first, "
                         "--overlay-name, --socket or --listen")
    rundir = host.run_dir(args)
    lenders = [named.group_lender(args, rundir, name) for name in names]
    control_path = args.control or named.group_control(rundir, names[0])

    def member_options(name, state_dir):
        args.state_dir = str(state_dir)
        return _serve_options(args, disk=name, hold_copy=True, rate=args.rate)

    group = Group(names, lenders, args.dest_dir, member_options, args.state_dir, control_path)
    return _run_controller(group, control_path, lambda: group.uris, rundir)


def _control(args):
    return named.control_of(args)


def _then(args, cmd, why):
    """The next step after a command, spelled the way the operator named the migration."""
    target = getattr(args, "target", None)
    how = target if named.is_name(target) and not os.path.exists(target) else \
        f"--control {named.control_of(args)}"
    return f"next: mirrorfs {cmd} {how} ({why})"


def _call(args, cmd, **fields):
    try:
        return jsonlines.call(_control(args), {"cmd": cmd, **fields}, timeout=600)
    except jsonlines.ControlError as e:
        raise Error(str(e)) from None


def cmd_copy(args):
    _call(args, "copy", rate=args.rate)
    if args.background:
        print("copy started", flush=True)
        return 0
    tty = sys.stdout.isatty() and not args.json
    while True:
        copy = _call(args, "status")["status"].get("copy", {})
        if args.json:
            print(json.dumps(copy), flush=True)
        elif tty:
            print(display.progress_bar(copy["percent"] / 100, display.copy_line(copy)), end="",
                  flush=True)
        if not copy.get("running"):
            break
        time.sleep(0.5)
    if tty:
        print()
    if copy.get("error"):
        raise Error(f"base copy failed: {copy['error']}")
    if not args.json:
        print(f"base copied: {display.copy_line(copy)} in {display.duration(copy['seconds'])}; "
              "ready to pivot", flush=True)
    return 0


def cmd_status(args):
    while True:
        status = _call(args, "status")["status"]
        if args.json:
            print(json.dumps(status, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            print(display.status_text(status), flush=True)
        if not args.watch:
            return 0
        time.sleep(1)


def cmd_pivot(args):
    reply = _call(args, "pivot", force=args.force, commit=args.commit)
    if reply.get("group"):
        holds = ", ".join(f"{n} {ms:.1f} ms" for n, ms in reply["members_ms"].items())
        print(f"switched every member of the group to its destination at once; clients held "
              f"{reply['stall_ms']:.1f} ms at most ({holds})", flush=True)
        if reply.get("net"):
            print("the safety net is up: reads from the destinations, writes to both sides; "
                  f"{_then(args, 'commit', 'end it')} or "
                  f"{_then(args, 'revert', 'every member back on its source').removeprefix('next: ')}",
                  flush=True)
            return 0
    else:
        print(f"switched to the destination; clients held {reply['stall_ms']:.1f} ms", flush=True)
        if reply.get("net"):
            print("the safety net is up: reads from the destination, writes to both sides; "
                  f"{_then(args, 'commit', 'end it')} or "
                  f"{_then(args, 'revert', 'back on the source').removeprefix('next: ')}",
                  flush=True)
            return 0
    if reply.get("lent"):
        print(_then(args, "hand-back", f"{reply['lent']} serves the destination chain again"),
              flush=True)
    return 0


def cmd_revert(args):
    reply = _call(args, "revert")
    if "members_ms" in reply:
        print(f"reverted: every member of the group reads from its source again; clients held "
              f"{reply['stall_ms']:.1f} ms at most; the group mirrors", flush=True)
    else:
        print(f"reverted: the disk reads from its source again; clients held "
              f"{reply['stall_ms']:.1f} ms; it mirrors", flush=True)
    print(_then(args, "cancel", "end on the source") + " (or pivot again)", flush=True)
    return 0


def cmd_commit(args):
    reply = _call(args, "commit")
    if "members_ms" in reply:
        print(f"committed: every member serves its destination alone; clients held "
              f"{reply['stall_ms']:.1f} ms at most; the sources are a crash-consistent image of "
              f"the group at the commit (kept: {', '.join(reply['sources'])})", flush=True)
    else:
        print(f"committed: the disk serves its destination alone; clients held "
              f"{reply['stall_ms']:.1f} ms; the source is the disk as it was at the commit "
              f"(kept: {', '.join(reply['sources'])})", flush=True)
    print(_then(args, "hand-back", "the host service serves the destination again"), flush=True)
    return 0


def cmd_export(args):
    named.refuse_named(args, args.disk, "the host service serves it (mirrorfs list); a retired "
                       "image holds old data")
    rundir = host.run_dir(args)
    exported = Export(args.disk, args.socket, cache=args.cache, access=Access(group=args.group))
    return _run_controller(exported, args.control or args.socket + ".ctl", lambda: exported.uris,
                           rundir)


def cmd_hand_back(args):
    reply = _call(args, "hand-back")
    if "members" in reply:
        for name, member in reply["members"].items():
            print(f"handed back: {member['to']} serves {member['image']}", flush=True)
        return 0
    print(f"handed back: {reply.get('to', 'the export')} serves {reply['image']}", flush=True)
    return 0


def cmd_cancel(args):
    reply = _call(args, "cancel")
    line = ("cancelled every member of the group; each serves its source chain"
            if reply.get("group") else "cancelled; serving the source chain")
    if reply.get("removed"):
        line += f"; removed {', '.join(reply['removed'])}"
    if reply.get("kept"):
        line += (f"; kept {', '.join(reply['kept'])} (not known to be this migration's: remove "
                 "it yourself if it is not needed)")
    print(line, flush=True)
    if reply.get("lent"):
        print(_then(args, "hand-back", f"{reply['lent']} serves the source chain again"), flush=True)
    return 0


COMMANDS = {"serve": cmd_serve, "start": cmd_start, "copy": cmd_copy, "status": cmd_status,
            "pivot": cmd_pivot, "revert": cmd_revert, "commit": cmd_commit,
            "hand-back": cmd_hand_back, "export": cmd_export, "cancel": cmd_cancel,
            "list": host.cmd_list, "top": host.cmd_list, "budget": host.cmd_budget,
            "rate": host.cmd_rate, "metrics": host.cmd_metrics,
            "host": host.cmd_host, "add": host.cmd_add, "remove": host.cmd_remove,
            "shutdown": host.cmd_shutdown}


def main(argv=None):
    logging.basicConfig(format="mirrorfs: %(message)s")
    parser = options.build_parser(COMMANDS)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as e:
        if debug:
            raise
        print(f"mirrorfs: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Error as e:
        if debug:
            raise
        print(f"mirrorfs: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mirrorfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `mirrorfs status | head -1`: the reader is gone, which is no error of ours. Point stdout
        # at /dev/null so that the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
