"""The host budget's division (mirrorfs.host.budget.shares), case by case: water-filling, caps,
the concurrent-copy limit and the guest-aware floor; and how one process's Share hands its share
to copies that start held. The processes that apply it are tested in
tests/system/test_host_budget.py."""

import pytest

from mirrorfs.host.budget import Share, save, shares
from mirrorfs.host.rundir import RunDir

M = 1 << 20


def budget(rate=None, max_copies=None, floor=None, busy_writes=None):
    return {"rate": rate, "max_copies": max_copies, "floor": floor, "busy_writes": busy_writes}


def copies(*caps, writes=0):
    return [{"pid": i + 1, "cap": cap, "since": i, "writes": writes} for i, cap in enumerate(caps)]


@pytest.mark.parametrize("b,entries,expected", [
    # Equal parts when no one is capped.
    (budget(32 * M), copies(None, None, None, None), [8 * M] * 4),
    # A cap below the fair share is kept; the rest is divided among the others.
    (budget(32 * M), copies(None, 4 * M, None, None), [28 * M // 3, 4 * M, 28 * M // 3, 28 * M // 3]),
    # Caps above the fair share change nothing.
    (budget(32 * M), copies(100 * M, None), [16 * M, 16 * M]),
    # Everyone capped below the budget: each at its cap (the budget is not handed out beyond caps).
    (budget(32 * M), copies(4 * M, 2 * M), [4 * M, 2 * M]),
    # No budget: caps alone (None: unlimited).
    (budget(), copies(None, 4 * M), [None, 4 * M]),
    # The first max_copies run, the others are queued (0), in registration order.
    (budget(30 * M, max_copies=2), copies(None, None, None), [15 * M, 15 * M, 0]),
    (budget(None, max_copies=1), copies(None, 4 * M), [None, 0]),
    # The floor while the copied disks' clients write heavily; the full budget when they do not.
    (budget(32 * M, floor=4 * M, busy_writes=10 * M), copies(None, None, writes=6 * M), [2 * M] * 2),
    (budget(32 * M, floor=4 * M, busy_writes=10 * M), copies(None, None, writes=1 * M), [16 * M] * 2),
])
def test_shares(b, entries, expected):
    got = shares(b, entries)
    assert [got[e["pid"]] for e in entries] == [x if x is None else pytest.approx(x, abs=1)
                                                for x in expected]


def test_a_copy_that_starts_held_while_the_share_is_being_applied_still_gets_it(tmp_path):
    """A group starts its members' base copies one after another, each held (rate 0) until the
    budget's thread applies the share again (Share.renew). If a member's copy starts while the
    previous apply is still running on that thread, the renew must not be lost with it: CI once
    saw the third member's copy held forever, the share unchanged and marked applied."""
    rundir = RunDir(tmp_path / "run")
    save(rundir, rate=8 * M)
    applied = []

    def apply(rate):
        applied.append(rate)
        if len(applied) == 1:
            share.renew()           # the next member's copy starts, held, during this apply

    share = Share(rundir, "/run/vm.sock", lambda: {"done": 0}, apply)
    share.tick()
    share.tick()                    # the same share: given again, to the copy that started held
    share.tick()                    # nothing new: not given again
    assert applied == [8 * M, 8 * M]
