"""The `mirrorfs` command: a thin layer over the package. Every `Error` becomes one line on stderr and
a non-zero exit; tracebacks only with --debug."""

import argparse
import signal
import sys
import threading

from mirrorfs import __version__
from mirrorfs.errors import Error, UsageError
from mirrorfs.server import MirrorServer

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
                    "(raw or qcow2, backing chains followed) or NBD URIs. Runs until SIGINT/SIGTERM.")
    serve.add_argument("source", metavar="SOURCE")
    serve.add_argument("dest", metavar="DEST", nargs="?")
    serve.add_argument("--socket", metavar="PATH", help="serve on this unix socket (mode 0600)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="serve on this TCP address")
    serve.add_argument("--readonly", action="store_true", help="serve SOURCE read-only, no mirror")
    serve.add_argument("--threads", type=_positive_int, default=16,
                       help="nbdkit worker threads per connection (default 16)")
    serve.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args):
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    server = MirrorServer(args.source, args.dest, socket=args.socket, listen=args.listen,
                          readonly=args.readonly, threads=args.threads)
    with server:
        for uri in server.uris:
            print(f"serving {uri}", flush=True)
        server.wait(stop)
    print("stopped", flush=True)
    return 0


def main(argv=None):
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
