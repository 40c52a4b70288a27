"""The `mirrorfs` command line, built from shared option groups.

Each option is spelled here once, in the group it belongs to, and the subcommands that take it add
the group: `serve` and `start` share where they serve, how they mirror, how they use storage and who
may connect. Parsing only turns text into values (a number, a size); what a value may be is checked
once, by the object it becomes part of (control.options.ServeOptions, with the data path's allowed
values from datapath.options; what a migration or a group may not take, control.migration.Migration
and control.group.Group; daemons.storage.check_cache), so the CLI and the Python API refuse the
same things with the same words.
"""

import argparse
import os

from mirrorfs import __version__
from mirrorfs.common.sizes import parse_rate, parse_size
from mirrorfs.control.options import DEFAULT_THREADS
from mirrorfs.datapath.options import COPY_MODES, DEFAULT_IO_TIMEOUT, POLICIES
from mirrorfs.daemons.storage import CACHE_MODES
from mirrorfs.errors import UsageError
from mirrorfs.system.access import OPTION, TLS_MODES, Access


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message):
        raise UsageError(message)


def size(option):
    """An argparse type: '50M' → bytes, with the option named in the error (common.sizes)."""
    def parse(text):
        try:
            return parse_size(text)
        except ValueError as e:
            raise UsageError(f"{option} {e}") from None
    return parse


def rate(option, unlimited=False):
    """An argparse type: '100M' → bytes/s; a number without a unit is refused, and so is anything
    below 1 byte/s; with `unlimited`, 'none' or 'unlimited' → None (common.sizes)."""
    def parse(text):
        try:
            return parse_rate(text, unlimited=unlimited)
        except ValueError as e:
            raise UsageError(f"{option} {e}") from None
    return parse


def lag_size(text):
    """--lag's argparse type: 0 (no lag), or a size with its unit ('64M'). A number without a
    unit is refused rather than read as bytes: '--lag 64' is far likelier to mean 64M than 64
    bytes, and a lag of a few bytes makes every write synchronous without saying so."""
    text = text.strip()
    if text == "0":
        return 0
    if not text[-1:].isalpha():
        raise UsageError(f"--lag {text!r}: give a unit, like 64M or 1G (0: no lag)")
    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(f"--lag {e}") from None


def integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None


def _one_of(values):
    return "{" + ",".join(values) + "}"


# The option groups.

def serving(p, control_help="control socket (default: the --socket path + .ctl)"):
    """Where the disk is served, and its control socket."""
    p.add_argument("--socket", metavar="PATH", help="serve on this unix socket (mode 0600)")
    p.add_argument("--listen", metavar="HOST:PORT", help="serve on this TCP address")
    p.add_argument("--control", metavar="PATH", help=control_help)
    p.add_argument("--threads", type=integer, default=DEFAULT_THREADS,
                   help=f"nbdkit worker threads per connection (default {DEFAULT_THREADS})")


def mirroring(p, state_help):
    """How the mirror keeps its state and meets a failing destination."""
    p.add_argument("--state-dir", metavar="DIR", help=state_help)
    p.add_argument("--switch-first", action="store_true",
                   help="evacuate now: the destination takes every write from the start, the "
                        "source is opened read-only and copied in the background (hydration); "
                        "needs --state-dir (docs/EVACUATION.md)")
    p.add_argument("--copy-on-read", action="store_true",
                   help="with --switch-first: a client's read of a region not hydrated yet "
                        "hydrates that region too, so what the clients use leaves the source first")
    p.add_argument("--lag", metavar="SIZE", type=lag_size, default=0,
                   help="let the destination fall up to SIZE behind (e.g. 64M): a write is "
                        "acknowledged once the source has it and its region is in the dirty map; "
                        "at SIZE, writes wait for the destination; pivot drains it. Needs "
                        "--state-dir (default 0: every write waits for both sides)")
    p.add_argument("--on-dest-error", metavar=_one_of(POLICIES),
                   help="a destination failure fails the client's request (fail), or is recorded "
                        "and copied again later (degrade; the default with --state-dir)")


