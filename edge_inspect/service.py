"""The service: every source of a configuration in one process, watched over.

``edge-inspect serve --config FILE`` and ``edge-inspect watch DIR --model M``
both come here with a :class:`~edge_inspect.config.ServiceConfig`::

    ServiceConfig ──> Service ──> one SourceRunner per [sources.NAME]
                         │            ledger, sinks, hot folder or camera,
                         │            and a Watcher on them (edge_inspect.watch)
                         ├── models: one session per model folder, shared
                         ├── systemd: READY, STATUS, WATCHDOG, STOPPING
                         ├── HTTP: /healthz and /metrics (edge_inspect.metrics)
                         ├── retention and the low-disk guard (edge_inspect.retention)
                         ├── outboxes: MQTT, OPC UA, webhooks, from each ledger (edge_inspect.outbox)
                         └── SIGHUP: reload (serve), a drained stop (watch)

- A source that fails (a camera gone, a folder unmounted, its ledger
  unwritable) is logged, counted and opened again with backoff; the others go
  on inspecting. ``watch`` instead stops with the error (exit 1), as a lone
  watcher always did.
- READY=1 once every model has loaded and every source has been opened
  once (or has failed its first try and waits for its retry, as health
  then says). WATCHDOG=1 only while every source is alive: it made progress,
  passed its idle check, or waits for its retry.
- A reload builds and validates the new configuration in full and loads
  and warms up its models before anything changes. Then each source whose
  settings or model changed is stopped (its parts in hand finish under the
  old configuration and are committed) and started anew; the new one scans
  its folder, and the ledger skips the parts already decided. A reload that
  fails changes nothing, and says why in the log and in health.

    >>> service = Service(config.load("/etc/edge-inspect/config.toml"), config_path="/etc/edge-inspect/config.toml")
    >>> summaries = service.run()             # until SIGTERM
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_inspect import notify, numbers
from edge_inspect import signals as stop_signals
from edge_inspect.config import CameraSource, FolderSource, ServiceConfig
from edge_inspect.errors import ConfigError, EdgeInspectError
from edge_inspect.watch import Summary, Watcher

log = logging.getLogger(__name__)

#: First and longest wait before a failed source is opened again.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
_TICK = 0.5


class Models:
    """Loaded model sessions, one per model folder, precision and device, shared by the sources that name it."""

    def __init__(self):
        self._loaded: dict[tuple, tuple] = {}

    def inspector(self, name: str, source: FolderSource | CameraSource):
        """A warmed-up inspector of the source's model, on a shared session.

        Raises:
            ModelCardError, ConfigError: the model cannot be loaded; the
                message names the key (``At 'sources.NAME.model': ...``).
        """
        from edge_inspect.inspector import Inspector, open_model

        key = (os.path.abspath(source.model), source.precision, source.device)
        try:
            if key not in self._loaded:
                self._loaded[key] = open_model(source.model, precision=source.precision, device=source.device)
            card, session, device, precision = self._loaded[key]
            inspector = Inspector(card, session, device=device, precision=precision, criterion=source.criterion,
                                  threshold=source.threshold, batch_size=source.batch_size,
                                  anomaly_map=source.sinks.heatmaps is not None)
        except EdgeInspectError as exc:
            detail = getattr(exc, "key", None)
            at = f"sources.{name}.{detail}" if detail else f"sources.{name}.model"
            raise type(exc)(f"At '{at}': {exc}") from exc
        inspector.warmup()
        return inspector


class _Observer:
    """A watcher's metrics, labelled with its source's name; and the source's outboxes woken at each commit."""

    def __init__(self, metrics, name: str, on_commit=None):
        self.metrics, self.name, self.on_commit = metrics, name, on_commit

    def committed(self, records) -> None:
        if self.metrics is not None:
            self.metrics.committed(self.name, records)
        if self.on_commit is not None:
            self.on_commit()

    def inferred(self, batch_size: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.inferred(self.name, batch_size, seconds)


class SourceRunner:
    """One source on a thread of its own: its ledger, sinks, hot folder or camera, and a :class:`Watcher`.

    Args:
        name: the source's name.
        source: its configuration.
        inspector: the loaded inspector.
        retry: open the source again with backoff when it fails (serve);
            False: the failure ends the run and :meth:`join` raises it (watch).
        metrics: a :class:`~edge_inspect.metrics.Metrics`, or None.
        disk_guard: ``guard(folder) -> reason | None`` (low disk), or None.
        systemd: let the watcher speak to systemd itself (a lone watch).
        rescan_backlog: scan the folder at start even where ``backlog`` is
            off (a source started again by a reload: files may have arrived
            during the swap).
    """

    def __init__(self, name: str, source: FolderSource | CameraSource, inspector, *, retry: bool, metrics=None,
                 disk_guard=None, systemd: bool = False, rescan_backlog: bool = False, on_commit=None):
        self.name = name
        self.config = source
        self.inspector = inspector
        self.retry = retry
        self.metrics = metrics
        self.disk_guard = disk_guard
        self.systemd = systemd
        self.rescan_backlog = rescan_backlog
        self.on_commit = on_commit
        #: The source's retention caps, when it has any (serve).
        self.janitor_config = None
        self.watcher: Watcher | None = None
        self.ledger = None
        self.hot = None
        self.error: str | None = None
        self.failure: BaseException | None = None
        self.attempted = threading.Event()
        self.summary = Summary()
        self.started_at = time.monotonic()
        self.retry_at: float | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"source-{name}", daemon=True)

    # ------------------------------------------------------------ control

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the source; the parts in hand finish. Safe from any thread and from a signal handler."""
        self._stopping.set()
        with self._lock:
            watcher = self.watcher
        if watcher is not None:
            watcher.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread; raise the failure of a source that does not retry."""
        self._thread.join(timeout)
        if self.failure is not None and not self.retry:
            raise self.failure

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ running

    def _loop(self) -> None:
        delay = RETRY_FIRST_S
        while not self._stopping.is_set():
            try:
                self._run_once()
                self.error = None
                return  # stopped, or a video file played to its end
            except EdgeInspectError as exc:
                self.error, self.failure = str(exc), exc
            except BaseException as exc:  # noqa: BLE001  (reported like the others; a bug must not end the service)
                log.exception("Source %s failed unexpectedly", self.name)
                self.error, self.failure = f"{type(exc).__name__}: {exc}", exc
            finally:
                self.attempted.set()
            if self.metrics is not None:
                self.metrics.source_failed(self.name, self.error or "")
            if not self.retry or self._stopping.is_set():
                if self.retry:
                    self.failure = None
                return
            log.error("Source %s failed: %s. Opening it again in %.0f s; the other sources go on.", self.name,
                      self.error, delay)
            self.retry_at = time.monotonic() + delay
            self._stopping.wait(delay)
            self.retry_at = None
            delay = min(RETRY_MAX_S, delay * 2)

    def _run_once(self) -> None:
        import contextlib

        from edge_inspect.ledger import Ledger
        from edge_inspect.sinks import HeatmapSink, JsonlSink, SortSink
        from edge_inspect.sources import DEFAULT_IGNORE, Camera, HotFolder

        cfg = self.config
        with contextlib.ExitStack() as stack:
            self.ledger = stack.enter_context(Ledger.open(cfg.ledger_path))
            sinks: list = []
            if isinstance(cfg, FolderSource) and cfg.sinks.sort:
                sinks.append(SortSink(cfg.path))
            if cfg.sinks.heatmaps is not None:
                sinks.append(HeatmapSink(cfg.sinks.heatmaps, max_pixels=cfg.max_pixels,
                                         every_part=cfg.sinks.heatmaps_all))
            if cfg.sinks.results is not None:
                sinks.append(JsonlSink(cfg.sinks.results))
            for sink in sinks:
                stack.callback(sink.close)
            if isinstance(cfg, FolderSource):
                exclude = [*(sinks[0].folders if cfg.sinks.sort else []), *([cfg.sinks.heatmaps] if cfg.sinks.heatmaps
                                                                             else [])]
                source = self.hot = stack.enter_context(HotFolder(
                    cfg.path, poll=cfg.poll, settle=cfg.settle, settle_unsure=cfg.settle_unsure, rescan=cfg.rescan,
                    ignore=(*DEFAULT_IGNORE, *cfg.ignore), backlog=cfg.backlog or self.rescan_backlog,
                    recursive=cfg.recursive, exclude=exclude))
            else:
                reconnected = (lambda: self.metrics.camera_reconnected(self.name)) if self.metrics is not None else None
                source = Camera(cfg.uri, every=cfg.every, fps=cfg.fps, on_reconnect=reconnected)
            watcher = Watcher(source, self.inspector, self.ledger, sinks=sinks, readers=cfg.readers,
                              max_pixels=cfg.max_pixels, systemd=self.systemd,
                              observer=(_Observer(self.metrics, self.name, self.on_commit)
                                        if self.metrics is not None or self.on_commit is not None else None),
                              disk_guard=self.disk_guard)
            with self._lock:
                self.watcher = watcher
            if self._stopping.is_set():
                watcher.stop()
            entry = self.inspector.entry
            log.info("Source %s: watching %s with %s (%s on %s, criterion %s, threshold %s; %s; ng when score > "
                     "threshold); ledger %s", self.name, cfg.path if isinstance(cfg, FolderSource) else cfg.uri,
                     cfg.model, self.inspector.precision, self.inspector.device, self.inspector.criterion,
                     numbers.score(entry["threshold"]),
                     numbers.meaning(self.inspector.criterion, entry["polarity"], entry.get("center")),
                     cfg.ledger_path)
            started = threading.Thread(target=self._mark_attempted, args=(watcher,), daemon=True)
            started.start()
            try:
                run = watcher.run()
            finally:  # a failed run's verdicts count too: the source's summary adds up its runs
                self.summary = _add(self.summary, getattr(watcher, "_counts", {}))
            self.summary = replace(self.summary, replayed=run.replayed, seconds=run.seconds)

    def _mark_attempted(self, watcher: Watcher) -> None:
        while not watcher.ready.wait(_TICK):
            if not self._thread.is_alive() or self.attempted.is_set():
                return
        self.error = None
        self.attempted.set()

    # ------------------------------------------------------------ health

    def progress_age(self, now: float) -> float:
        """Seconds since the source last made progress or passed its idle check."""
        watcher = self.watcher
        if watcher is None or not watcher.ready.is_set():
            return now - self.started_at
        marks = [watcher.committed_mono]
        if self.hot is not None:
            marks.append(self.hot.checked_at)
        return now - max(marks)

    def health(self, now: float) -> tuple[bool, str | None]:
        """Whether the source is healthy, and why not (or what is degraded)."""
        if self.retry_at is not None or (self.error and self.failure is not None and self.watcher is None):
            return False, f"failed: {self.error}"
        age = self.progress_age(now)
        if age > self.config.stale_after:
            what = "no frame inspected" if isinstance(self.config, CameraSource) else "no progress or idle check"
            return False, f"{what} for {age:.0f} s (stale_after {self.config.stale_after:g} s)"
        watcher = self.watcher
        if watcher is not None and watcher.paused:
            return True, watcher.paused
        return True, None

    def alive_for_watchdog(self, now: float) -> bool:
        """Alive: progress or an idle check within ``stale_after``, or waiting for its retry."""
        return self.retry_at is not None or self.progress_age(now) <= self.config.stale_after or not self.alive

    def live(self, now: float):
        """What /metrics shows of this source now."""
        from edge_inspect.metrics import SourceLive

        watcher, ledger = self.watcher, self.ledger
        queued = {}
        if watcher is not None:
            queued = {"read": watcher._items.qsize(), "inspect": watcher._parts.qsize(),
                      "commit": watcher._scored.qsize()}
        backlog, oldest = 0, None
        if ledger is not None:
            try:
                backlog, oldest = ledger.backlog(now=time.time())
            except (EdgeInspectError, AttributeError):
                pass
        healthy, reason = self.health(now)
        return SourceLive(kind=self.config.kind, queued=queued, sink_backlog=backlog, oldest_pending_age=oldest,
                          disk_free=disk_free(self.config), low_disk=bool(watcher is not None and watcher.paused),
                          healthy=healthy, reason=reason, last_progress_age=self.progress_age(now),
                          running=self.retry_at is None and self.alive)


