"""The evacuation (switch first, copy after): the destination serves at once and is hydrated from
the source. Read evacuee.py to know what happens to an evacuating write (docs/EVACUATION.md).

    evacuee.py         what happens to each request while evacuating
    hydration.py       the crash-safe hydration map, with a group commit
    hydrator.py        the background hydration
    copyonread.py      copy-on-read: a client's read of a region not hydrated hydrates it

Never imports from the mirror room (tests/unit/test_layers.py).
"""
