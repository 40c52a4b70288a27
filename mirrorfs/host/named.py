"""One named disk as the host service holds it (mirrorfs.host.service): its phase, its socket, its
daemon, its borrower. Every change of one is made under its `lock`."""

import threading

from mirrorfs.system import pidfd as pidfds


class Phase:
    STARTING = "starting"
    EXPORTING = "exporting"
    LENT = "lent"
    TAKING_BACK = "taking-back"
    STRANDED = "stranded"           # a lent evacuation whose borrower died: resume it
    FAILED = "failed"
    STOPPED = "stopped"


class Disk:
    """What the service knows of one named disk; every change under `lock`."""

    def __init__(self, name):
        self.name = name
        self.lock = threading.RLock()
        self.phase = Phase.STARTING
        self.error = None
        self.socket = None
        self.listener = None
        self.daemon = None
        self.borrower = None            # (pid, pidfd) of a live borrower being watched
        self.dead_since = None          # monotonic time the borrower was found dead
        self.restarts = []

    @property
    def inode(self):
        return pidfds.inode(self.listener) if self.listener is not None else None