def copying(p):
    """What `serve` copies in the background, and how fast."""
    p.add_argument("--copy", metavar=_one_of(COPY_MODES), default="none",
                   help="none: DEST already equals SOURCE (default); full: copy all of SOURCE to "
                        "DEST in the background while mirroring writes")
    p.add_argument("--rate", metavar="BYTES/S", type=rate("--rate"),
                   help="limit the background copy, e.g. 100M (binary units: K, M, G = KiB/s, MiB/s, "
                        "GiB/s; a unit is required)")
    p.add_argument("--region", metavar="BYTES", type=size("--region"),
                   help="the dirty map's region size: a power of two from 1M (default 64M)")


def storage(p, io_timeout=True):
    """How the storage daemons use the host and how long a side may take to answer."""
    if io_timeout:
        p.add_argument("--io-timeout", metavar="SECONDS", type=float,
                       help=f"cut a side's connection when a request waits longer (default "
                            f"{DEFAULT_IO_TIMEOUT:g}; 0: never); the request then fails on that side")
    p.add_argument("--cache", metavar=_one_of(CACHE_MODES), default="auto",
                   help="how the storage daemons use the host's page cache for image files: none "
                        "(O_DIRECT), writeback, or auto: none where the file system allows it "
                        "(default)")
    if io_timeout:      # serve and start: a disk with two sides
        p.add_argument("--one-daemon", action="store_true",
                       help="serve both image sides from one qemu-storage-daemon: less CPU per "
                            "write, but the sides share that process's failures (not with "
                            "--switch-first)")


def access(p):
    """Who can connect."""
    g = p.add_argument_group("who can connect")
    g.add_argument("--tls", metavar=_one_of(TLS_MODES),
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
    group(g)


def group(p, what="unix sockets (disk and control)"):
    """The sockets' group (system.access.OPTION; `--group` is its older spelling)."""
    p.add_argument(OPTION, "--group", dest="group", metavar="GROUP",
                   help=f"{what} are 0660 and owned by this group, not 0600 (a hypervisor's, "
                        "e.g. libvirt-qemu's, so that its QEMU can connect)")


def access_of(args):
    """The Access object of a subcommand that took the `access` group."""
    return Access(tls=args.tls, certificates=args.tls_certificates, psk=args.tls_psk,
                  group=args.group, insecure=args.insecure,
                  verify_peer=not args.tls_no_verify_peer)


def hosting(p):
    """The host's run directory, where every mirrorfs process registers (mirrorfs.host)."""
    p.add_argument("--run-dir", metavar="DIR",
                   help="the host's run directory, where every mirrorfs process registers "
                        "(default: $MIRRORFS_RUN_DIR, /run/mirrorfs for root, else "
                        "$XDG_RUNTIME_DIR/mirrorfs)")


def controlling(p, target=True):
    """A client subcommand: the control socket it talks to, or the named disk whose migration."""
    if target:
        p.add_argument("target", metavar="NAME", nargs="?",
                       help="a named disk: the migration it is lent to (or a control socket's path)")
    p.add_argument("--control", "-c", metavar="PATH", default=os.environ.get("MIRRORFS_CONTROL"),
                   help="the migration's control socket (default: $MIRRORFS_CONTROL)")
    naming(p)


def naming(p):
    """Where the named disks' records are (mirrorfs.host.registry)."""
    p.add_argument("--registry", metavar="DIR",
                   help="the named disks' records (default: $MIRRORFS_REGISTRY, /var/lib/mirrorfs/"
                        "disks for root, else ~/.local/state/mirrorfs/disks)")


# The subcommands: (name, help, description, groups and own options). `commands` maps each name to
# the function that runs it (cli.main).

def _serve(p):
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("dest", metavar="DEST", nargs="?")
    serving(p)
    p.add_argument("--readonly", action="store_true", help="serve SOURCE read-only, no mirror")
    copying(p)
    mirroring(p, "keep the mirror's state here, so a restart resumes after a crash")
    storage(p)
    access(p)
    hosting(p)
    naming(p)


def _start(p):
    p.add_argument("source_top", metavar="NAME|SOURCE_TOP", nargs="?",
                   help="a named disk (borrowed from the host service, `mirrorfs host`), or the top "
                        "of the disk's chain now, read-only from here on (with --take-over: what "
                        "the export serves)")
    p.add_argument("members", metavar="NAME", nargs="*",
                   help="more named disks: all are moved as one group (one switch, one cancel; "
                        "needs --state-dir)")
    p.add_argument("--take-over", metavar="EXPORT_CONTROL",
                   help="take the disk over from a running `mirrorfs export` (its control socket): "
                        "its clients reconnect to this migration on the same socket")
    p.add_argument("--dest-dir", required=True, metavar="DIR",
                   help="where the disk moves to; with --switch-first also a Ceph pool, "
                        "rbd:POOL[:conf=FILE][:id=USER] (the image takes the source's name)")
    p.add_argument("--overlay-name", metavar="NAME",
                   help="file name of the new overlays (default: <SOURCE_TOP stem>-snap.qcow2)")
    p.add_argument("--rate", metavar="BYTES/S", type=rate("--rate"),
                   help="with --switch-first: limit the hydration, e.g. 100M (a migration's base "
                        "copy takes `mirrorfs copy --rate`)")
    serving(p)
    mirroring(p, "keep the migration's state here; start again with it to resume")
    storage(p)
    access(p)
    hosting(p)
    naming(p)


def _export(p):
    p.add_argument("disk", metavar="DISK", help="the image (raw or qcow2) at the top of the chain")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="the disk's unix socket (mode 0600, or 0660 with --socket-group)")
    p.add_argument("--control", metavar="PATH",
                   help="control socket (default: the --socket path + .ctl)")
    storage(p, io_timeout=False)
    group(p)
    hosting(p)
    naming(p)


