"""A migration's state file (mirrorfs.datapath.state) for the tests that drive the data path in
their own process: a fresh state in a directory, and what that directory's state.json says now."""

import json

MiB = 1 << 20


def new_state(directory, copy="full", size=16 * MiB, region=MiB):
    """A new state (never a resumed one) for a `size`-byte disk of `region`-byte regions."""
    from mirrorfs.datapath.statedir import open_for
    state, resumed = open_for(directory, copy=copy, source={"uri": "s", "size": size},
                              dest={"uri": "d", "size": size}, size=size, region_size=region)
    assert not resumed
    return state


def saved(directory):
    """state.json as written last, read from the file (not from the State object)."""
    return json.loads((directory / "state.json").read_text())
