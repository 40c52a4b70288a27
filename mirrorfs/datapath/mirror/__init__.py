"""The mirror (copy first, then switch): both sides written, the source read until the switch.
Read disk.py to know what happens to a mirrored write.

    disk.py            what happens to each request while mirroring, and the switch
    dirtymap.py        what may differ between the sides, and the write-intent rule
    copier.py          copies what may differ (full mode's first pass, regions to copy again)
    lag.py             a bounded lag: the destination's changes behind the client's (--lag)
    compare.py         the sides compared under range locks (serve --copy none's pivot)

Never imports from the evacuation room (tests/unit/test_layers.py).
"""
