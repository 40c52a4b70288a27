"""`mirrorfs metrics`: every registered disk of the host in the Prometheus text format.

    mirrorfs metrics --listen 127.0.0.1:9638        # or --listen /run/mirrorfs/metrics.sock
    curl -s http://127.0.0.1:9638/metrics

Names follow node_exporter's habits: a `mirrorfs_` prefix, base units (bytes, seconds), `_total`
for counters, one label set per disk (`disk`: its socket) and per side or operation. What each
scrape returns is computed at that scrape, from what the processes already keep: each disk's
`status` on its control socket (the same call `mirrorfs status` makes; its data path answers from
counters it keeps anyway) and the budget's entries in the run directory. A scrape takes no lock on
any request's path; the only cost to the data path is answering one status request per disk per
scrape (docs/PERFORMANCE.md: "Scraping the host's metrics" has the measurement).

    mirrorfs_disk_info{disk,kind,pid,control}             1 per registered disk
    mirrorfs_disk_phase{disk,phase}                       1 for the current phase, 0 for the others
    mirrorfs_disk_up{disk}                                1 if the process answered its status
    mirrorfs_requests_total{disk,op}                      client requests (and the copier's: op="copy")
    mirrorfs_request_bytes_total{disk,op}                 their bytes
    mirrorfs_requests_in_flight{disk}
    mirrorfs_side_errors_total{disk,side,op}              failed requests per side and operation
    mirrorfs_side_degraded_writes_total{disk,side}        changes acknowledged without that side
    mirrorfs_side_request_duration_seconds{disk,side}     histogram of change latencies per side
    mirrorfs_dirty_bytes{disk}                            bytes that may still differ
    mirrorfs_lag_bytes{disk} / _lag_limit_bytes{disk}     --lag: acknowledged bytes the
                                                          destination lacks, and its bound
    mirrorfs_lag_oldest_seconds{disk}                     the age of the oldest change it lacks
    mirrorfs_lag_mode{disk,mode}                          1 for lagging or synchronous
    mirrorfs_lag_waits_total{disk}                        writes that waited for room (backpressure)
    mirrorfs_copy_bytes_done{disk} / _copy_bytes_to_copy{disk}
    mirrorfs_copy_rate_bytes_per_second{disk}             measured over the last second
    mirrorfs_copy_share_bytes_per_second{disk}            its share of the host budget (0: queued)
    mirrorfs_copy_cap_bytes_per_second{disk}              its own --rate
    mirrorfs_budget_bytes_per_second, mirrorfs_budget_max_copies, mirrorfs_copies{state}

The latency histogram counts the samples the data path takes (each change is timed on the side
that ran it synchronously, alternating between the sides), not every request.
"""

import http.server
import os
import signal
import socket
import socketserver
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mirrorfs.errors import Error, UsageError
from mirrorfs.host import budget as host_budget
from mirrorfs.host import view
from mirrorfs.host.rundir import COPIES

PHASES = ("exporting", "lent", "mirroring", "copying", "queued", "synchronized", "copying-base",
          "switching", "switched", "cancelled", "serving", "handed-back", "stopped")


