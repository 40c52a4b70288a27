"""The host's view of all its mirrorfs processes:

    rundir.py      the run directory where each process and each copy registers (stale ones ignored)
    budget.py      the bandwidth budget the copies share, max-min fair, and the concurrent-copy limit
    view.py        what `mirrorfs list` and `top` show
    metrics.py     the metrics a Prometheus server scrapes (`mirrorfs metrics`)

No daemon holds this view: every process writes its own entries into the run directory and reads the
others', so any of them may start, stop or crash without the rest noticing more than a missing file.

Named disks (issue #26) add the one long-lived process of the host, and the one durable record:

    registry.py    one record per named disk: the chain it is now, its loan, its retired images
    service.py     `mirrorfs host`: every named disk served by its own storage daemon; lending
    requests.py    its control socket's commands; named.py: one disk as the service holds it
    daemons.py     a named disk's detached storage daemon, and its adoption by the next service
    hostctl.py     the service's client: add, remove, borrow, give back
    grouprecord.py a group migration's commit record, read by the group and by the take-back
"""
