"""Polling for the tests that wait on a cluster to change (replicas, workers, versions)."""

import time


def wait_until(cond, timeout: float, what: str, every: float = 0.25) -> float:
    """Poll `cond` until it is true; fail naming `what` after `timeout` s; return the seconds."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what} within {timeout} s"
        time.sleep(every)
    return time.monotonic() - t0
