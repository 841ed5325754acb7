"""The outbox: every verdict delivered from the ledger to the plant, at least once, in ledger order.

The ledger already holds each verdict durably before anything else happens
to its part. A network sink (MQTT, OPC UA, a webhook) never sees a verdict
any other way: an :class:`Outbox` thread per source and sink reads the rows
after the sink's cursor, hands them to the sink, and moves the cursor (a
row of the ledger's ``cursors`` table) only once the receiver acknowledged
them. So a broker outage, a restart or a kill -9 delays delivery and never
loses it; a receiver may see a verdict twice, and drops the duplicate by its
:attr:`Message.message_id`, stable across restarts and PCs.

- A receiver that is down does not slow inspection: the outbox grows; its
  backlog and age show in health and metrics; it drains at full speed when
  the receiver returns.
- Each failure is retried with backoff and jitter; an outage is logged once
  when it starts and once when it ends.
- A cap on the backlog's age or size raises an alarm (log, health,
  metrics) and drops nothing.

    >>> outbox = Outbox("line2", "parts/.edge-inspect/ledger.sqlite", MqttSink(config), installation="pc-17")
    >>> outbox.start()          # delivers until stop()
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_inspect.errors import EdgeInspectError
from edge_inspect.ledger import Ledger, Record

log = logging.getLogger(__name__)

#: The payload's schema version; docs/verdict.schema.json describes it.
PAYLOAD_VERSION = 1
PAYLOAD_SCHEMA = "https://edge-inspect.dev/schemas/verdict-1.json"
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0  # a receiver back after an outage is found within seconds; the backlog drains at once


@dataclass(frozen=True)
class Message:
    """One verdict, ready to send.

    Attributes:
        row_id: the ledger row (the source's sequence number).
        source: the source's name.
        message_id: ``INSTALLATION:SOURCE:LEDGER:ROW``, unique across
            restarts and PCs: receivers drop duplicates by it.
        payload: the JSON object (see :func:`payload`).
        body: ``payload`` as compact UTF-8 JSON.
    """

    row_id: int
    source: str
    message_id: str
    payload: dict
    body: bytes


class Delivery(Protocol):
    """A network sink, as the outbox drives it (on the outbox's own thread)."""

    #: The cursor's name in the ledger: unique per sink (``mqtt``, ``opcua``, ``webhook:mes``).
    name: str

    def open(self) -> None:
        """Connect (or check the receiver). Raise on failure; the outbox retries."""

    def deliver(self, messages: Sequence[Message]) -> None:
        """Send, in order; return only once the receiver acknowledged every one. Raise on any failure."""

    def close(self) -> None:
        """Disconnect; never raises."""


def message_id(installation: str, source: str, ledger_id: str, row_id: int) -> str:
    return f"{installation}:{source}:{ledger_id}:{row_id}"


def payload(record: Record, *, source: str, installation: str, ledger_id: str) -> dict:
    """The versioned JSON object of a verdict (``docs/verdict.schema.json``)."""
    part = {"kind": record.kind}
    if record.kind == "file":
        part.update(path=record.source, size=record.size, sha256=record.sha256, mtime_ns=record.mtime_ns)
    else:
        part.update(uri=record.source, frame_index=record.frame_index, frame_time=record.frame_time)
    return {
        "$schema": PAYLOAD_SCHEMA,
        "version": PAYLOAD_VERSION,
        "id": message_id(installation, source, ledger_id, record.id),
        "installation": installation,
        "source": source,
        "sequence": record.id,
        "verdict": record.verdict,
        "score": _finite(record.score),
        "raw_score": _finite(record.raw_score),
        "threshold": _finite(record.threshold),
        "criterion": record.criterion,
        "polarity": record.polarity,
        "model_sha256": record.model_sha256,
        "error": record.error,
        "part": part,
        "timestamps": {"arrived": record.arrived_at, "read": record.read_at, "inspected": record.inspected_at,
                       "committed": record.committed_at},
        "latency_ms": record.latency_ms,
        "sorted_path": record.sorted_path,
        "heatmap": record.heatmap,
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such a value goes out as null, never blocking the sink for good."""
    import math

    return value if value is None or math.isfinite(value) else None


def message(record: Record, *, source: str, installation: str, ledger_id: str) -> Message:
    data = payload(record, source=source, installation=installation, ledger_id=ledger_id)
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return Message(record.id, source, data["id"], data, body)


class Outbox:
    """Deliver one source's verdicts to one sink, from its ledger, on a thread of its own.

    Args:
        source: the source's name.
        ledger_path: the source's ledger (opened here on a connection of its own).
        sink: the :class:`Delivery`.
        installation: this PC's id, in every message id.
        batch: messages per :meth:`Delivery.deliver` call at most.
        max_age, max_rows: the backlog's caps: past either, an alarm.
        start_at: for a sink new to this ledger: ``"end"`` delivers only
            verdicts from now on (the cursor starts at the last row),
            ``"start"`` every verdict the ledger holds.
        poll: seconds between looks at the ledger while idle.
    """

    def __init__(self, source: str, ledger_path: str | Path, sink: Delivery, *, installation: str, batch: int = 100,
                 max_age: float | None = None, max_rows: int | None = None, start_at: str = "end",
                 poll: float = 0.05, metrics=None):
        self.source = source
        self.ledger_path = Path(ledger_path)
        self.sink = sink
        self.installation = installation
        self.batch = batch
        self.max_age = max_age
        self.max_rows = max_rows
        self.start_at = start_at
        self.poll = poll
        self.metrics = metrics
        #: Why the receiver is not reachable, while it is not.
        self.outage: str | None = None
        #: The alarm of a backlog over its caps, while it is.
        self.alarm: str | None = None
        self.delivered = 0
        self.backlog_rows = 0
        self.backlog_age: float | None = None
        self.last_ok = time.monotonic()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"outbox-{source}-{sink.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def wake(self) -> None:
        """A commit happened: look at the ledger now rather than at the next poll."""
        self._wake.set()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        ledger = None
        connected = False
        while not self._stopping.is_set():
            in_ledger = True  # which side failed: the ledger is opened again, the receiver reconnected
            try:
                if ledger is None:
                    ledger = Ledger.open(self.ledger_path)
                    ledger_id = ledger.ledger_id()
                    cursor = ledger.cursor(self.sink.name, start_at=self.start_at)
                if not connected:
                    in_ledger = False
                    self.sink.open()
                    connected = True
                in_ledger = True
                rows = ledger.after(cursor, self.batch)
                self._measure(ledger, cursor)
                if not rows:
                    self._recovered()
                    self._wake.wait(self.poll)
                    self._wake.clear()
                    continue
                messages = [message(r, source=self.source, installation=self.installation, ledger_id=ledger_id)
                            for r in rows]
                in_ledger = False
                self.sink.deliver(messages)
                in_ledger = True
                cursor = rows[-1].id
                ledger.advance(self.sink.name, cursor)
                self.delivered += len(rows)
                if self.metrics is not None:
                    self.metrics.delivered(self.source, self.sink.name, len(rows))
                self._recovered()
                delay = RETRY_FIRST_S
            except Exception as exc:  # noqa: BLE001  (a receiver's failure of any kind: retried, never fatal)
                reason = _reason(exc)
                if self.outage is None:
                    log.error("Delivery %s of source %s failed: %s. Verdicts wait in the ledger and are sent when it "
                              "answers again (retrying with backoff up to %.0f s).", self.sink.name, self.source,
                              reason, RETRY_MAX_S)
                else:
                    log.debug("Delivery %s of source %s still failing: %s", self.sink.name, self.source, reason)
                self.outage = reason
                if in_ledger and ledger is not None:
                    ledger.close()
                    ledger = None
                if connected and not in_ledger:
                    self.sink.close()
                    connected = False
                if ledger is not None:
                    try:
                        self._measure(ledger, ledger.cursor(self.sink.name, start_at=self.start_at))
                    except Exception:  # noqa: BLE001
                        pass
                self._stopping.wait(delay * (0.5 + random.random()))
                delay = min(RETRY_MAX_S, delay * 2)
        if connected:
            self.sink.close()
        if ledger is not None:
            ledger.close()

    def _recovered(self) -> None:
        self.last_ok = time.monotonic()
        if self.outage is not None:
            log.info("Delivery %s of source %s works again (it had failed: %s); %d verdict(s) waiting.",
                     self.sink.name, self.source, self.outage, self.backlog_rows)
            self.outage = None

    def _measure(self, ledger: Ledger, cursor: int) -> None:
        self.backlog_rows, self.backlog_age = ledger.undelivered(cursor)
        over = []
        if self.max_rows is not None and self.backlog_rows > self.max_rows:
            over.append(f"{self.backlog_rows} verdicts waiting, over max_backlog_rows {self.max_rows}")
        if self.max_age is not None and self.backlog_age is not None and self.backlog_age > self.max_age:
            over.append(f"the oldest waiting for {self.backlog_age:.0f} s, over max_backlog_age {self.max_age:g} s")
        alarm = "; ".join(over) or None
        if alarm and self.alarm is None:
            log.error("ALARM: delivery %s of source %s is behind: %s. Nothing is dropped; check the receiver.",
                      self.sink.name, self.source, alarm)
        elif self.alarm and alarm is None:
            log.info("Delivery %s of source %s is within its backlog caps again.", self.sink.name, self.source)
        self.alarm = alarm


def _reason(exc: BaseException) -> str:
    text = (str(exc) or type(exc).__name__).rstrip(".")
    return text if isinstance(exc, EdgeInspectError) else f"{type(exc).__name__}: {text}"