def _copy(p):
    controlling(p)
    p.add_argument("--rate", metavar="BYTES/S", type=rate("--rate"),
                   help="limit the copy, e.g. 100M or 1G (binary units: MiB/s, GiB/s; a unit is "
                        "required)")
    p.add_argument("--json", action="store_true", help="progress as JSON lines")
    p.add_argument("--background", action="store_true", help="start the copy and return")


def _status(p):
    controlling(p)
    p.add_argument("--json", action="store_true", help="the full status as JSON")
    p.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")


def _pivot(p):
    controlling(p)
    p.add_argument("--force", action="store_true", help="switch without verifying the base")
    p.add_argument("--commit", action="store_true",
                   help="a named disk or a group: commit at once, no safety net (see mirrorfs "
                        "commit); a migration of an image path always does")


def _list(p, watch=True):
    hosting(p)
    p.add_argument("--json", action="store_true", help="one JSON document (a list of disks)")
    if watch:
        p.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    else:
        p.set_defaults(watch=True)


def _budget(p):
    hosting(p)
    p.add_argument("action", nargs="?", choices=("show", "set", "clear"), default="show")
    p.add_argument("rate", nargs="?", metavar="BYTES/S",
                   help="with set: the host's rate for all copies together, e.g. 400M "
                        "('none': no limit)")
    p.add_argument("--max-copies", metavar="N",
                   help="copies that run at once; the others are queued in order ('none': any)")
    p.add_argument("--floor", metavar="BYTES/S",
                   help="while the copied disks' clients write more than --busy-writes, the copies "
                        "together get only this (DRBD's c-min-rate)")
    p.add_argument("--busy-writes", metavar="BYTES/S", help="see --floor (default 64M)")
    p.add_argument("--json", action="store_true")


