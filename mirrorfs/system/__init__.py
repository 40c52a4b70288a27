"""The host as mirrorfs uses it: children it owns, sockets it binds, who may connect, systemd.

    children.py    child processes: started, watched until ready, always stopped (PDEATHSIG)
    sockets.py     listening sockets bound by us and handed to children by fd
    access.py      who can reach a served disk: TLS, export name, socket group
    notify.py      systemd's readiness protocol (sd_notify)
    pidfd.py       process fds: watching processes we did not start, taking a socket back from one
"""
