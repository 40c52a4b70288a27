"""The `mirrorfs` command: a thin layer over the package. Every `Error` becomes one line on stderr and
a non-zero exit; tracebacks only with --debug.

Signals: SIGINT and SIGTERM stop a server in order (clients' requests drained and flushed first).
SIGHUP is ignored: a served disk must not go away because the terminal that started it closed."""

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from mirrorfs import __version__
from mirrorfs.control import socket as control
from mirrorfs.cli import display
from mirrorfs.cli import host
from mirrorfs.system import notify
from mirrorfs.control import stopreport
from mirrorfs.system.access import TLS_MODES, Access
from mirrorfs.control.basecopy import parse_rate
from mirrorfs.common import jsonlines
from mirrorfs.datapath.options import COPY_MODES, POLICIES
from mirrorfs.errors import Error, UsageError
from mirrorfs.control.export import Export
from mirrorfs.control.migration import Migration
from mirrorfs.control.mirror import Mirror
from mirrorfs.control.options import ServeOptions
from mirrorfs.daemons.storage import CACHE_MODES
from mirrorfs.host.budget import Share
from mirrorfs.host.rundir import Registration

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message):
        raise UsageError(message)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _storage_options(p):
    p.add_argument("--io-timeout", metavar="SECONDS", type=float,
                   help="cut a side's connection when a request waits longer (default 30; "
                        "0: never); the request then fails on that side")
    p.add_argument("--cache", choices=CACHE_MODES, default="auto",
                   help="how the storage daemons use the host's page cache for image files: none "
                        "(O_DIRECT), writeback, or auto: none where the file system allows it "
                        "(default)")


def _access_options(p):
    g = p.add_argument_group("who can connect")
    g.add_argument("--tls", choices=TLS_MODES,
                   help="TLS on every socket served: require (refuse clients without it), on (offer "
                        "it), off (default; require when credentials are given)")
    g.add_argument("--tls-certificates", metavar="DIR",
                   help="X.509: DIR holds ca-cert.pem, server-cert.pem and server-key.pem; "
                        "clients must present a certificate signed by that CA")
    g.add_argument("--tls-no-verify-peer", action="store_true",
                   help="X.509: let in clients without a CA-signed certificate (encryption only)")
    g.add_argument("--tls-psk", metavar="FILE", help="pre-shared keys, USERNAME:HEXKEY lines "
                   "(psktool -u NAME -p FILE)")
    g.add_argument("--insecure", action="store_true",
                   help="allow --listen on an address other machines can reach without --tls require")
    g.add_argument("--group", metavar="NAME",
                   help="unix sockets (disk and control) are 0660 and owned by this group, not 0600")


def _access(args):
    return Access(tls=args.tls, certificates=args.tls_certificates, psk=args.tls_psk,
                  group=args.group, insecure=args.insecure,
                  verify_peer=not args.tls_no_verify_peer)


