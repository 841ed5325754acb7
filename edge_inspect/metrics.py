"""What ``edge-inspect serve`` tells the outside: Prometheus metrics and a health check, over HTTP.

This module owns three things:

- :class:`Metrics`: counters and histograms the watchers feed as they go
  (parts per verdict, errors per reason, latencies, batch sizes, source
  failures, camera reconnects, reloads, the model of each source), and
  gauges read from the service at each scrape through one callback that
  returns a :class:`SourceLive` per source (queues, sink backlog, free
  disk, health). Its own :class:`~prometheus_client.CollectorRegistry`,
  never the process-global one, so two services in one process (tests)
  never share a series.
- :func:`error_reason`: the short, stable class of an ``error`` verdict's
  message (``vanished``, ``truncated``, ``too_large``...), bounded so that
  it can be a label.
- :class:`HttpServer`: ``GET``/``HEAD`` of ``/metrics`` (Prometheus text or
  OpenMetrics, by ``Accept``) and ``/healthz`` (JSON; 200 when healthy,
  503 otherwise), on a standard-library server hardened for a plant
  network: a deadline for the whole request head (a client that sends
  nothing, or one byte a second, is dropped), a cap on its size and on the
  number of headers, a bounded number of handler threads (a connection
  over the bound gets ``503`` at once), one request per connection, and
  fixed small error bodies that never echo the request.

Metric names (all prefixed ``edge_inspect_``), labels in braces:

- fed by the watchers: ``parts_total{source,verdict}``,
  ``part_errors_total{source,reason}`` (:func:`error_reason`),
  ``part_latency_seconds{source}`` (arrival to commit, a histogram),
  ``inference_seconds{source}`` and ``inference_batch_size{source}`` (per
  model run, histograms).
- fed by the service: ``source_failures_total{source}``,
  ``source_last_failure_timestamp_seconds{source}``,
  ``camera_reconnects_total{source}``, ``reloads_total{result}`` (``ok``,
  ``failed``), ``model_info{source,sha256,precision,criterion,threshold,
  device}`` (1; one series per source, replaced on reload) and
  ``model_threshold{source}``.
- read at each scrape (:meth:`Metrics.set_live`):
  ``queued_parts{source,stage}``, ``sink_backlog_parts{source}``,
  ``sink_oldest_pending_age_seconds{source}`` (absent when nothing is
  pending), ``disk_free_bytes{source,path}``, ``low_disk{source}``,
  ``source_up{source,kind}`` (0 while a failed source waits for its
  retry), ``source_healthy{source}``,
  ``source_last_progress_age_seconds{source}``, and
  ``live_errors_total`` (scrapes whose callback failed).
- ``build_info{version}``.

    >>> metrics = Metrics()
    >>> metrics.committed("line2", records)
    >>> server = HttpServer("127.0.0.1", 9464, metrics, health=service.health)
    >>> server.start()          # curl http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from edge_inspect import __version__
from edge_inspect.errors import ConfigError
from edge_inspect.ledger import Record, path_columns

log = logging.getLogger(__name__)

PREFIX = "edge_inspect_"
#: Arrival-to-commit and model-run latencies: 1 ms to 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
VERDICTS = ("ok", "ng", "error")


# ------------------------------------------------------------------ error reasons

#: Every value :func:`error_reason` returns.
REASONS = ("vanished", "permission", "not_a_file", "unreadable", "empty", "truncated", "too_large", "not_an_image",
           "unsupported_format", "corrupt", "bad_frame", "not_finite", "other")

# A file's message starts with its name, which may hold any text: each rule is
# anchored at the end (or, for messages without a name, at the start), and the
# rules that match the fixed tail of a message come before the looser ones.
_RULES: tuple[tuple[str, re.Pattern], ...] = tuple((reason, re.compile(pattern, re.DOTALL)) for reason, pattern in (
    # edge_inspect/watch.py: read_file
    ("vanished", r": vanished before it could be read \(deleted or moved away\)\.\Z"),
    ("permission", r": permission denied; the watcher's user cannot read it\. Check the file's owner and mode\.\Z"),
    ("not_a_file", r": not a regular file \(a folder, pipe or device\); expected an image file\.\Z"),
    # edge_inspect/preprocess.py: decode_image
    ("empty", r": the file is empty \(0 bytes\); it was probably not written completely\.\Z"),
    ("truncated", r": truncated JPEG \(no end-of-image marker\); the file was cut short\.\Z"),
    # every limit: the file size, the pixels, the decoded bytes, TIFF tiles, OpenCV's own guard
    ("too_large", r"[Rr]aise (?:--max-pixels|it in the environment) if such images are expected\.\Z"),
    # edge_inspect/imageheader.py: admit
    ("not_an_image", r": not a readable image: not a .* image \(it starts with .*\)\. "
                     r"Save part images in one of these formats\.\Z"),
    ("unsupported_format", r" image \(.*\); this runtime decodes only .* images\. "
                           r"Convert it \(PNG keeps every pixel\); not decoded\.\Z"),
    ("header", r"\A.*: not a readable image: an? \S+ file, but (?P<problem>.*); not decoded "
               r"\(the file is truncated, corrupt or crafted\)\.\Z"),
    ("corrupt", r": not a readable image: .* data \(\d+ bytes\) that OpenCV cannot decode; "
                r"it is corrupt or uses a variant OpenCV does not read\.\Z"),
    ("unreadable", r": cannot be (?:opened|read) \(.*\)\.\Z"),
    # messages without a file name: a camera frame, the inspector
    ("bad_frame", r"\AUnsupported image (?:dtype|shape) .*; expected .*\.\Z"),
    ("not_finite", r"\Athe residual is not finite"),
))
# The problems imageheader reports for bytes that stop early: a header, chunk,
# box or segment that declares more than what follows.
_CUT_SHORT = re.compile(r"\A(?:it is cut short|its header is cut short|it ends |.* declares \d+ bytes where \d+ "
                        r"(?:remain|follow)\Z)", re.DOTALL)


def error_reason(text: str | None) -> str:
    """The short, stable class of an ``error`` verdict's message, one of :data:`REASONS`.

    Args:
        text: :attr:`Record.error <edge_inspect.ledger.Record.error>`, as
            :mod:`edge_inspect.watch`, :mod:`edge_inspect.imageheader` and
            :mod:`edge_inspect.preprocess` write it.

    Returns:
        ``vanished``, ``permission``, ``not_a_file``, ``unreadable`` (an I/O
        error), ``empty``, ``truncated``, ``too_large`` (any size or pixel
        limit), ``not_an_image``, ``unsupported_format`` (an image format this
        runtime does not decode), ``corrupt``, ``bad_frame`` (a camera frame of
        the wrong shape or dtype), ``not_finite`` (NaN in the image or model
        output), or ``other``.

        >>> error_reason("p7.png: vanished before it could be read (deleted or moved away).")
        'vanished'
    """
    if not text:
        return "other"
    for reason, rule in _RULES:
        found = rule.search(text)
        if found is None:
            continue
        if reason == "header":
            return "truncated" if _CUT_SHORT.match(found["problem"]) else "corrupt"
        return reason
    return "other"


# ------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class DeliveryLive:
    """One network sink's outbox for one source, at scrape time.

    Attributes:
        backlog: verdicts committed and not yet acknowledged by the receiver.
        oldest_age: seconds since the oldest of them was committed; None when none waits.
        up: False during an outage (the receiver does not answer).
        alarm: True while the backlog is over its caps.
    """

    backlog: int
    oldest_age: float | None
    up: bool
    alarm: bool


@dataclass(frozen=True)
class SourceLive:
    """What the service reports about one source at scrape time.

    Attributes:
        kind: ``"folder"`` or ``"camera"``.
        queued: stage (``"read"``, ``"inspect"``, ``"commit"``) -> parts waiting.
        sink_backlog: ledger rows whose sinks are still pending.
        oldest_pending_age: seconds since the oldest pending row was
            committed; None when none is pending.
        disk_free: path where this source writes -> free bytes.
        low_disk: sorting and heatmaps paused by the low-disk guard.
        healthy: whether the service finds the source healthy.
        reason: why it is not healthy, or what is degraded; None when all is well.
        last_progress_age: seconds since the source last made progress or
            passed an idle check.
        running: False while the source failed and waits for its retry.
        deliveries: network sink -> its outbox's state.
    """

    kind: str
    queued: dict[str, int]
    sink_backlog: int
    oldest_pending_age: float | None
    disk_free: dict[str, int]
    low_disk: bool
    healthy: bool
    reason: str | None
    last_progress_age: float
    running: bool
    deliveries: Mapping[str, DeliveryLive] = field(default_factory=dict)


def health_report(live: Mapping[str, SourceLive]) -> tuple[bool, dict]:
    """A ``health()`` answer for :class:`HttpServer` from the sources' live state.

    Returns:
        ``(healthy, body)``: healthy when every source is running and
        healthy; ``body`` has ``sources`` (each source's state) and
        ``unhealthy`` (source -> why), empty when healthy.
    """
    sources, unhealthy = {}, {}
    for name, state in sorted(live.items()):
        sources[name] = {"kind": state.kind, "running": state.running, "healthy": state.healthy,
                         "reason": state.reason, "last_progress_age_seconds": round(state.last_progress_age, 3),
                         "sink_backlog": state.sink_backlog, "low_disk": state.low_disk}
        if not state.running:
            unhealthy[name] = state.reason or "not running: it failed and waits for its retry"
        elif not state.healthy:
            unhealthy[name] = state.reason or "unhealthy"
    return not unhealthy, {"healthy": not unhealthy, "sources": sources, "unhealthy": unhealthy}


def _text(value: object) -> str:
    """A label value that encodes as UTF-8 (a lone surrogate would break every scrape)."""
    text = str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Observer:
    """A watcher's ``observer``: :meth:`Metrics.committed` and :meth:`Metrics.inferred` for one source."""

    def __init__(self, metrics: Metrics, source: str):
        self._metrics, self._source = metrics, source

    def committed(self, records: Sequence[Record]) -> None:
        self._metrics.committed(self._source, records)

    def inferred(self, batch_size: int, seconds: float) -> None:
        self._metrics.inferred(self._source, batch_size, seconds)


class Metrics:
    """The service's metrics, in their own registry (:attr:`registry`).

    Every method is thread-safe: the watchers' commit and inference threads
    call :meth:`committed` and :meth:`inferred`; the HTTP threads read.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._live: Callable[[], dict[str, SourceLive]] | None = None
        self._lock = threading.Lock()
        #: source -> the (metric, label values) it has, for :meth:`forget`.
        self._series: dict[str, set[tuple[object, tuple[str, ...]]]] = {}
        # First, so that a failure of the live callback is counted in the same scrape.
        self.registry.register(_LiveCollector(self))
        r = self.registry
        self._live_errors = Counter(PREFIX + "live_errors", "Scrapes whose reading of the sources' live state "
                                    "failed (see the service log); their live gauges are missing.", registry=r)
        self._parts = Counter(PREFIX + "parts", "Parts whose verdict was committed to the ledger.",
                              ["source", "verdict"], registry=r)
        self._errors = Counter(PREFIX + "part_errors", "Parts with an error verdict, by the class of their "
                               "error (see edge_inspect.metrics.REASONS).", ["source", "reason"], registry=r)
        self._latency = Histogram(PREFIX + "part_latency_seconds", "Seconds from a part's arrival to its "
                                  "verdict's commit.", ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self._inference = Histogram(PREFIX + "inference_seconds", "Seconds one model run (a batch) took.",
                                    ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self._batch = Histogram(PREFIX + "inference_batch_size", "Images per model run.", ["source"],
                                buckets=BATCH_BUCKETS, registry=r)
        self._failures = Counter(PREFIX + "source_failures", "Times a source's pipeline failed; the service "
                                 "retries it.", ["source"], registry=r)
        self._failed_at = Gauge(PREFIX + "source_last_failure_timestamp_seconds", "Unix time of a source's last "
                                "failure.", ["source"], registry=r)
        self._reconnects = Counter(PREFIX + "camera_reconnects", "Times a camera stream was reopened.", ["source"],
                                   registry=r)
        self._reloads = Counter(PREFIX + "reloads", "Configuration reloads, by result.", ["result"], registry=r)
        self._delivered = Counter(PREFIX + "delivered", "Verdicts acknowledged by a network sink's receiver.",
                                  ["source", "sink"], registry=r)
        self._model = Info(PREFIX + "model", "The model a source runs.", ["source"], registry=r)
        self._threshold = Gauge(PREFIX + "model_threshold", "The decision threshold of a source's model.",
                                ["source"], registry=r)
        Info(PREFIX + "build", "This edge-inspect.", registry=r).info({"version": __version__})
        for result in ("ok", "failed"):
            self._reloads.labels(result)

    # -------------------------------------------------------------- feeding

    def _child(self, metric, source: str, *more: str):
        """``metric.labels(source, *more)``, remembered for :meth:`forget`."""
        values = (source, *more)
        with self._lock:
            self._series.setdefault(source, set()).add((metric, values))
        return metric.labels(*values)

    def committed(self, source: str, records: Sequence[Record]) -> None:
        """Count a batch of verdicts just committed for ``source``: verdicts, error reasons, latencies."""
        source = _text(source)
        if source not in self._series:  # zeros for every verdict, so that rate() sees the first part
            for verdict in VERDICTS:
                self._child(self._parts, source, verdict)
        for verdict, n in collections.Counter(r.verdict for r in records).items():
            self._child(self._parts, source, _text(verdict)).inc(n)
        for reason, n in collections.Counter(error_reason(r.error) for r in records if r.verdict == "error").items():
            self._child(self._errors, source, reason).inc(n)
        latency = self._child(self._latency, source)
        for record in records:
            latency.observe(max(record.latency_ms, 0.0) / 1e3)

    def inferred(self, source: str, batch_size: int, seconds: float) -> None:
        """Record one model run of ``batch_size`` images that took ``seconds``."""
        source = _text(source)
        self._child(self._inference, source).observe(max(seconds, 0.0))
        self._child(self._batch, source).observe(batch_size)

    def observer(self, source: str) -> _Observer:
        """A watcher's ``observer`` for ``source``: its ``committed(records)`` and ``inferred(batch_size, seconds)``."""
        return _Observer(self, source)

    def source_failed(self, source: str, reason: str) -> None:
        """Count a failure of ``source``'s pipeline; ``reason`` is free text, for the log, never a label."""
        source = _text(source)
        self._child(self._failures, source).inc()
        self._child(self._failed_at, source).set(time.time())
        log.debug("Metrics: source %s failed: %s", source, reason)

    def camera_reconnected(self, source: str) -> None:
        """Count a reopened camera stream."""
        self._child(self._reconnects, _text(source)).inc()

    def model(self, source: str, *, sha256: str, precision: str, criterion: str, threshold: float,
              device: str) -> None:
        """Name the model ``source`` runs; a second call (after a reload) replaces the first."""
        source = _text(source)
        self._child(self._model, source).info({"sha256": _text(sha256), "precision": _text(precision),
                                               "criterion": _text(criterion), "threshold": repr(float(threshold)),
                                               "device": _text(device)})
        self._child(self._threshold, source).set(float(threshold))

    def delivered(self, source: str, sink: str, n: int) -> None:
        """``n`` verdicts acknowledged by a network sink's receiver."""
        self._child(self._delivered, source, sink).inc(n)

    def reloaded(self, ok: bool) -> None:
        """Count a configuration reload, ``ok`` or ``failed``."""
        self._reloads.labels("ok" if ok else "failed").inc()

    def set_live(self, live: Callable[[], dict[str, SourceLive]]) -> None:
        """The callback read at each scrape for the live gauges: source name -> :class:`SourceLive`."""
        self._live = live

    def forget(self, source: str) -> None:
        """Remove every series of ``source`` (removed by a reload). Its live gauges go when ``live`` omits it."""
        source = _text(source)
        with self._lock:
            series = self._series.pop(source, set())
        for metric, values in series:
            try:
                metric.remove(*values)
            except KeyError:  # removed already
                pass

    # -------------------------------------------------------------- reading

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition of the registry and its content type; OpenMetrics when ``accept`` asks for it."""
        encode, content_type = choose_encoder(accept or "")
        return encode(_WithoutCreated(self.registry)), content_type


class _WithoutCreated:
    """A registry's metrics without the ``_created`` samples.

    prometheus_client adds to every counter and histogram series a
    ``..._created`` series (in the text format, a gauge of its own): twice the
    series for a timestamp no dashboard here uses. Switching them off is
    process-wide (``disable_created_metrics``); dropping them here is not.
    """

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self) -> Iterator:
        for metric in self._registry.collect():  # fresh objects at each collect: safe to trim
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class _LiveCollector:
    """The gauges read from :meth:`Metrics.set_live`'s callback at each scrape."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self) -> list:
        return []  # names come and go with the sources; nothing to check at registration

    def collect(self) -> Iterator:
        live = self._metrics._live
        if live is None:
            return
        try:
            families = self._families(live())
        except Exception:  # a scrape must not fail because one part of the service is broken: count it, log it
            log.warning("Metrics: reading the sources' live state failed; this scrape has no live gauges.",
                        exc_info=True)
            self._metrics._live_errors.inc()
            return
        yield from families

    @staticmethod
    def _families(sources: Mapping[str, SourceLive]) -> list:
        def gauge(name: str, documentation: str, labels: Sequence[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, documentation, labels=list(labels))

        queued = gauge("queued_parts", "Parts waiting for a stage (read, inspect, commit).", ("source", "stage"))
        backlog = gauge("sink_backlog_parts", "Ledger rows whose sinks still have to run.", ("source",))
        oldest = gauge("sink_oldest_pending_age_seconds", "Seconds since the oldest row with a pending sink was "
                       "committed; absent when none is pending.", ("source",))
        free = gauge("disk_free_bytes", "Free bytes where a source writes.", ("source", "path"))
        low = gauge("low_disk", "1 while the low-disk guard pauses sorting and heatmaps.", ("source",))
        up = gauge("source_up", "1 while the source runs; 0 while it failed and waits for its retry.",
                   ("source", "kind"))
        healthy = gauge("source_healthy", "1 when the service finds the source healthy.", ("source",))
        progress = gauge("source_last_progress_age_seconds", "Seconds since the source last made progress or "
                         "passed an idle check.", ("source",))
        waiting = gauge("delivery_backlog_parts", "Verdicts committed and not yet acknowledged by a network sink's "
                        "receiver.", ("source", "sink"))
        waiting_age = gauge("delivery_oldest_age_seconds", "Seconds since the oldest verdict waiting for a network "
                            "sink was committed; absent when none waits.", ("source", "sink"))
        delivery_up = gauge("delivery_up", "1 while a network sink's receiver answers.", ("source", "sink"))
        alarm = gauge("delivery_alarm", "1 while a network sink's backlog is over its caps.", ("source", "sink"))
        for name, state in sorted(sources.items()):
            name = _text(name)
            for stage, n in sorted(state.queued.items()):
                queued.add_metric([name, _text(stage)], n)
            backlog.add_metric([name], state.sink_backlog)
            if state.oldest_pending_age is not None:
                oldest.add_metric([name], state.oldest_pending_age)
            for path, n in sorted(state.disk_free.items()):
                free.add_metric([name, path_columns(path)[0]], n)
            low.add_metric([name], float(bool(state.low_disk)))
            up.add_metric([name, _text(state.kind)], float(bool(state.running)))
            healthy.add_metric([name], float(bool(state.healthy)))
            progress.add_metric([name], state.last_progress_age)
            for sink, delivery in sorted(state.deliveries.items()):
                labels = [name, _text(sink)]
                waiting.add_metric(labels, delivery.backlog)
                if delivery.oldest_age is not None:
                    waiting_age.add_metric(labels, delivery.oldest_age)
                delivery_up.add_metric(labels, float(bool(delivery.up)))
                alarm.add_metric(labels, float(bool(delivery.alarm)))
        return [queued, backlog, oldest, free, low, up, healthy, progress, waiting, waiting_age, delivery_up, alarm]


# ------------------------------------------------------------------ HTTP

#: The request line and headers of one request, in all; a scraper sends a few hundred bytes.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 50
#: Seconds a client has to send its request head, and then to take the response.
TIMEOUT_S = 10.0
#: Requests served at once; a connection over this gets 503 at once.
MAX_CONNECTIONS = 32
# After refusing a request whose head was not read to its end, read (and drop) what the client still sends, a
# little, before closing: closing with unread bytes makes the kernel send a reset, and the client may lose the reply.
_DRAIN_BYTES = 4 << 20
_DRAIN_S = 1.0
_ROUTES = ("/metrics", "/healthz")
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 24\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\n503 Service Unavailable\n")


class _TooLarge(Exception):
    """The request head is over :data:`MAX_HEAD_BYTES`."""


class _HeadReader(io.RawIOBase):
    """The socket's bytes, at most ``limit`` of them in all, within one deadline for all of them.

    A socket timeout alone bounds each ``recv``; a client that sends a byte
    just before each timeout would hold the thread for ever (slowloris).
    """

    def __init__(self, sock: socket.socket, deadline: float, limit: int):
        super().__init__()
        self._sock, self._deadline, self._left = sock, deadline, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            raise _TooLarge
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request head not received in time")
        self._sock.settimeout(remaining)
        with memoryview(buffer) as view:
            n = self._sock.recv_into(view[:self._left])
        self._left -= n
        return n


class _Writer:
    """``wfile``: unbuffered ``sendall``, under the socket timeout set before the response."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edge-inspect"
    # One request per connection: a kept-alive idle connection would hold a thread.
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BufferedReader(_HeadReader(self.request, time.monotonic() + self.server.timeout_s,
                                                   self.server.max_head_bytes))
        self.wfile = _Writer(self.request)
        self.requestline, self.command, self.close_connection = "", None, True
        self.request_version = self.default_request_version  # before parse_request, for an early 408 or 431
        self._status: int | None = None

    def finish(self) -> None:
        # No route reads a body: a refused head, or a request with a body, leaves bytes unread.
        headers = getattr(self, "headers", None)
        body = headers is not None and (headers.get("Content-Length", "0").strip() not in ("", "0")
                                        or "Transfer-Encoding" in headers)
        if self._status in (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) or body:
            self._drain()
        self.rfile.close()

    def handle(self) -> None:
        try:
            self._handle()
        except _TooLarge:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        except TimeoutError:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT)
        except OSError as exc:  # the client went away
            log.debug("HTTP client %s: %s", self.client_address[0], exc)

    def _handle(self) -> None:
        self.raw_requestline = self.rfile.readline(self.server.max_head_bytes + 1)
        if len(self.raw_requestline) > self.server.max_head_bytes:
            raise _TooLarge
        if not self.raw_requestline.strip():
            return  # connected and closed, or sent an empty line: nothing to answer
        if not self.parse_request():  # it answered 400, 431 or 505 itself
            return
        if len(self.headers) > MAX_HEADERS:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            return
        # Only the path: a query string or fragment is ignored.
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path not in _ROUTES:
            self.send_error(HTTPStatus.NOT_FOUND)
        elif self.command not in ("GET", "HEAD"):
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)
        elif path == "/metrics":
            self._metrics()
        else:
            self._health()

    def _metrics(self) -> None:
        try:
            body, content_type = self.server.metrics.render(self.headers.get("Accept"))
        except Exception:
            log.exception("Metrics: the exposition failed")
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)
            return
        self._reply(HTTPStatus.OK, body, content_type)

    def _health(self) -> None:
        try:
            ok, details = self.server.health()
            body = {"healthy": bool(ok), **details}
        except Exception:
            log.exception("Health: the health check failed")
            ok, body = False, {"healthy": False, "error": "the health check itself failed; see the service log"}
        data = (json.dumps(body, default=str, sort_keys=True) + "\n").encode("utf-8")
        self._reply(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, data, "application/json")

    def _reply(self, code: int, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._status = code
        self.request.settimeout(self.server.timeout_s)  # sendall's budget for the whole response
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A fixed, small body: the status alone, never a word of the request."""
        code = HTTPStatus(code)
        headers = [("Allow", "GET, HEAD")] if code == HTTPStatus.METHOD_NOT_ALLOWED else []
        self._reply(code, f"{code.value} {code.phrase}\n".encode("ascii"), "text/plain; charset=utf-8", headers)

    def _refuse(self, code: int) -> None:
        if self._status is not None:
            return  # the response had begun: nothing sensible to add
        try:
            self.send_error(code)
        except OSError:
            pass

    def _drain(self) -> None:
        sock, left = self.request, _DRAIN_BYTES
        deadline = time.monotonic() + _DRAIN_S
        try:
            sock.shutdown(socket.SHUT_WR)
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                data = sock.recv(min(left, 65536))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def version_string(self) -> str:
        return self.server_version  # without the Python version

    def log_request(self, code="-", size="-") -> None:
        log.debug("HTTP %s %r %s", self.client_address[0], self.requestline, code)

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        log.debug("HTTP %s: %s", self.client_address[0], format % args)


class _Server(ThreadingHTTPServer):
    """A thread per request, at most ``max_connections`` at once; the accept loop never blocks on a client."""

    daemon_threads = True
    block_on_close = False
    # SO_REUSEADDR lets a restart bind through TIME_WAIT; on Linux it never lets a second listener share the port.
    allow_reuse_address = True
    allow_reuse_port = False
    request_queue_size = 256

    def __init__(self, sockaddr: tuple, family: int, metrics: Metrics, health: Callable[[], tuple[bool, dict]], *,
                 timeout_s: float, max_connections: int, max_head_bytes: int):
        self.address_family = family
        self.metrics, self.health = metrics, health
        self.timeout_s, self.max_head_bytes = timeout_s, max_head_bytes
        self.slots = threading.BoundedSemaphore(max_connections)
        self.in_flight = 0
        self._count = threading.Lock()
        super().__init__(sockaddr, _Handler)

    def _add(self, n: int) -> None:
        with self._count:
            self.in_flight += n

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, a DNS query that can hang on a plant network.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self._busy(request)
            return
        self._add(1)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the slot is not taken
            self._add(-1)
            self.slots.release()
            raise

    def _busy(self, request: socket.socket) -> None:
        """Answer 503 without blocking the accept loop.

        What the client already sent is read first, as far as it has arrived:
        closing with unread bytes resets the connection, and the client would
        see the reset instead of the 503.
        """
        try:
            request.setblocking(False)
            for _ in range(4):
                if not request.recv(65536):
                    break
        except OSError:  # BlockingIOError: nothing (more) yet
            pass
        try:
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._add(-1)
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        log.warning("HTTP: a request from %s failed", client_address[0] if client_address else "?", exc_info=True)


class HttpServer:
    """``/metrics`` and ``/healthz`` on a daemon thread.

    Args:
        address, port: where to listen (``http.address``, ``http.port``);
            port 0 takes a free port (tests), read back from :attr:`port`.
        metrics: what ``/metrics`` shows.
        health: ``() -> (healthy, details)``; ``/healthz`` answers the
            details as JSON, with ``"healthy"``, and status 200 when
            healthy, 503 otherwise (see :func:`health_report`).
        timeout_s: seconds a client has to send its request head, and
            then to take the response.
        max_connections: requests served at once; more get 503 at once.
        max_head_bytes: the most bytes of request line and headers; more get 431.

    Attributes:
        port: the bound port, once started.
    """

    def __init__(self, address: str, port: int, metrics: Metrics, health: Callable[[], tuple[bool, dict]], *,
                 timeout_s: float = TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
                 max_head_bytes: int = MAX_HEAD_BYTES):
        self.address, self.port = address, port
        self.metrics, self.health = metrics, health
        self.timeout_s, self.max_connections, self.max_head_bytes = timeout_s, max_connections, max_head_bytes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve on a daemon thread.

        Raises:
            ConfigError: the address is not one of this PC's, or the port is
                taken or not allowed; the message names ``http.address`` or
                ``http.port``.
        """
        if self._server is not None:
            return
        where = f"{self.address}:{self.port}" if ":" not in self.address else f"[{self.address}]:{self.port}"
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(self.address, self.port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        except (socket.gaierror, UnicodeError) as exc:
            raise ConfigError(f"At 'http.address': {self.address!r} is neither an IP address nor a host name this PC "
                              f"can resolve ({exc}). Set http.address to an address of this PC, such as 127.0.0.1.",
                              key="http.address") from None
        try:
            server = _Server(sockaddr, family, self.metrics, self.health, timeout_s=self.timeout_s,
                             max_connections=self.max_connections, max_head_bytes=self.max_head_bytes)
        except OSError as exc:
            raise _bind_error(exc, where, self.address, self.port) from None
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="http", daemon=True)
        self._thread.start()
        log.debug("HTTP: serving /metrics and /healthz on %s port %d", self.address, self.port)

    @property
    def in_flight(self) -> int:
        """Requests in hand now (each on its own thread), at most ``max_connections``."""
        return self._server.in_flight if self._server is not None else 0

    def stop(self) -> None:
        """Stop accepting and close the socket; requests in hand end by themselves (bounded by the timeout)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _bind_error(exc: OSError, where: str, address: str, port: int) -> ConfigError:
    said = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"At 'http.port': cannot listen on {where}: the port is already in use ({said}), by "
                           "another edge-inspect serve or another program (see `ss -ltnp`). Set http.port to a "
                           "free port, or stop the other program.", key="http.port")
    if exc.errno == errno.EACCES:
        return ConfigError(f"At 'http.port': cannot listen on {where}: not allowed ({said}); ports below 1024 need "
                           "privileges. Set http.port to 1024 or above (the default is 9464).", key="http.port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"At 'http.address': cannot listen on {where}: {address} is not an address of this PC "
                           f"({said}). Set http.address to one of its addresses, 127.0.0.1 to stay local, or "
                           "0.0.0.0 for every interface.", key="http.address")
    return ConfigError(f"At 'http.address' / 'http.port': cannot listen on {where} ({said}). Check http.address and "
                       f"http.port.", key="http.address")