def _add(summary: Summary, counts: Mapping[str, int]) -> Summary:
    return replace(summary, **{kind: getattr(summary, kind) + counts.get(kind, 0)
                               for kind in ("ok", "ng", "error", "duplicates")})


def writes_to(source: FolderSource | CameraSource) -> list[Path]:
    """The folders a source writes to: its ledger's, its sorted folders, heatmaps and results file's."""
    folders = [Path(os.path.abspath(source.ledger_path)).parent]
    if isinstance(source, FolderSource) and source.sinks.sort:
        folders.append(Path(os.path.abspath(source.path)))
    if source.sinks.heatmaps is not None:
        folders.append(Path(os.path.abspath(source.sinks.heatmaps)))
    if source.sinks.results is not None:
        folders.append(Path(os.path.abspath(source.sinks.results)).parent)
    return list(dict.fromkeys(folders))


def disk_free(source: FolderSource | CameraSource) -> dict[str, int]:
    """Free bytes (for this user) at each folder the source writes to; folders that are missing are left out."""
    free = {}
    for folder in writes_to(source):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        free[str(folder)] = st.f_bavail * st.f_frsize
    return free


class Service:
    """Run every source of a configuration until stopped.

    Args:
        config: the validated configuration.
        config_path: the file it came from, read again on SIGHUP (serve).
        overrides: command-line overrides, applied again on reload.
        reload: True for serve (SIGHUP reloads); False for watch (SIGHUP is
            a drained stop, and a failing source ends the run).
        systemd: speak to systemd (READY, STATUS, WATCHDOG, STOPPING).
    """

    def __init__(self, config: ServiceConfig, *, config_path: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None, reload: bool = True, systemd: bool = True):
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.reloadable = reload
        # serve speaks to systemd for all its sources; a lone watch lets its watcher do it, as it always did.
        self.systemd = systemd and reload
        self._watcher_systemd = systemd and not reload
        self.models = Models()
        self.runners: dict[str, SourceRunner] = {}
        self.metrics = None
        self.http = None
        self.reload_error: str | None = None
        self.reloads = 0
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._janitors: dict[str, Any] = {}
        #: (source, sink) -> its Outbox.
        self.outboxes: dict[tuple[str, str], Any] = {}
        self._janitor_thread: threading.Thread | None = None
        self._last_watchdog = 0.0

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Stop every source; parts in hand finish. Safe from a signal handler."""
        self._stop.set()
        for runner in list(self.runners.values()):
            runner.stop()

    def request_reload(self) -> None:
        """Reload at the next turn of the service loop. Safe from a signal handler."""
        self._reload.set()

    # ------------------------------------------------------------ run

    def run(self) -> dict[str, Summary]:
        """Start every source and watch over them until stopped; returns each source's summary.

        Raises:
            EdgeInspectError: a model cannot be loaded, the HTTP port cannot
                be bound; with ``reload=False`` (watch), a source failed.
        """
        own = not stop_signals.installed()
        if own:
            stop_signals.install()
        try:
            if stop_signals.requested():
                stop_signals.claim(lambda: None)
                log.info("Stopped before the models were loaded; nothing inspected.")
                return {name: Summary() for name in self.config.sources}
            stop_signals.claim(self.stop, self.request_reload if self.reloadable else None)
            return self._run()
        finally:
            if own:
                stop_signals.release()

    def _run(self) -> dict[str, Summary]:
        inspectors = {name: self.models.inspector(name, source) for name, source in self.config.sources.items()}
        if self.reloadable and self.config.http.enabled:
            self._start_http()
        guard = self._guard(self.config)
        for name, source in self.config.sources.items():
            self._start_runner(name, source, inspectors[name], guard)
        try:
            self._wait_attempted()
            self._start_outboxes(self.config)  # each source has made its ledger by now
            if self._stop.is_set() is False:
                if self.systemd:
                    notify.ready()
                log.info("Serving %d source(s): %s", len(self.runners), ", ".join(self.runners))
            while not self._stop.is_set():
                self._stop.wait(_TICK)
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload()
                if not self.reloadable and all(not r.alive for r in self.runners.values()):
                    break  # watch: the source ended (a video file) or failed
                self._tick()
        finally:
            self.stop()
            if self.systemd:
                notify.stopping()
            failure = None
            for runner in self.runners.values():
                try:
                    runner.join()
                except BaseException as exc:  # noqa: BLE001  (the first one is raised below)
                    failure = failure or exc
            self._stop_outboxes()
            if self.http is not None:
                self.http.stop()
            if self._janitor_thread is not None:
                self._janitor_thread.join(timeout=30)
        if failure is not None:
            raise failure
        return {name: runner.summary for name, runner in self.runners.items()}

    def _start_runner(self, name: str, source, inspector, guard, *, rescan_backlog: bool = False) -> None:
        runner = SourceRunner(name, source, inspector, retry=self.reloadable, metrics=self.metrics,
                              disk_guard=guard, systemd=self._watcher_systemd,
                              rescan_backlog=rescan_backlog, on_commit=lambda: self._wake(name))
        self.runners[name] = runner
        if self.metrics is not None:
            self.metrics.model(name, sha256=inspector.card.data["files"][inspector.precision]["sha256"],
                               precision=inspector.precision, criterion=inspector.criterion,
                               threshold=float(inspector.entry["threshold"]), device=inspector.device)
        retention = source.retention
        if self.reloadable and any(v is not None for k, v in retention.model_dump().items() if k != "interval"):
            runner.janitor_config = retention
        runner.start()

    # ------------------------------------------------------------ the outbox

    def _start_outboxes(self, config: ServiceConfig) -> None:
        """One outbox per network sink and source it serves, each reading that source's ledger."""
        from edge_inspect.outbox import Outbox

        for cursor, section in config.outputs():
            for name in section.sources or tuple(config.sources):
                source = config.sources[name]
                sink = make_sink(cursor, section, source=name, installation=config.installation)
                outbox = Outbox(name, source.ledger_path, sink, installation=config.installation,
                                batch=section.batch, max_age=section.max_backlog_age,
                                max_rows=section.max_backlog_rows, start_at=section.start_at, metrics=self.metrics)
                self.outboxes[(name, sink.name)] = outbox
                outbox.start()

    def _stop_outboxes(self) -> None:
        for outbox in self.outboxes.values():
            outbox.stop()
        for outbox in self.outboxes.values():
            outbox.join(timeout=60)
        self.outboxes.clear()

    def _wake(self, source: str) -> None:
        for (name, _), outbox in list(self.outboxes.items()):
            if name == source:
                outbox.wake()

    def _wait_attempted(self) -> None:
        for runner in self.runners.values():
            while not runner.attempted.wait(_TICK):
                if self._stop.is_set() or not runner.alive:
                    break

    def _guard(self, config: ServiceConfig):
        if not self.reloadable:
            return None
        from edge_inspect.retention import DiskGuard

        guard = DiskGuard(int(config.disk.min_free))
        return guard.low

    # ------------------------------------------------------------ each turn

    def _tick(self) -> None:
        now = time.monotonic()
        if self.systemd and now - self._last_watchdog >= 1.0:
            if all(r.alive_for_watchdog(now) for r in self.runners.values()):
                self._last_watchdog = now
                notify.watchdog()
            notify.status(self.status_line())
        self._retention()

    def status_line(self) -> str:
        """STATUS= for systemd: each source's live counts."""
        parts = []
        for name, runner in self.runners.items():
            watcher = runner.watcher
            counts = dict(getattr(watcher, "_counts", {})) if watcher is not None else {}
            state = "failed, retrying" if runner.retry_at is not None else "ok"
            parts.append(f"{name}: {counts.get('ok', 0)} ok, {counts.get('ng', 0)} ng, {counts.get('error', 0)} error"
                         f"{'' if state == 'ok' else f' ({state})'}")
        return "; ".join(parts)

    def _retention(self) -> None:
        if self._janitor_thread is not None and self._janitor_thread.is_alive():
            return
        due = []
        now = time.time()
        for name, runner in self.runners.items():
            retention = getattr(runner, "janitor_config", None)
            if retention is None or runner.ledger is None:
                continue
            janitor = self._janitors.get(name)
            if janitor is None or janitor.ledger is not runner.ledger:
                from edge_inspect.retention import Janitor

                cfg = runner.config
                janitor = Janitor(name, retention, runner.ledger,
                                  sorted_root=cfg.path if isinstance(cfg, FolderSource) and cfg.sinks.sort else None,
                                  heatmaps=cfg.sinks.heatmaps,
                                  hot_folder=cfg.path if isinstance(cfg, FolderSource) else None)
                self._janitors[name] = janitor
            if janitor.due(now):
                due.append(janitor)
        if due:
            def run():
                for janitor in due:
                    try:
                        janitor.run_once()
                    except EdgeInspectError as exc:
                        log.error("Retention of source %s failed: %s", janitor.name, exc)
            self._janitor_thread = threading.Thread(target=run, name="retention", daemon=True)
            self._janitor_thread.start()

    # ------------------------------------------------------------ HTTP

    def _start_http(self) -> None:
        from edge_inspect.metrics import HttpServer, Metrics

        self.metrics = Metrics()
        self.metrics.set_live(self.live)
        self.http = HttpServer(self.config.http.address, self.config.http.port, self.metrics, self.health)
        self.http.start()
        log.info("Health and metrics on http://%s:%d/healthz and /metrics", self.config.http.address, self.http.port)

    def live(self) -> dict:
        from edge_inspect.metrics import DeliveryLive

        now = time.monotonic()
        out = {}
        for name, runner in list(self.runners.items()):
            deliveries = {sink: DeliveryLive(backlog=o.backlog_rows, oldest_age=o.backlog_age, up=o.outage is None,
                                             alarm=o.alarm is not None)
                          for (source, sink), o in list(self.outboxes.items()) if source == name}
            out[name] = replace(runner.live(now), deliveries=deliveries)
        return out

    def health(self) -> tuple[bool, dict]:
        """``(healthy, body)`` for /healthz: healthy when every source is."""
        now = time.monotonic()
        sources = {}
        for name, runner in list(self.runners.items()):
            healthy, reason = runner.health(now)
            watcher = runner.watcher
            counts = dict(getattr(watcher, "_counts", {})) if watcher is not None else {}
            deliveries = {sink: {"backlog": o.backlog_rows, "oldest_age_s": o.backlog_age, "outage": o.outage,
                                 "alarm": o.alarm, "delivered": o.delivered}
                          for (source, sink), o in list(self.outboxes.items()) if source == name}
            alarms = [f"{sink}: {d['alarm']}" for sink, d in deliveries.items() if d["alarm"]]
            if healthy and alarms:  # a backlog over its caps: someone must look, though inspection goes on
                healthy, reason = False, "delivery backlog over its caps: " + "; ".join(alarms)
            sources[name] = {"healthy": healthy, "reason": reason, "kind": runner.config.kind,
                             "last_progress_age_s": round(runner.progress_age(now), 3),
                             "verdicts": {k: counts.get(k, 0) for k in ("ok", "ng", "error")},
                             "sinks_paused": bool(watcher is not None and watcher.paused),
                             "deliveries": deliveries}
        healthy = all(s["healthy"] for s in sources.values())
        body = {"status": "ok" if healthy else "unhealthy", "sources": sources,
                "unhealthy": {n: s["reason"] for n, s in sources.items() if not s["healthy"]},
                "reload": {"count": self.reloads, "error": self.reload_error}}
        return healthy, body

    # ------------------------------------------------------------ reload

    def _do_reload(self) -> None:
        from edge_inspect import config as configuration

        log.info("SIGHUP: reloading the configuration%s and the models.",
                 f" from {self.config_path}" if self.config_path else "")
        try:
            new = configuration.load(self.config_path, overrides=self.overrides)
            problems = configuration.check(new)
            if problems:
                raise ConfigError("\n".join(problems))
            if new.http != self.config.http:
                raise ConfigError("At 'http': the HTTP address and port cannot change on reload. Restart the "
                                  "service for that.", key="http")
            models = Models()
            inspectors = {name: models.inspector(name, source) for name, source in new.sources.items()}
        except EdgeInspectError as exc:
            self.reload_error = str(exc)
            log.error("Reload failed; the running configuration stays: %s", exc)
            if self.metrics is not None:
                self.metrics.reloaded(False)
            return
        old = self.config
        guard = self._guard(new)
        for name in set(old.sources) - set(new.sources):
            log.info("Reload: source %s removed; stopping it.", name)
            runner = self.runners.pop(name)
            runner.stop()
            runner.join()
            self._janitors.pop(name, None)
            if self.metrics is not None:
                self.metrics.forget(name)
        for name, source in new.sources.items():
            runner = self.runners.get(name)
            if runner is not None and source == old.sources[name] and _same_model(runner.inspector,
                                                                                   inspectors[name]):
                continue
            if runner is not None:
                log.info("Reload: source %s changed; finishing its parts in hand under the old configuration.", name)
                runner.stop()
                runner.join()
                self._janitors.pop(name, None)
            else:
                log.info("Reload: source %s added.", name)
            self._start_runner(name, source, inspectors[name], guard, rescan_backlog=True)
        if new.outputs() != old.outputs() or new.sources != old.sources or new.service != old.service:
            self._stop_outboxes()  # cursors are in the ledgers: nothing acknowledged is sent again, nothing skipped
            self._start_outboxes(new)
        self.config = new
        self.models = models
        self.reload_error = None
        self.reloads += 1
        if self.metrics is not None:
            self.metrics.reloaded(True)
        log.info("Reload done: %d source(s).", len(self.runners))


def _same_model(a, b) -> bool:
    return (a.card.data["files"][a.precision]["sha256"] == b.card.data["files"][b.precision]["sha256"]
            and a.criterion == b.criterion and a.entry == b.entry)


def make_sink(cursor: str, section, *, source: str, installation: str):
    """The network sink of a configuration section, for one source."""
    if cursor == "mqtt":
        from edge_inspect.sinks.mqtt import MqttSink

        return MqttSink(section, source=source, installation=installation)
    if cursor == "opcua":
        from edge_inspect.sinks.opcua import OpcUaSink

        return OpcUaSink(section, source=source, installation=installation)
    from edge_inspect.sinks.webhook import WebhookSink

    return WebhookSink(section, name=cursor.split(":", 1)[1], source=source, installation=installation)
