"""The host's view of all its mirrorfs processes: the run directory where each registers (rundir), the
bandwidth budget their copies share (budget), and the metrics a Prometheus server scrapes (metrics).

No daemon holds this view: every process writes its own entries into the run directory and reads the
others', so any of them may start, stop or crash without the rest noticing more than a missing file.
"""
