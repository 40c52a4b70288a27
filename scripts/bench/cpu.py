"""Where the CPU goes (--cpu): what each process of a target spends per request."""

import threading
import time

import psutil


# Where the CPU goes (--cpu): what each process of a target spends per request. On two cores every
# process competes with fio and the others, so a job is bound by their sum, not by one of them.

CPU = "cpu_us:"             # a row's keys: CPU + role -> microseconds of CPU per request


def cpu_seconds(processes):
    """{role: user + system CPU seconds so far} of {role: pid}; a process gone is left out."""
    found = {}
    for role, pid in processes.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        found[role] = t.user + t.system
    return found


class CpuMeter:
    """The CPU rate of each process between `after` seconds from now (the end of fio's ramp) and
    `rates()`."""

    def __init__(self, processes, after):
        self._processes = processes
        self._start = None
        self._timer = threading.Timer(after, self._begin)
        if processes:
            self._timer.start()

    def _begin(self):
        self._start = (cpu_seconds(self._processes), time.monotonic())

    def rates(self):
        self._timer.cancel()
        if self._start is None:
            return {}
        before, started = self._start
        elapsed = time.monotonic() - started
        return {role: (cpu - before.get(role, 0.0)) / elapsed
                for role, cpu in cpu_seconds(self._processes).items()}


def cpu_parts(row):
    """{role: CPU microseconds per request} of one row, largest first."""
    parts = {k[len(CPU):]: v for k, v in row.items() if k.startswith(CPU)}
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))