def _rate(p):
    controlling(p)
    p.add_argument("rate", metavar="BYTES/S", help="e.g. 4M, or 'none'")


def _metrics(p):
    hosting(p)
    p.add_argument("--listen", required=True, metavar="HOST:PORT|PATH",
                   help="a TCP address (e.g. 127.0.0.1:9638) or a unix socket path")


def registry(p):
    """The registry of named disks (mirrorfs.host.registry)."""
    p.add_argument("--registry", metavar="DIR",
                   help="the named disks' records (default: $MIRRORFS_REGISTRY, /var/lib/mirrorfs/disks "
                        "for root, else $XDG_STATE_HOME/mirrorfs/disks)")


def seconds(text):
    """The text of --take-back-after as a number; its rule is the host service's (HostOptions)."""
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--take-back-after {text!r}: expected a number of seconds") from None


def _host(p):
    registry(p)
    hosting(p)
    p.add_argument("--cache", default="auto", metavar=_one_of(CACHE_MODES),
                   help="how the disks' storage daemons use the host page cache (default: auto)")
    group(p, "every named disk's socket (bound by the service, kept through every loan)")
    p.add_argument("--take-back-after", type=seconds, default=10.0, metavar="SECONDS",
                   help="serve a disk again this long after the migration that borrowed it died "
                        "without being resumed (default: 10)")


def _add(p):
    p.add_argument("name", metavar="NAME", help="the disk's name: letters, digits, '.', '_', '-'")
    p.add_argument("image", metavar="IMAGE", help="the top of the disk's chain (raw or qcow2)")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="the disk's unix socket (mode 0600, or 0660 with the host service's "
                        "--socket-group)")
    hosting(p)


def _remove(p):
    p.add_argument("name", metavar="NAME")
    hosting(p)


_LIST = ("List every disk a mirrorfs process serves on this host (export, serve, start), from the run "
         "directory: its socket, kind, phase, bytes copied of bytes to copy, rate and share of the host "
         "budget, time left, errors per side, and who holds it.")

