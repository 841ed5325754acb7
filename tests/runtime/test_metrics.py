"""Metrics and health over real HTTP: what was fed is what a scrape shows, and hostile clients do no harm.

Every scrape goes through a real :class:`HttpServer` on 127.0.0.1 (port 0)
and is parsed with prometheus_client's own parser. The hostile cases use raw
sockets, since httpx would not send them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_inspect.errors import ConfigError, InputError
from edge_inspect.imageheader import check_pixels
from edge_inspect.ledger import Record, file_identity, frame_identity
from edge_inspect.metrics import REASONS, HttpServer, Metrics, SourceLive, error_reason, health_report
from edge_inspect.preprocess import decode_image, preprocess
from edge_inspect.watch import read_file

TIMEOUT = 1.0  # the hostile-client server's request deadline
SLOTS = 8  # and its concurrent requests


# ------------------------------------------------------------------ helpers


def record(verdict: str = "ok", *, latency_ms: float = 12.0, error: str | None = None, n: int = 0) -> Record:
    now = time.time()
    return Record(identity=file_identity(f"/line/p{n}.png", 100, n, f"{n:064x}"), kind="file",
                  source=f"/line/p{n}.png", verdict=verdict, arrived_at=now - latency_ms / 1e3, committed_at=now,
                  latency_ms=latency_ms, size=100, mtime_ns=n, sha256=f"{n:064x}",
                  score=None if verdict == "error" else 0.5, threshold=1.0, criterion="range", error=error,
                  batch_size=None if verdict == "error" else 4)


def frame(verdict: str, n: int) -> Record:
    now = time.time()
    return Record(identity=frame_identity("rtsp://cam/1", now, n), kind="frame", source="rtsp://cam/1",
                  verdict=verdict, arrived_at=now, committed_at=now, latency_ms=40.0, frame_index=n, frame_time=now)


def live(**changes) -> SourceLive:
    values = dict(kind="folder", queued={"read": 3, "inspect": 1, "commit": 0}, sink_backlog=7,
                  oldest_pending_age=42.5, disk_free={"/srv/line2": 5_000_000_000}, low_disk=False, healthy=True,
                  reason=None, last_progress_age=0.8, running=True)
    values.update(changes)
    return SourceLive(**values)


def scrape(server: HttpServer) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted label items: value}, parsed by prometheus_client's parser."""
    response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("edge_inspect_")
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def series(samples: dict, name: str, **labels) -> dict[tuple, float]:
    """The samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {k: v for k, v in samples.get(name, {}).items() if want <= set(k)}


def value(samples: dict, name: str, **labels) -> float:
    (found,) = series(samples, name, **labels).values()
    return found


def raw(server: HttpServer, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read the whole response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.fixture
def metrics():
    return Metrics()


@pytest.fixture
def health_state():
    return {"live": {}}


@pytest.fixture
def server(metrics, health_state):
    metrics.set_live(lambda: health_state["live"])
    server = HttpServer("127.0.0.1", 0, metrics, lambda: health_report(health_state["live"]),
                        timeout_s=TIMEOUT, max_connections=SLOTS)
    server.start()
    yield server
    server.stop()


# ------------------------------------------------------------------ counting


def test_counts_per_source_and_verdict_match_what_was_fed(metrics, server):
    metrics.committed("line1", [record("ok", n=i) for i in range(5)] + [record("ng", n=9)])
    metrics.committed("line1", [record("ok", n=10), record("error", error="x.png: vanished before it could be read "
                                                                            "(deleted or moved away).", n=11)])
    metrics.committed("cam", [frame("ng", 1), frame("ng", 2), frame("ok", 3)])
    metrics.committed("line3", [])
    got = scrape(server)
    parts = series(got, "edge_inspect_parts_total")
    assert parts == {
        (("source", "line1"), ("verdict", "ok")): 6.0, (("source", "line1"), ("verdict", "ng")): 1.0,
        (("source", "line1"), ("verdict", "error")): 1.0,
        (("source", "cam"), ("verdict", "ok")): 1.0, (("source", "cam"), ("verdict", "ng")): 2.0,
        (("source", "cam"), ("verdict", "error")): 0.0,
        # a source that committed nothing yet still shows its zeros, so that rate() sees its first part
        (("source", "line3"), ("verdict", "ok")): 0.0, (("source", "line3"), ("verdict", "ng")): 0.0,
        (("source", "line3"), ("verdict", "error")): 0.0,
    }
    assert value(got, "edge_inspect_part_errors_total", source="line1", reason="vanished") == 1.0
    assert not any(name.endswith("_created") for name in got)


def test_errors_are_counted_by_reason(metrics, server):
    errors = ["a.png: vanished before it could be read (deleted or moved away).",
              "b.png: the file is empty (0 bytes); it was probably not written completely.",
              "c.png: truncated JPEG (no end-of-image marker); the file was cut short.",
              "d.png: truncated JPEG (no end-of-image marker); the file was cut short.",
              "something no rule knows"]
    metrics.committed("line1", [record("error", error=e, n=i) for i, e in enumerate(errors)] + [record("ok", n=99)])
    got = scrape(server)
    assert series(got, "edge_inspect_part_errors_total") == {
        (("reason", "vanished"), ("source", "line1")): 1.0, (("reason", "empty"), ("source", "line1")): 1.0,
        (("reason", "truncated"), ("source", "line1")): 2.0, (("reason", "other"), ("source", "line1")): 1.0}
    assert value(got, "edge_inspect_parts_total", source="line1", verdict="error") == 5.0


def test_latency_histogram_counts_arrival_to_commit_in_seconds(metrics, server):
    metrics.committed("line1", [record(latency_ms=0.5, n=1), record(latency_ms=30, n=2), record(latency_ms=30, n=3),
                                record(latency_ms=20_000, n=4)])
    got = scrape(server)
    buckets = {dict(k)["le"]: v for k, v in series(got, "edge_inspect_part_latency_seconds_bucket",
                                                   source="line1").items()}
    assert buckets["0.001"] == 1 and buckets["0.025"] == 1 and buckets["0.05"] == 3 and buckets["10.0"] == 3
    assert buckets["+Inf"] == 4
    assert value(got, "edge_inspect_part_latency_seconds_count", source="line1") == 4
    assert value(got, "edge_inspect_part_latency_seconds_sum", source="line1") == pytest.approx(20.0605)


def test_inference_and_batch_size_histograms(metrics, server):
    for batch, seconds in ((1, 0.004), (4, 0.012), (4, 0.013), (8, 3.0)):
        metrics.inferred("line1", batch, seconds)
    metrics.observer("line2").inferred(2, 0.002)  # what a watcher's observer calls
    metrics.observer("line2").committed([record(n=1)])
    got = scrape(server)
    assert value(got, "edge_inspect_inference_seconds_count", source="line1") == 4
    assert value(got, "edge_inspect_inference_seconds_sum", source="line1") == pytest.approx(3.029)
    assert value(got, "edge_inspect_inference_seconds_bucket", source="line1", le="0.025") == 3
    assert value(got, "edge_inspect_inference_batch_size_bucket", source="line1", le="4.0") == 3
    assert value(got, "edge_inspect_inference_batch_size_sum", source="line1") == 17
    assert value(got, "edge_inspect_inference_batch_size_count", source="line2") == 1
    assert value(got, "edge_inspect_parts_total", source="line2", verdict="ok") == 1


def test_failures_reconnects_and_reloads_are_counted(metrics, server):
    metrics.source_failed("line1", "Hot folder /srv/line1 cannot be checked any more")
    metrics.source_failed("line1", "again")
    metrics.camera_reconnected("cam")
    metrics.reloaded(True)
    metrics.reloaded(False)
    metrics.reloaded(False)
    got = scrape(server)
    assert value(got, "edge_inspect_source_failures_total", source="line1") == 2
    assert value(got, "edge_inspect_source_last_failure_timestamp_seconds", source="line1") == pytest.approx(
        time.time(), abs=60)
    assert value(got, "edge_inspect_camera_reconnects_total", source="cam") == 1
    assert series(got, "edge_inspect_reloads_total") == {(("result", "ok"),): 1.0, (("result", "failed"),): 2.0}
    # free text never becomes a label
    assert all(dict(k).keys() == {"source"} for k in series(got, "edge_inspect_source_failures_total"))


def test_model_twice_keeps_one_series_with_the_new_labels(metrics, server):
    metrics.model("line1", sha256="a" * 64, precision="fp32", criterion="range", threshold=0.31, device="cpu")
    metrics.model("line2", sha256="c" * 64, precision="fp32", criterion="range", threshold=1.0, device="cpu")
    metrics.model("line1", sha256="b" * 64, precision="int8", criterion="ssim", threshold=0.27, device="cuda:0")
    got = scrape(server)
    (labels,) = series(got, "edge_inspect_model_info", source="line1")
    assert dict(labels) == {"source": "line1", "sha256": "b" * 64, "precision": "int8", "criterion": "ssim",
                            "threshold": "0.27", "device": "cuda:0"}
    assert len(series(got, "edge_inspect_model_info")) == 2
    assert value(got, "edge_inspect_model_threshold", source="line1") == 0.27
    assert value(got, "edge_inspect_build_info") == 1


def test_forget_removes_every_series_of_a_source(metrics, server):
    empty = "x: the file is empty (0 bytes); it was probably not written completely."
    for source in ("line1", "line2"):
        metrics.committed(source, [record("ok", n=1), record("error", error=empty, n=2)])
        metrics.inferred(source, 2, 0.01)
        metrics.source_failed(source, "boom")
        metrics.camera_reconnected(source)
        metrics.model(source, sha256="a" * 64, precision="fp32", criterion="range", threshold=0.3, device="cpu")
    metrics.forget("line1")
    metrics.forget("never-there")
    got = scrape(server)
    everything = [dict(k) for samples in got.values() for k in samples]
    assert not [labels for labels in everything if labels.get("source") == "line1"]
    assert value(got, "edge_inspect_parts_total", source="line2", verdict="ok") == 1
    assert value(got, "edge_inspect_model_threshold", source="line2") == 0.3
    # a source that comes back starts from zero
    metrics.committed("line1", [record("ng", n=3)])
    got = scrape(server)
    assert value(got, "edge_inspect_parts_total", source="line1", verdict="ng") == 1
    assert value(got, "edge_inspect_parts_total", source="line1", verdict="ok") == 0


def test_labels_that_are_not_utf8_do_not_break_the_scrape(metrics, server, health_state):
    bad = os.fsdecode(b"/srv/bad\xff")
    health_state["live"] = {"line1": live(disk_free={bad: 10})}
    metrics.committed("line\udcff", [record("ok", n=1)])
    metrics.model("line1", sha256="\udcff", precision="fp32", criterion="range", threshold=1, device="cpu")
    got = scrape(server)
    assert value(got, "edge_inspect_disk_free_bytes", source="line1", path="/srv/bad\\xff") == 10
    assert value(got, "edge_inspect_parts_total", source="line\\udcff", verdict="ok") == 1


def test_the_registry_is_the_metrics_own(metrics):
    from prometheus_client import REGISTRY

    metrics.committed("line1", [record(n=1)])
    assert REGISTRY.get_sample_value("edge_inspect_parts_total", {"source": "line1", "verdict": "ok"}) is None
    assert metrics.registry.get_sample_value("edge_inspect_parts_total", {"source": "line1", "verdict": "ok"}) == 1
    Metrics().committed("line1", [record(n=1)])  # a second instance registers the same names without clashing


# ------------------------------------------------------------------ live gauges


def test_live_gauges_come_from_the_callback_at_each_scrape(metrics, server, health_state):
    health_state["live"] = {
        "line1": live(),
        "cam": live(kind="camera", queued={"read": 0}, sink_backlog=0, oldest_pending_age=None,
                    disk_free={"/var/lib/edge": 123, "/srv/heatmaps": 456}, low_disk=True, healthy=False,
                    reason="low disk", last_progress_age=31.0, running=False),
    }
    got = scrape(server)
    assert value(got, "edge_inspect_queued_parts", source="line1", stage="read") == 3
    assert value(got, "edge_inspect_queued_parts", source="line1", stage="inspect") == 1
    assert value(got, "edge_inspect_queued_parts", source="cam", stage="read") == 0
    assert value(got, "edge_inspect_sink_backlog_parts", source="line1") == 7
    assert value(got, "edge_inspect_sink_oldest_pending_age_seconds", source="line1") == 42.5
    assert not series(got, "edge_inspect_sink_oldest_pending_age_seconds", source="cam")  # none pending: absent
    assert value(got, "edge_inspect_disk_free_bytes", source="line1", path="/srv/line2") == 5e9
    assert value(got, "edge_inspect_disk_free_bytes", source="cam", path="/srv/heatmaps") == 456
    assert value(got, "edge_inspect_low_disk", source="line1") == 0
    assert value(got, "edge_inspect_low_disk", source="cam") == 1
    assert value(got, "edge_inspect_source_up", source="line1", kind="folder") == 1
    assert value(got, "edge_inspect_source_up", source="cam", kind="camera") == 0
    assert value(got, "edge_inspect_source_healthy", source="cam") == 0
    assert value(got, "edge_inspect_source_last_progress_age_seconds", source="cam") == 31
    # read again at the next scrape: a removed source is gone, a new value shows
    health_state["live"] = {"line1": live(sink_backlog=0)}
    got = scrape(server)
    assert value(got, "edge_inspect_sink_backlog_parts", source="line1") == 0
    assert not [k for samples in got.values() for k in samples if dict(k).get("source") == "cam"]


def test_a_failing_callback_is_counted_and_the_rest_is_still_served(metrics, server):
    def broken():
        raise RuntimeError("the service's lock is poisoned")

    metrics.committed("line1", [record(n=1)])
    metrics.set_live(broken)
    got = scrape(server)
    assert value(got, "edge_inspect_live_errors_total") == 1
    assert value(got, "edge_inspect_parts_total", source="line1", verdict="ok") == 1
    assert "edge_inspect_source_up" not in got


# ------------------------------------------------------------------ /healthz


def test_healthz_is_200_when_every_source_is_healthy(server, health_state):
    health_state["live"] = {"line1": live(), "cam": live(kind="camera")}
    response = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["healthy"] is True and body["unhealthy"] == {}
    assert set(body["sources"]) == {"line1", "cam"} and body["sources"]["cam"]["kind"] == "camera"


def test_healthz_is_503_naming_each_unhealthy_source_and_why(server, health_state):
    health_state["live"] = {"line1": live(),
                            "line2": live(healthy=False, reason="no progress for 120 s: the inference stage is stuck"),
                            "cam": live(kind="camera", running=False, healthy=False,
                                        reason="camera rtsp://cam/1 does not answer; retrying in 30 s")}
    response = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    assert response.status_code == 503
    body = response.json()
    assert body["healthy"] is False
    assert body["unhealthy"] == {"line2": "no progress for 120 s: the inference stage is stuck",
                                 "cam": "camera rtsp://cam/1 does not answer; retrying in 30 s"}
    head = httpx.head(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    assert head.status_code == 503 and head.content == b"" and int(head.headers["content-length"]) > 0


def test_a_health_check_that_raises_is_503_without_its_text(metrics):
    def broken():
        raise RuntimeError("secret internals")

    server = HttpServer("127.0.0.1", 0, metrics, broken, timeout_s=TIMEOUT)
    server.start()
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        assert response.status_code == 503 and response.json()["healthy"] is False
        assert "secret" not in response.text
    finally:
        server.stop()


def test_health_report_without_a_reason_still_says_why():
    ok, body = health_report({"a": live(running=False, reason=None), "b": live(healthy=False, reason=None)})
    assert not ok
    assert body["unhealthy"]["a"].startswith("not running") and body["unhealthy"]["b"] == "unhealthy"
    assert health_report({}) == (True, {"healthy": True, "sources": {}, "unhealthy": {}})


# ------------------------------------------------------------------ routes


def test_head_and_query_strings_and_openmetrics(server, metrics):
    metrics.committed("line1", [record(n=1)])
    base = f"http://127.0.0.1:{server.port}"
    head = httpx.head(f"{base}/metrics", timeout=5)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 100
    assert httpx.get(f"{base}/metrics?debug=1&x=%ff", timeout=5).status_code == 200
    assert httpx.get(f"{base}/healthz?", timeout=5).status_code == 200
    om = httpx.get(f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=5)
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")


@pytest.mark.parametrize("method, path, code", [
    ("GET", "/", 404), ("GET", "/metrics/", 404), ("GET", "/../../etc/passwd", 404), ("GET", "/METRICS", 404),
    ("POST", "/metrics", 405), ("PUT", "/healthz", 405), ("DELETE", "/metrics", 405), ("OPTIONS", "/metrics", 405),
    ("TRACE", "/healthz", 405), ("BREW", "/metrics", 405), ("POST", "/nowhere", 404),
])
def test_other_paths_and_methods_are_404_and_405_with_small_bodies(server, method, path, code):
    response = httpx.request(method, f"http://127.0.0.1:{server.port}{path}", timeout=5)
    assert response.status_code == code
    assert len(response.content) < 64
    if code == 405:
        assert response.headers["allow"] == "GET, HEAD"


def test_a_request_with_a_body_is_refused_cleanly(server):
    for path, code in (("/metrics", 405), ("/upload", 404)):
        response = httpx.post(f"http://127.0.0.1:{server.port}{path}", content=b"z" * 200_000, timeout=5)
        assert response.status_code == code and b"z" not in response.content


@pytest.mark.parametrize("request_bytes, code", [
    (b"GET /<script>alert('ECHO')</script> HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /m\xc3\xa9trics\xff\xfe HTTP/1.1\r\nHost: \xff\xfe\r\nX-\xe9: \x00ECHO\r\n\r\n", 404),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Odd: \xff\xfeECHO\x01\r\n\r\n", 200),
    (b"ECHO\xff\xfe\r\n\r\n", 400),
    (b"GET /metrics HTTP/ECHO\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"G\x00T /ECHO HTTP/1.1\r\n\r\n", 404),
    (b"GET /metrics ECHO HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz\r\n\r\n", 200),  # HTTP/0.9 form
    (b"GET /metrics HTTP/1.1\r\nHost x no colon ECHO\r\n\r\n", 200),
])
def test_odd_requests_are_answered_without_echoing_them(server, request_bytes, code):
    response = raw(server, request_bytes)
    assert status(response) == code
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"ECHO" not in response and b"script" not in response and b"\xff" not in response
    if code >= 400:
        assert body.startswith(str(code).encode()) and len(body) < 64


def test_a_client_that_connects_and_closes_does_no_harm(server):
    for _ in range(20):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /metr")
        sock.shutdown(socket.SHUT_WR)  # half a request, then EOF
        read_all(sock)
    assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200


# ------------------------------------------------------------------ hostile clients


def test_a_client_that_sends_nothing_is_dropped_within_the_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        began = time.monotonic()
        response = read_all(sock)
        took = time.monotonic() - began
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 1.5
    assert status(response) == 408


def test_a_slowloris_client_is_dropped_within_the_timeout_while_another_is_served(server):
    """One header byte every 0.1 s resets no clock: the deadline covers the whole request head."""
    dropped = threading.Event()
    outcome = {}

    def slowloris():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            began = time.monotonic()
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            try:
                for _ in range(100):  # 10 s of trickle if nobody stops it
                    sock.sendall(b"X")
                    time.sleep(0.1)
            except OSError:
                pass
            outcome["response"] = read_all(sock)
            outcome["took"] = time.monotonic() - began
            dropped.set()

    thread = threading.Thread(target=slowloris, daemon=True)
    thread.start()
    time.sleep(0.3)
    for _ in range(3):  # served meanwhile
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    assert dropped.wait(TIMEOUT + 3)
    assert outcome["took"] < TIMEOUT + 1.5
    if outcome["response"]:  # the 408, unless the trickle's reset overtook it
        assert status(outcome["response"]) == 408


def test_many_idle_connections_get_503_and_never_more_threads_than_the_bound(server):
    before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(200)]
    try:
        time.sleep(0.3)
        assert threading.active_count() <= before + SLOTS
        assert server.in_flight == SLOTS
        # those over the bound were answered 503 at once, and closed; a few that waited in the kernel's accept
        # queue until a slot was free get theirs, and a 408 at the deadline
        codes = []
        for sock in socks[SLOTS:]:
            sock.settimeout(TIMEOUT + 2)
            response = read_all(sock)
            if response:
                codes.append(status(response))
        assert set(codes) <= {503, 408} and codes.count(503) >= 100
        assert threading.active_count() <= before + SLOTS
        # the idle ones inside the bound are dropped at the deadline, and the server serves again
        time.sleep(TIMEOUT + 0.5)
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_200_concurrent_scrapes_are_each_answered_and_threads_stay_bounded(server, metrics):
    metrics.committed("line1", [record(n=i) for i in range(50)])
    before = threading.active_count()
    peak = [0]
    stop = threading.Event()

    def watch_threads():
        while not stop.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.005)

    def one(_):
        try:
            return httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).status_code
        except httpx.TransportError:  # a 503 whose connection was reset before it was read
            return "reset"

    watcher = threading.Thread(target=watch_threads, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(200) as pool:
        outcomes = list(pool.map(one, range(200)))
    stop.set()
    watcher.join()
    assert set(outcomes) <= {200, 503, "reset"}
    assert outcomes.count(200) >= SLOTS
    # the pool's 200 threads and the watcher, and no more than the bound on the server's side
    assert peak[0] <= before + 200 + 1 + SLOTS
    assert httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).status_code == 200


def test_a_1mb_header_is_refused_without_reading_it(server):
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        began = time.monotonic()
        try:
            sock.sendall(head)
        except OSError:  # the server may close before the last byte
            pass
        response = read_all(sock)
    assert time.monotonic() - began < 5
    if response:
        assert status(response) == 431 and len(response) < 512
    assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("head", [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",  # one long header
    b"GET /" + b"m" * 20_000 + b" HTTP/1.1\r\n\r\n",  # a long request line
    b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(60)) + b"\r\n",  # over 50 headers
    b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",  # over http.client's 100
])
def test_a_large_head_or_too_many_headers_is_431(server, head):
    response = raw(server, head)
    assert status(response) == 431
    assert len(response) < 512


def test_clients_that_never_read_their_response_are_dropped_at_the_write_deadline(server, metrics):
    """A response larger than the socket buffers blocks in sendall until the deadline, then the slot is free."""
    paths = {f"/srv/{i:06d}/" + "p" * 400: i for i in range(15_000)}  # about 6 MB of /metrics
    metrics.set_live(lambda: {"big": live(disk_free=paths)})
    socks = []
    try:
        for _ in range(SLOTS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            socks.append(sock)
        peak, deadline = 0, time.monotonic() + 5
        while peak < SLOTS and time.monotonic() < deadline:
            peak = max(peak, server.in_flight)
            time.sleep(0.02)
        assert peak == SLOTS  # every slot stuck writing at once: the case under test
        deadline = time.monotonic() + 3 * TIMEOUT + 5  # rendering 6 MB eight times, and the write deadline
        while server.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.in_flight == 0
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    finally:
        for sock in socks:
            sock.close()


# ------------------------------------------------------------------ binding


def test_binds_to_exactly_the_configured_address(server):
    assert server._server.socket.getsockname() == ("127.0.0.1", server.port)
    assert server.port > 0


def test_a_taken_port_is_a_config_error_naming_http_port(server, metrics):
    other = HttpServer("127.0.0.1", server.port, metrics, lambda: (True, {}))
    with pytest.raises(ConfigError) as caught:
        other.start()
    assert caught.value.key == "http.port"
    assert "http.port" in str(caught.value) and str(server.port) in str(caught.value)
    assert "already in use" in str(caught.value)


def test_an_address_not_on_this_pc_is_a_config_error_naming_http_address(metrics):
    server = HttpServer("192.0.2.1", 0, metrics, lambda: (True, {}))  # TEST-NET-1: never a local address
    with pytest.raises(ConfigError) as caught:
        server.start()
    assert caught.value.key == "http.address" and "http.address" in str(caught.value)


def test_stop_closes_the_port_and_a_new_server_can_take_it(metrics):
    first = HttpServer("127.0.0.1", 0, metrics, lambda: (True, {}))
    first.start()
    port = first.port
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    first.stop()
    first.stop()  # twice is harmless
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    second = HttpServer("127.0.0.1", port, metrics, lambda: (False, {"why": "test"}))
    second.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 503
    finally:
        second.stop()


def test_stop_before_start_is_harmless(metrics):
    HttpServer("127.0.0.1", 0, metrics, lambda: (True, {})).stop()


# ------------------------------------------------------------------ error reasons


def _input_error(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """A real file of every accepted format, encoded by OpenCV."""
    picture = (np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(40, 48, 3)
    return {ext: cv2.imencode(ext, picture)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm")}


def test_reasons_of_the_watchers_read_errors(tmp_path, monkeypatch):
    """The messages of edge_inspect.watch.read_file, raised for real."""
    image = tmp_path / "p.png"
    image.write_bytes(b"x" * 100)
    assert error_reason(_input_error(read_file, tmp_path / "gone.png", 1 << 20)) == "vanished"
    assert error_reason(_input_error(read_file, tmp_path, 1 << 20)) == "not_a_file"
    os.mkfifo(tmp_path / "pipe.png")
    assert error_reason(_input_error(read_file, tmp_path / "pipe.png", 1 << 20)) == "not_a_file"
    assert error_reason(_input_error(read_file, image, 10)) == "too_large"

    real_open, real_read = os.open, os.read

    def denied(path, *args, **kwargs):
        if Path(path) == image:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)  # the tests may run as root, whom a file mode does not stop
    assert error_reason(_input_error(read_file, image, 1 << 20)) == "permission"

    def busy(path, *args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", busy)
    assert error_reason(_input_error(read_file, image, 1 << 20)) == "unreadable"
    monkeypatch.setattr(os, "open", real_open)

    def failing(fd, n):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "read", failing)
    assert error_reason(_input_error(read_file, image, 1 << 20)) == "unreadable"
    monkeypatch.setattr(os, "read", real_read)


def test_reasons_of_the_decoders_errors(images):
    """The messages of edge_inspect.preprocess and edge_inspect.imageheader, raised for real."""
    png, jpeg = images[".png"], images[".jpg"]
    broken = bytearray(png)
    at = png.index(b"IDAT") + 4
    broken[at:at + 32] = bytes(b ^ 0x5A for b in broken[at:at + 32])  # a sound header, garbled pixels
    cases = {
        "empty": (decode_image, b"", "p.png"),
        "truncated": [(decode_image, jpeg[:-10], "p.jpg"), (decode_image, png[:len(png) // 2], "p.png"),
                      (decode_image, png[:40], "p.png")],
        "not_an_image": (decode_image, b"hello, this is text", "p.png"),
        "unsupported_format": (decode_image, b"GIF89a\x04\x00\x04\x00\x00\x00\x00;", "p.gif"),
        "too_large": [(decode_image, png, "p.png", 100), (check_pixels, "frame 3", 5000, 5000, 1000)],
        "corrupt": [(decode_image, bytes(broken), "p.png"),
                    (decode_image, b"\x89PNG\r\n\x1a\n" + bytes(40), "p.png")],
        "bad_frame": [(preprocess, np.zeros((4, 4), np.int64), (32, 32)),
                      (preprocess, np.zeros((4, 4, 2), np.uint8), (32, 32))],
    }
    for reason, calls in cases.items():
        for call, *args in (calls if isinstance(calls, list) else [calls]):
            assert error_reason(_input_error(call, *args)) == reason, (reason, args[1:])


def test_the_inspectors_own_error_has_a_reason():
    from edge_inspect import inspector

    source = Path(inspector.__file__).read_text()
    assert "the residual is not finite (NaN or infinity" in source  # the message this test relies on
    assert error_reason("the residual is not finite (NaN or infinity in the image or the model output); check the "
                        "image source and the model") == "not_finite"


def test_truncating_a_real_image_anywhere_gives_a_reason_never_other(images):
    for ext, data in images.items():
        seen = set()
        for n in range(0, len(data), max(1, len(data) // 97)):
            try:
                decode_image(data[:n], f"p{ext}")
            except InputError as exc:
                seen.add(error_reason(str(exc)))
        assert seen <= {"empty", "truncated", "not_an_image", "corrupt"}, (ext, seen)
        if ext in (".png", ".jpg", ".webp", ".tiff"):  # formats whose header says how long they are
            assert "truncated" in seen, ext


@pytest.mark.parametrize("name", [
    "x: vanished before it could be read (deleted or moved away).png",
    "x: the file is empty (0 bytes); it was probably not written completely.",
    "a: not a readable image: a PNG file, but it is cut short; not decoded (the file is truncated, corrupt or "
    "crafted).png",
    "weird ünïcødé \udcff name.png",
])
def test_a_file_name_cannot_pass_for_another_reason(name):
    message = f"{name}: permission denied; the watcher's user cannot read it. Check the file's owner and mode."
    assert error_reason(message) == "permission"
    message = f"{name}: not a readable image: a PNG file, but its first chunk is not a 13-byte IHDR; not decoded " \
              f"(the file is truncated, corrupt or crafted)."
    assert error_reason(message) == "corrupt"


def test_every_reason_is_one_of_the_known_few():
    texts = [None, "", "?", "x" * 10_000, "\x00\udcff", "p.png: cannot be opened (No such device).",
             "p.png: 123 bytes, over the limit of 100 bytes that --max-pixels implies; not read. Raise --max-pixels "
             "if such images are expected."]
    assert {error_reason(t) for t in texts} <= set(REASONS)
    assert error_reason(None) == "other" and error_reason(texts[-1]) == "too_large"