class Collector:
    """A prometheus_client collector that reads the run directory at each scrape."""

    def __init__(self, rundir):
        self.rundir = rundir

    def describe(self):
        return []                       # computed at collect time: no fixed set to describe

    def collect(self):
        records = view.disks(self.rundir)
        budget = host_budget.load(self.rundir)
        copies = self.rundir.entries(COPIES)
        shares = host_budget.shares(budget, copies)

        def g(name, doc, labels=("disk",)):
            return GaugeMetricFamily(f"mirrorfs_{name}", doc, labels=list(labels))

        def c(name, doc, labels=("disk",)):
            return CounterMetricFamily(f"mirrorfs_{name}", doc, labels=list(labels))

        info = g("disk_info", "A disk a mirrorfs process serves", ("disk", "kind", "pid", "control"))
        up = g("disk_up", "Whether the disk's process answered its status")
        phase = g("disk_phase", "The disk's phase (1 for the current one)", ("disk", "phase"))
        requests = c("requests", "Requests served, by operation (copy: the copier's chunks)",
                     ("disk", "op"))
        rbytes = c("request_bytes", "Bytes of the requests served, by operation", ("disk", "op"))
        inflight = g("requests_in_flight", "Requests in flight")
        errors = c("side_errors", "Failed requests per side and operation", ("disk", "side", "op"))
        degraded = c("side_degraded_writes", "Changes acknowledged without this side",
                     ("disk", "side"))
        latency = HistogramMetricFamily("mirrorfs_side_request_duration_seconds",
                                        "Latency of changes per side (sampled)",
                                        labels=["disk", "side"])
        dirty = g("dirty_bytes", "Bytes that may still differ between the sides")
        done = g("copy_bytes_done", "Bytes the disk's copy has copied")
        total = g("copy_bytes_to_copy", "Bytes the disk's copy has to copy in all")
        rate = g("copy_rate_bytes_per_second", "The copy's rate over the last second")
        share = g("copy_share_bytes_per_second", "The copy's share of the host budget (0: queued)")
        cap = g("copy_cap_bytes_per_second", "The copy's own rate limit")
        lag_bytes = g("lag_bytes", "Acknowledged bytes the destination lacks (--lag)")
        lag_limit = g("lag_limit_bytes", "The bound of the lag (--lag)")
        lag_oldest = g("lag_oldest_seconds", "Age of the oldest change the destination lacks")
        lag_mode = g("lag_mode", "1 for the mode the lag is in", ("disk", "mode"))
        lag_waits = c("lag_waits", "Writes that waited for room in the lag (backpressure)")
        for r in records:
            disk = r["socket"]
            st = r["status"]
            info.add_metric([disk, r["kind"], str(r["pid"]), r["control"] or ""], 1)
            up.add_metric([disk], 0 if "error" in st else 1)
            current = r["phase"]
            for p in PHASES + (() if current in PHASES else (current,)):
                phase.add_metric([disk, p], 1 if p == current else 0)
            dp = st.get("datapath") or {}
            if dp and "error" not in dp:
                for op, n in sorted(dp.get("requests", {}).items()):
                    requests.add_metric([disk, op], n)
                for op, n in sorted(dp.get("request_bytes", {}).items()):
                    rbytes.add_metric([disk, op], n)
                inflight.add_metric([disk], dp.get("in_flight", 0))
                dirty.add_metric([disk], dp.get("dirty_bytes", 0))
                lag = dp.get("lag")
                if lag:
                    lag_bytes.add_metric([disk], lag["bytes"])
                    lag_limit.add_metric([disk], lag["limit"])
                    lag_oldest.add_metric([disk], lag["oldest_age_s"])
                    for mode in ("lagging", "synchronous"):
                        lag_mode.add_metric([disk, mode], 1 if lag["mode"] == mode else 0)
                    lag_waits.add_metric([disk], lag["waits"])
                for side, s in dp.get("sides", {}).items():
                    for op in ("read", "write", "zero", "trim", "flush"):
                        errors.add_metric([disk, side, op], s.get("errors_by_op", {}).get(op, 0))
                    degraded.add_metric([disk, side], s.get("degraded", 0))
                    h = s.get("histogram")
                    if h:
                        buckets, running = [], 0
                        for bound, n in zip(h["bounds"] + ["+Inf"], h["counts"]):
                            running += n
                            buckets.append((str(float(bound)) if bound != "+Inf" else bound,
                                            running))
                        latency.add_metric([disk, side], buckets, h["sum"])
            copy = r.get("copy") or {}
            if copy.get("bytes_total") is not None:
                done.add_metric([disk], copy.get("bytes_done") or 0)
                total.add_metric([disk], copy["bytes_total"])
            if r["pid"] in shares:
                rate.add_metric([disk], copy.get("rate") or 0)
                share.add_metric([disk], shares[r["pid"]] if shares[r["pid"]] is not None
                                 else float("inf"))
            if copy.get("cap"):
                cap.add_metric([disk], copy["cap"])
        yield from (info, up, phase, requests, rbytes, inflight, errors, degraded, latency, dirty,
                    done, total, rate, share, cap, lag_bytes, lag_limit, lag_oldest, lag_mode,
                    lag_waits)
        b = GaugeMetricFamily("mirrorfs_budget_bytes_per_second",
                              "The host budget for all copies together (+Inf: none)")
        b.add_metric([], budget["rate"] or float("inf"))
        yield b
        n = GaugeMetricFamily("mirrorfs_budget_max_copies",
                              "Copies that may run at once (+Inf: any)")
        n.add_metric([], budget["max_copies"] or float("inf"))
        yield n
        state = GaugeMetricFamily("mirrorfs_copies", "Copies on the host, by state",
                                  labels=["state"])
        state.add_metric(["running"], sum(1 for v in shares.values() if v != 0))
        state.add_metric(["queued"], sum(1 for v in shares.values() if v == 0))
        yield state


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        try:
            body = generate_latest(self.server.registry)
        except Exception as e:          # a bug: say so, keep serving
            self.send_error(500, str(e))
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self):
        return str(self.client_address or "unix")

    def log_message(self, *args):
        pass                            # one line per scrape is noise


class _TCP(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True          # TIME_WAIT only: a port in use is still refused


class _Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, "unix"


class MetricsServer:
    def __init__(self, rundir, listen):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(rundir))
        self.path = None
        try:
            if "/" in listen:
                self.path = Path(listen).absolute()
                if self.path.exists() and not self.path.is_socket():
                    raise UsageError(f"--listen {listen}: exists and is not a socket")
                if self.path.is_socket():
                    with socket.socket(socket.AF_UNIX) as probe:
                        if probe.connect_ex(os.fspath(self.path)) == 0:
                            raise UsageError(f"--listen {listen}: another server listens there")
                    self.path.unlink()
                self.server = _Unix(os.fspath(self.path), _Handler)
                self.url = f"unix:{self.path}"
            else:
                host, sep, port = listen.rpartition(":")
                if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                    raise UsageError(f"--listen {listen!r}: expected HOST:PORT or a socket path")
                host = host.strip("[]") or "127.0.0.1"
                _TCP.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self.server = _TCP((host, int(port)), _Handler)
                self.url = f"http://{listen}/metrics"
        except OSError as e:
            raise Error(f"--listen {listen}: {e.strerror or e}") from None
        self.server.registry = registry

    def serve(self, stop=None):
        """Serve until SIGINT/SIGTERM (or `stop`, a threading.Event, is set)."""
        stop = stop or threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *a: stop.set())
        thread = threading.Thread(target=self.server.serve_forever, args=(0.2,), daemon=True,
                                  name="metrics")
        thread.start()
        while not stop.wait(0.5):
            pass
        self.server.shutdown()

    def close(self):
        self.server.server_close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