SUBCOMMANDS = (
    ("serve", _serve, "serve SOURCE, mirroring every change to DEST",
     "Serve one disk over NBD: reads come from SOURCE; writes, zeroes and trims go to SOURCE and DEST "
     "and complete when both have them. SOURCE and DEST are image files (raw or qcow2, backing chains "
     "followed), RBD images (rbd:POOL/IMAGE[:conf=FILE][:id=USER]) or NBD URIs. Runs until "
     "SIGINT/SIGTERM."),
    ("start", _start, "Step 3: snapshot SOURCE_TOP on both sides and serve it, mirrored",
     "Create the source overlay on SOURCE_TOP and the destination overlay in DEST_DIR, and serve one "
     "disk: reads from the source chain, writes to both overlays. Then copy the base (mirrorfs copy, "
     "or cp), and switch (mirrorfs pivot) or cancel. Runs until SIGINT/SIGTERM."),
    ("copy", _copy, "Step 4: copy the source base to the destination",
     "Copy the read-only base below the overlays to the destination, showing progress until it is "
     "done. The copy is mirrorfs's own, over NBD: a read-only qemu-storage-daemon of the base's "
     "chain to one of the new file (written as .partial, renamed when complete), data extents only "
     "(sparse), paced by --rate and the host budget; the destination has the source base's format. "
     "Rates are bytes per second with a binary unit (K, M, G = KiB/s, MiB/s, GiB/s)."),
    ("status", _status, "show the migration's phase and progress",
     "Show the migration's phase, copy progress, requests in flight and per-side errors and "
     "latencies."),
    ("pivot", _pivot, "Step 5: switch the disk to the destination chain",
     "Verify that the destination base matches the source base, then switch reads and writes to the "
     "destination chain without disconnecting clients. A named disk or a group keeps a safety net "
     "(reads from the destination, writes to both sides) until commit or revert; --commit ends it "
     "at once."),
    ("hand-back", controlling, "after pivot or cancel: give the disk back to its export",
     "Give the disk back to the `mirrorfs export` it was taken over from, on the chain that now holds "
     "it (the destination after pivot, the source after cancel); the migration then exits. Clients "
     "reconnect to the export."),
    ("export", _export, "serve a disk for its life, between migrations",
     "Serve DISK over NBD with a plain qemu-storage-daemon on --socket, and keep that socket for the "
     "disk's life: `mirrorfs start --take-over` borrows it for a migration, and `mirrorfs hand-back` "
     "returns the disk. Runs until SIGINT/SIGTERM."),
    ("revert", controlling, "after a named disk's or a group's pivot: back on the source",
     "Undo the pivot of a named disk or a group while its safety net is up: every member reads "
     "from its source again, at one instant, with nothing to copy (every change since the pivot "
     "reached both sides). It mirrors again: pivot again later, or cancel. A migration of an image "
     "path has no net (its pivot is final)."),
    ("commit", controlling, "after a named disk's or a group's pivot: end the safety net",
     "End the safety net of a named disk or a group: every member serves its destination alone. "
     "The members hold at one instant, so the retired sources form a crash-consistent image of "
     "the disk or the whole group at the commit; they are kept (retired in the disks' records) "
     "until the operator removes them."),
    ("cancel", controlling, "stop mirroring; the source stays authoritative",
     "Stop mirroring, keep serving the source chain, and remove the destination overlay (and a base "
     "copy mirrorfs made)."),
    # The host: every disk of it, one budget, metrics (mirrorfs.host).
    ("list", _list, "one line per disk of the host: phase, copy, rate, errors", _LIST),
    ("top", lambda p: _list(p, watch=False), "mirrorfs list --watch", _LIST),
    ("budget", _budget, "show or set the host's bandwidth budget for copies",
     "One budget for every copy on the host (base copies, full copies, resyncs), shared max-min fair "
     "between the copies running, re-divided within a second when one starts or ends. Kept in the run "
     "directory: it outlives every process."),
    ("rate", _rate, "change one disk's own copy rate, a cap under the host budget",
     "Change the rate limit of this disk's copy (its own --rate) while it runs; the host budget, if "
     "any, still divides the host's rate among the copies."),
    ("metrics", _metrics, "serve every disk's metrics for Prometheus",
     "Serve the Prometheus text format at /metrics for every disk registered in the run directory. "
     "Runs until SIGINT/SIGTERM."),
    # Named disks and the host service (mirrorfs.host.registry, mirrorfs.host.service).
    ("host", _host, "the host service: serve every named disk, lend them to migrations",
     "Serve every disk of the registry, each by its own qemu-storage-daemon on the chain its record "
     "names, until SIGINT/SIGTERM; the disks stay served after the service stops (the next one "
     "adopts them). `mirrorfs shutdown` stops the disks too. For systemd: Type=notify, "
     "KillMode=process."),
    ("add", _add, "register a named disk and serve it",
     "Record the disk NAME (IMAGE's chain, every layer's format detected) and serve it on --socket "
     "through the host service. Refused if IMAGE or any layer below it belongs to another disk."),
    ("remove", _remove, "stop serving a named disk and forget it",
     "Stop the disk's daemon (flushed) and remove its record; its images are left alone. Refused "
     "while the disk is lent to a migration."),
    ("shutdown", hosting, "stop every named disk, then the host service",
     "Stop every named disk's daemon (flushed, closed) and the host service. A disk lent to a "
     "migration stays with it."),
)


def build_parser(commands):
    """The parser; `commands` maps each subcommand's name to the function that runs it."""
    parser = Parser(prog="mirrorfs", description="Move a running VM's disk to new storage, served over NBD.")
    parser.add_argument("--version", action="version", version=f"mirrorfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, add_options, help_, description in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_, description=description)
        add_options(p)
        p.set_defaults(func=commands[name])
    return parser
