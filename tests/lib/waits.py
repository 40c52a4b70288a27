"""Waiting for a condition, never for a time."""

import time


def wait_until(check, what, timeout=120, interval=0.05):
    """Call `check` until it returns something true, and return that. Tests wait for the state
    they need (a phase, bytes copied), never for a time: the deadline is generous and only turns a
    hang into a failure, so a slow or busy machine makes a test slower, not wrong. `what` names the
    condition in the failure ("never <what>")."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} (waited {timeout}s; last: {found!r})")
        time.sleep(interval)