def build_parser():
    parser = _Parser(prog="mirrorfs", description="Move a running VM's disk to new storage, served over NBD.")
    parser.add_argument("--version", action="version", version=f"mirrorfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    serve = sub.add_parser(
        "serve", help="serve SOURCE, mirroring every change to DEST",
        description="Serve one disk over NBD: reads come from SOURCE; writes, zeroes and trims go to "
                    "SOURCE and DEST and complete when both have them. SOURCE and DEST are image files "
                    "(raw or qcow2, backing chains followed), RBD images "
                    "(rbd:POOL/IMAGE[:conf=FILE][:id=USER]) or NBD URIs. Runs until SIGINT/SIGTERM.")
    serve.add_argument("source", metavar="SOURCE")
    serve.add_argument("dest", metavar="DEST", nargs="?")
    serve.add_argument("--socket", metavar="PATH", help="serve on this unix socket (mode 0600)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="serve on this TCP address")
    serve.add_argument("--readonly", action="store_true", help="serve SOURCE read-only, no mirror")
    serve.add_argument("--threads", type=_positive_int, default=16,
                       help="nbdkit worker threads per connection (default 16)")
    serve.add_argument("--copy", choices=COPY_MODES, default="none",
                       help="none: DEST already equals SOURCE (default); full: copy all of SOURCE "
                            "to DEST in the background while mirroring writes")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="keep the mirror's state here, so a restart resumes after a crash")
    serve.add_argument("--on-dest-error", choices=POLICIES,
                       help="a destination failure fails the client's request (fail), or is "
                            "recorded and copied again later (degrade; the default with --state-dir)")
    serve.add_argument("--rate", metavar="BYTES/S", help="limit the background copy, e.g. 100M")
    serve.add_argument("--region", metavar="BYTES", type=lambda t: parse_rate(t, "--region"),
                       help="the dirty map's region size: a power of two from 1M (default 64M)")
    serve.add_argument("--control", metavar="PATH",
                       help="control socket (default: the --socket path + .ctl)")
    _storage_options(serve)
    _access_options(serve)
    host.run_dir_option(serve)
    serve.set_defaults(func=cmd_serve)

    start = sub.add_parser(
        "start", help="Step 3: snapshot SOURCE_TOP on both sides and serve it, mirrored",
        description="Create the source overlay on SOURCE_TOP and the destination overlay in DEST_DIR, "
                    "and serve one disk: reads from the source chain, writes to both overlays. Then "
                    "copy the base (mirrorfs copy, or cp), and switch (mirrorfs pivot) or cancel. "
                    "Runs until SIGINT/SIGTERM.")
    start.add_argument("source_top", metavar="SOURCE_TOP", nargs="?",
                       help="the top of the disk's chain now; read-only from here on (with "
                            "--take-over: what the export serves)")
    start.add_argument("--take-over", metavar="EXPORT_CONTROL",
                       help="take the disk over from a running `mirrorfs export` (its control "
                            "socket): its clients reconnect to this migration on the same socket")
    start.add_argument("--dest-dir", required=True, metavar="DIR", help="where the disk moves to")
    start.add_argument("--overlay-name", metavar="NAME",
                       help="file name of the new overlays (default: <SOURCE_TOP stem>-snap.qcow2)")
    start.add_argument("--socket", metavar="PATH", help="serve on this unix socket (mode 0600)")
    start.add_argument("--listen", metavar="HOST:PORT", help="serve on this TCP address")
    start.add_argument("--control", metavar="PATH",
                       help="control socket (default: the --socket path + .ctl)")
    start.add_argument("--threads", type=_positive_int, default=16,
                       help="nbdkit worker threads per connection (default 16)")
    start.add_argument("--state-dir", metavar="DIR",
                       help="keep the migration's state here; start again with it to resume")
    start.add_argument("--on-dest-error", choices=POLICIES,
                       help="as for serve (default: degrade with --state-dir, else fail)")
    _storage_options(start)
    _access_options(start)
    host.run_dir_option(start)
    start.set_defaults(func=cmd_start)

    def client(name, help_, description):
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("--control", "-c", metavar="PATH", default=os.environ.get("MIRRORFS_CONTROL"),
                       help="the migration's control socket (default: $MIRRORFS_CONTROL)")
        return p

    copy = client("copy", "Step 4: copy the source base to the destination",
                  "Copy the read-only base below the overlays to the destination with qemu-img "
                  "convert (sparse, extent-aware), showing progress until it is done.")
    copy.add_argument("--rate", metavar="BYTES/S", help="limit the copy, e.g. 100M or 1G")
    copy.add_argument("--json", action="store_true", help="progress as JSON lines")
    copy.add_argument("--background", action="store_true", help="start the copy and return")
    copy.set_defaults(func=cmd_copy)

    status = client("status", "show the migration's phase and progress", "Show the migration's "
                    "phase, copy progress, requests in flight and per-side errors and latencies.")
    status.add_argument("--json", action="store_true", help="the full status as JSON")
    status.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    status.set_defaults(func=cmd_status)

    pivot = client("pivot", "Step 5: switch the disk to the destination chain",
                   "Verify that the destination base matches the source base, then switch reads "
                   "and writes to the destination chain without disconnecting clients.")
    pivot.add_argument("--force", action="store_true", help="switch without verifying the base")
    pivot.set_defaults(func=cmd_pivot)

    hand_back = client("hand-back", "after pivot or cancel: give the disk back to its export",
                       "Give the disk back to the `mirrorfs export` it was taken over from, on the "
                       "chain that now holds it (the destination after pivot, the source after "
                       "cancel); the migration then exits. Clients reconnect to the export.")
    hand_back.set_defaults(func=cmd_hand_back)

    export_ = sub.add_parser(
        "export", help="serve a disk for its life, between migrations",
        description="Serve DISK over NBD with a plain qemu-storage-daemon on --socket, and keep that "
                    "socket for the disk's life: `mirrorfs start --take-over` borrows it for a "
                    "migration, and `mirrorfs hand-back` returns the disk. Runs until SIGINT/SIGTERM.")
    export_.add_argument("disk", metavar="DISK", help="the image (raw or qcow2) at the top of the chain")
    export_.add_argument("--socket", required=True, metavar="PATH",
                         help="the disk's unix socket (mode 0600, or 0660 with --group)")
    export_.add_argument("--control", metavar="PATH",
                         help="control socket (default: the --socket path + .ctl)")
    export_.add_argument("--cache", choices=CACHE_MODES, default="auto",
                         help="the storage daemon's use of the host page cache (as for serve)")
    export_.add_argument("--group", metavar="NAME",
                         help="the sockets are 0660 and owned by this group, not 0600")
    host.run_dir_option(export_)
    export_.set_defaults(func=cmd_export)

    cancel = client("cancel", "stop mirroring; the source stays authoritative",
                    "Stop mirroring, keep serving the source chain, and remove the destination "
                    "overlay (and a base copy mirrorfs made).")
    cancel.set_defaults(func=cmd_cancel)
    host.add_parsers(sub, client)
    return parser


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
                        io_timeout=args.io_timeout, cache=args.cache, access=_access(args), **extra)


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
                          take_over=getattr(controller, "take_over", None)):
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
    if report is None:
        print("stopped", flush=True)
        return 0
    line, status = report
    print(line, file=sys.stderr, flush=True)
    return status


