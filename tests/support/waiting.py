"""Waiting for what another thread or process does, with a deadline that names what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` every ``interval`` s until it holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def running(box) -> Iterator:
    """An :class:`~edge_inspect.outbox.Outbox` (or anything with start, stop and join), stopped however the block ends."""
    box.start()
    try:
        yield box
    finally:
        box.stop()
        box.join(10)
