"""Stop signals for the long-running commands, caught from the first instant.

``watch`` loads a model and opens a ledger before its pipeline runs; a
SIGTERM in that second must not kill it with Python's default action, and a
SIGHUP (a closed terminal, or ``systemctl reload``) must not kill it without
draining. So the console script calls :func:`install` before it imports the
CLI, and the watcher later :func:`claim` s what was caught:

- SIGTERM, SIGINT: stop; the parts in hand are finished; exit 0.
- SIGHUP: ``serve`` reloads its configuration and models; ``watch`` has
  no configuration to reload, so for it SIGHUP is a drained stop, logged
  as such.

Any other command :func:`release` s the signals at its start: the default
actions come back, and a signal caught meanwhile is delivered again.

    >>> signals.install()                 # first thing in the process
    >>> signals.claim(watcher.stop)       # calls it at once if a signal came already
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: The signals that stop a watcher.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_lock = threading.Lock()
_caught: list[int] = []
_callback: Callable[[], None] | None = None
_on_hup: Callable[[], None] | None = None
_previous: dict[int, object] = {}


def _handler(signum, frame) -> None:
    callback = _callback
    if callback is None:
        _caught.append(signum)  # for the watcher to claim, or to be delivered again on release
        return
    if signum == signal.SIGHUP and _on_hup is not None:
        _on_hup()
        return
    _announce(signum)
    callback()


def _announce(signum: int) -> None:
    if signum == signal.SIGHUP:
        log.info("SIGHUP: a watcher has no configuration to reload; finishing the parts in hand and stopping "
                 "(exit 0).")
    else:
        log.info("%s: finishing the parts in hand and stopping.", signal.Signals(signum).name)


def installed() -> bool:
    """Whether :func:`install` ran and the handlers are in place."""
    return bool(_previous)


def install() -> None:
    """Catch the stop signals from now on (main thread only; a no-op elsewhere or when already installed)."""
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        _previous[signum] = signal.signal(signum, _handler)


def claim(callback: Callable[[], None], on_hup: Callable[[], None] | None = None) -> bool:
    """Route the stop signals to ``callback`` (SIGHUP to ``on_hup`` when given); act at once on those caught already.

    Returns:
        True when a stop signal had been caught already (``callback`` was called).
    """
    global _callback, _on_hup
    with _lock:
        _callback, _on_hup = callback, on_hup
        caught, _caught[:] = list(_caught), []
    stops = [signum for signum in caught if not (signum == signal.SIGHUP and on_hup is not None)]
    if len(stops) < len(caught):
        on_hup()
    if stops:
        _announce(stops[0])
        callback()
    return bool(stops)


def requested() -> bool:
    """Whether a stop signal was caught since :func:`install` and not yet claimed."""
    return bool(_caught)


def release() -> None:
    """Give the signals their previous handlers back, and deliver again the ones caught and never claimed."""
    global _callback, _on_hup
    if threading.current_thread() is not threading.main_thread():
        return
    _callback = _on_hup = None
    for signum, previous in _previous.items():
        signal.signal(signum, previous)
    _previous.clear()
    caught, _caught[:] = list(_caught), []
    for signum in dict.fromkeys(caught):
        os.kill(os.getpid(), signum)