def cmd_serve(args):
    rundir = host.run_dir(args)
    options = _serve_options(args, readonly=args.readonly, copy=args.copy,
                             rate=parse_rate(args.rate) if args.rate else None, region=args.region,
                             hold_copy=True)
    mirror = Mirror(args.source, args.dest, options)
    control_path = args.control or (args.socket + ".ctl" if args.socket else None)
    return _run_controller(mirror, control_path, lambda: mirror.tree.uris, rundir)


def cmd_start(args):
    rundir = host.run_dir(args)
    control_path = _control_path(args)
    migration = Migration(args.source_top, args.dest_dir,
                          _serve_options(args, take_over=args.take_over),
                          overlay_name=args.overlay_name)
    return _run_controller(migration, control_path, lambda: migration.tree.uris, rundir)


def _control(args):
    if not args.control:
        raise UsageError("give --control PATH (or set MIRRORFS_CONTROL)")
    return args.control


def _call(args, cmd, **fields):
    try:
        return jsonlines.call(_control(args), {"cmd": cmd, **fields}, timeout=600)
    except jsonlines.ControlError as e:
        raise Error(str(e)) from None


def cmd_copy(args):
    rate = parse_rate(args.rate) if args.rate else None
    _call(args, "copy", rate=rate)
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
    reply = _call(args, "pivot", force=args.force)
    print(f"switched to the destination; clients held {reply['stall_ms']:.1f} ms", flush=True)
    return 0


def cmd_export(args):
    rundir = host.run_dir(args)
    exported = Export(args.disk, args.socket, cache=args.cache, access=Access(group=args.group))
    return _run_controller(exported, args.control or args.socket + ".ctl", lambda: exported.uris,
                           rundir)


def cmd_hand_back(args):
    reply = _call(args, "hand-back")
    print(f"handed back: the export serves {reply['image']}", flush=True)
    return 0


def cmd_cancel(args):
    _call(args, "cancel")
    print("cancelled; serving the source chain", flush=True)
    return 0


def main(argv=None):
    logging.basicConfig(format="mirrorfs: %(message)s")
    parser = build_parser()
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
