"""The nbdkit process: what nbdkit loads, and the data path assembled from its parameters.

    script.py          the file nbdkit's python plugin loads (part of the installed package)
    callbacks.py       nbdkit's callbacks, mapped onto the served disk's contract (datapath.served)
    service.py         the data path assembled from its parameters (a mirror or an evacuation),
                       then driven through the two contracts alone; its control socket
    threadstate.py     one Python thread state per nbdkit worker thread (speed)
    lifeline.py        nbdkit is killed with its supervisor, before a storage daemon stops
"""
