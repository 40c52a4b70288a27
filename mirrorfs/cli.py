"""The `mirrorfs` command: a thin layer over the package. Every `Error` becomes one line on stderr and
a non-zero exit; tracebacks only with --debug."""

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from mirrorfs import __version__, control, display, sockets
from mirrorfs.datapath import jsonlines
from mirrorfs.access import TLS_MODES, Access
from mirrorfs.basecopy import parse_rate
from mirrorfs.errors import Error, UsageError
from mirrorfs.migration import Migration
from mirrorfs.tree import MirrorServer
from mirrorfs.storage import CACHE_MODES

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
                   help="X.509: DIR holds ca-cert.pem, server-cert.pem and server-key.pem")
    g.add_argument("--tls-psk", metavar="FILE", help="pre-shared keys, USERNAME:HEXKEY lines "
                   "(psktool -u NAME -p FILE)")
    g.add_argument("--insecure", action="store_true",
                   help="allow --listen on an address other machines can reach without --tls require")
    g.add_argument("--group", metavar="NAME",
                   help="unix sockets (disk and control) are 0660 and owned by this group, not 0600")


def _access(args):
    return Access(tls=args.tls, certificates=args.tls_certificates, psk=args.tls_psk,
                  group=args.group, insecure=args.insecure)


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
    serve.add_argument("--copy", choices=("none", "full"), default="none",
                       help="none: DEST already equals SOURCE (default); full: copy all of SOURCE "
                            "to DEST in the background while mirroring writes")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="keep the mirror's state here, so a restart resumes after a crash")
    serve.add_argument("--on-dest-error", choices=("fail", "degrade"),
                       help="a destination failure fails the client's request (fail), or is "
                            "recorded and copied again later (degrade; the default with --state-dir)")
    serve.add_argument("--rate", metavar="BYTES/S", help="limit the background copy, e.g. 100M")
    serve.add_argument("--region", metavar="BYTES", type=lambda t: parse_rate(t, "--region"),
                       help="the dirty map's region size: a power of two from 1M (default 64M)")
    serve.add_argument("--control", metavar="PATH",
                       help="control socket (default: the --socket path + .ctl)")
    _storage_options(serve)
    _access_options(serve)
    serve.set_defaults(func=cmd_serve)

    start = sub.add_parser(
        "start", help="Step 3: snapshot SOURCE_TOP on both sides and serve it, mirrored",
        description="Create the source overlay on SOURCE_TOP and the destination overlay in DEST_DIR, "
                    "and serve one disk: reads from the source chain, writes to both overlays. Then "
                    "copy the base (mirrorfs copy, or cp), and switch (mirrorfs pivot) or cancel. "
                    "Runs until SIGINT/SIGTERM.")
    start.add_argument("source_top", metavar="SOURCE_TOP",
                       help="the top of the disk's chain now; read-only from here on")
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
    start.add_argument("--on-dest-error", choices=("fail", "degrade"),
                       help="as for serve (default: degrade with --state-dir, else fail)")
    _storage_options(start)
    _access_options(start)
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

    cancel = client("cancel", "stop mirroring; the source stays authoritative",
                    "Stop mirroring, keep serving the source chain, and remove the destination "
                    "overlay (and a base copy mirrorfs made).")
    cancel.set_defaults(func=cmd_cancel)
    return parser


def _stop_on_signals():
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return stop


def cmd_serve(args):
    stop = _stop_on_signals()
    access = _access(args)
    server = MirrorServer(args.source, args.dest, socket=args.socket, listen=args.listen,
                          readonly=args.readonly, threads=args.threads, copy=args.copy,
                          state_dir=args.state_dir, policy=args.on_dest_error,
                          rate=parse_rate(args.rate) if args.rate else None, region=args.region,
                          access=access, io_timeout=args.io_timeout, cache=args.cache)
    control_path = args.control or (args.socket + ".ctl" if args.socket else None)
    access.check(server.listen)             # before the control socket exists
    ctl = control.serve(control_path, server) if control_path else None
    try:
        if ctl is not None:
            access.share(control_path)
        with server:
            for uri in server.uris:
                print(f"serving {uri}", flush=True)
            if control_path:
                print(f"control {control_path}", flush=True)
            server.wait(stop)
    finally:
        if ctl is not None:
            ctl.stop()
            Path(control_path).unlink(missing_ok=True)
    print("stopped", flush=True)
    return 0


def cmd_start(args):
    stop = _stop_on_signals()
    control_path = args.control or (args.socket + ".ctl" if args.socket else None)
    if control_path is None:
        raise UsageError("give --control PATH (there is no --socket to put it next to)")
    access = _access(args)
    access.check(sockets.parse_listen(args.listen) if args.listen else None)
    migration = Migration(args.source_top, args.dest_dir, socket=args.socket, listen=args.listen,
                          overlay_name=args.overlay_name, threads=args.threads,
                          state_dir=args.state_dir, policy=args.on_dest_error, access=access,
                          io_timeout=args.io_timeout, cache=args.cache)
    ctl = control.serve(control_path, migration)
    try:
        access.share(control_path)
        migration.start()
        for uri in migration.server.uris:
            print(f"serving {uri}", flush=True)
        print(f"control {control_path}", flush=True)
        migration.wait(stop)
    finally:
        migration.stop()
        ctl.stop()
        Path(control_path).unlink(missing_ok=True)
    print("stopped", flush=True)
    return 0


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
            print(display.progress_bar(copy["bytes_copied"] / max(copy["bytes_total"], 1),
                                       display.copy_line(copy)), end="", flush=True)
        if not copy.get("running"):
            break
        time.sleep(0.5)
    if tty:
        print()
    if copy.get("error"):
        raise Error(f"base copy failed: {copy['error']}")
    if not args.json:
        print(f"base copied: {display.copy_line(copy)} in {copy['seconds']:.1f}s", flush=True)
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
