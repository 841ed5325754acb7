"""systemd notifications (sd_notify): readiness, watchdog pings, status, stopping.

A few lines over the AF_UNIX datagram socket systemd names in
``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace), as
``sd_notify(3)`` describes. Outside systemd, ``NOTIFY_SOCKET`` is unset and
every function does nothing; a send that fails is logged at debug level and
never raised, since notifications must not stop inspection.

    >>> from edge_inspect import notify
    >>> notify.ready("watching /srv/edge-inspect/incoming")
    >>> interval = notify.watchdog_interval()   # None when WatchdogSec= is not set
    >>> notify.watchdog()                       # after each loop that really worked
    >>> notify.stopping()
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _send(message: str) -> bool:
    """Send one notification; True when it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # Never block: a listener that stops reading must not stall the line.
            # A full socket buffer raises BlockingIOError, an OSError: not sent.
            sock.send(message.encode("utf-8", "replace"), socket.MSG_DONTWAIT)
    except OSError as exc:
        log.debug("sd_notify %r to %r failed: %s", message, os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start another assignment in the datagram.
    return " ".join(str(text).splitlines())


def ready(status: str | None = None) -> bool:
    """Tell systemd the service is ready (``READY=1``), with an optional status line.

    Returns:
        True when the notification was sent, False outside systemd or when
        the send failed.
    """
    return _send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status is not None else ""))


def watchdog() -> bool:
    """Ping the watchdog (``WATCHDOG=1``); call only after work really succeeded."""
    return _send("WATCHDOG=1")


def stopping() -> bool:
    """Tell systemd the service is shutting down (``STOPPING=1``)."""
    return _send("STOPPING=1")


def status(text: str) -> bool:
    """Set the status line ``systemctl status`` shows (``STATUS=...``)."""
    return _send(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog is expected of this process.

    Reads ``WATCHDOG_USEC`` (set from ``WatchdogSec=``) and, when present,
    ``WATCHDOG_PID``, which must be this process. Ping at least twice per
    interval, as ``sd_watchdog_enabled(3)`` advises.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.debug("WATCHDOG_USEC=%r or WATCHDOG_PID=%r is not an integer; no watchdog", usec, pid)
        return None
    return value / 1e6 if value > 0 else None
