"""The webhook sink against a real HTTP(S) server on 127.0.0.1, driven by the real outbox over a real ledger.

The receiver here fails requests on cue (500, 503, a redirect, a 400),
answers some too late (it stored the verdict, the client gave up: the
verdict comes again), and records every body it accepts, as a receiver that
drops duplicates by the last sequence seen would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_inspect import __version__, outbox
from edge_inspect.config import Webhook
from edge_inspect.errors import ConfigError
from edge_inspect.ledger import Ledger, Record, file_identity
from edge_inspect.outbox import Outbox, message
from edge_inspect.sinks.webhook import WebhookError, WebhookSink

TOKEN = "Bearer s3cr3t-t0ken-4711"
#: The client's timeout in these tests; a slow answer comes after twice that.
TIMEOUT = 0.5


# ---------------------------------------------------------------- the receiver


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b"stored\n"
    headers: tuple[tuple[str, str], ...] = ()
    #: Seconds to wait before answering (the body is stored first when the status is 2xx).
    delay: float = 0.0


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    """An HTTP(S) server on a thread: ``script[n]`` answers the n-th request (from 0), the others get 200.

    Attributes:
        requests: every request, in arrival order.
        accepted: the JSON of every body it stored (answered 2xx, if perhaps too late), in arrival order.
    """

    def __init__(self, script: dict[int, Answer] | None = None, *, tls: tuple[Path, Path] | None = None):
        self.script = script or {}
        self.requests: list[Request] = []
        self.accepted: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.receiver = self
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/verdicts"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def server_bind(self) -> None:  # without HTTPServer's FQDN lookup (DNS)
        import socketserver

        socketserver.TCPServer.server_bind(self)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver: the client reuses its connection
    server: _Server

    def do_POST(self) -> None:  # noqa: N802  (the base class's name)
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with receiver.lock:
            answer = receiver.script.get(len(receiver.requests), Answer())
            receiver.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                             answer.status))
            if 200 <= answer.status < 300:
                receiver.accepted.append(json.loads(body))
        if answer.delay:
            receiver.stopping.wait(answer.delay)
        # A careless receiver echoes the request's headers in its error page.
        reply = answer.body.replace(b"{auth}", self.headers.get("Authorization", "").encode())
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value.replace("{port}", str(receiver.port)))
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        except OSError:
            pass  # the client gave up (a timeout): it will send the verdict again

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


# ---------------------------------------------------------------- the ledger and the outbox


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """The outbox's backoff, shortened: the failures here are many and the test is timed."""
    monkeypatch.setattr(outbox, "RETRY_FIRST_S", 0.02)
    monkeypatch.setattr(outbox, "RETRY_MAX_S", 0.1)


def commit_parts(ledger: Ledger, folder: Path, first: int, n: int) -> list[Record]:
    """Write n part files and commit their verdicts with true identities, as the watcher does: ok, ok, ng, error."""
    folder.mkdir(exist_ok=True)
    records = []
    for i in range(first, first + n):
        path = folder / f"part-{i:04d}.png"
        path.write_bytes(b"part %d" % i)
        data, st, now = path.read_bytes(), path.stat(), time.time()
        sha = hashlib.sha256(data).hexdigest()
        verdict = ("ok", "ok", "ng", "error")[i % 4]
        records.append(Record(
            identity=file_identity(path, st.st_size, st.st_mtime_ns, sha), kind="file", source=str(path),
            verdict=verdict, arrived_at=now - 0.004, committed_at=now, latency_ms=4.0, size=st.st_size,
            mtime_ns=st.st_mtime_ns, sha256=sha, score=None if verdict == "error" else 2.0 if verdict == "ng" else 0.5,
            threshold=1.0, criterion="range", model_sha256="5e" * 32, read_at=now - 0.003, inspected_at=now - 0.001,
            error=f"{path}: the file is empty (0 bytes); it was probably not written completely."
            if verdict == "error" else None))
    written = ledger.record(records)
    assert all(r is not None for r in written)
    return written


def webhook(url: str, **settings) -> Webhook:
    return Webhook(url=url, timeout=TIMEOUT, **settings)


def sink_for(config: Webhook) -> WebhookSink:
    return WebhookSink(config, name="mes", source="line2", installation="pc-17")


def start(ledger_path: Path, sink: WebhookSink, batch: int = 4) -> Outbox:
    box = Outbox("line2", ledger_path, sink, installation="pc-17", batch=batch, start_at="start", poll=0.02)
    box.start()
    return box


def drain(box: Outbox, rows: int, timeout: float = 15.0) -> None:
    """Wait until the outbox delivered ``rows`` verdicts, then stop it."""
    deadline = time.monotonic() + timeout
    while box.delivered < rows:
        assert time.monotonic() < deadline, f"{box.delivered} of {rows} verdicts delivered; outage: {box.outage}"
        time.sleep(0.02)
    box.stop()
    box.join(5)
    assert not box._thread.is_alive()


def deduplicated(accepted: list[dict]) -> tuple[list[int], int]:
    """What a receiver keeping the last sequence seen per source makes of the bodies: (new sequences, duplicates).

    Asserts there is no gap: a sequence above the last seen is always the next one.
    """
    last: dict[str, int] = {}
    new, duplicates = [], 0
    for body in accepted:
        seen = last.get(body["source"], 0)
        if body["sequence"] <= seen:
            duplicates += 1
            continue
        assert body["sequence"] == seen + 1 or not new, f"gap: {body['sequence']} after {seen}"
        last[body["source"]] = body["sequence"]
        new.append(body["sequence"])
    return new, duplicates


def outbox_logs(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge_inspect.outbox" and r.levelno == level]


# ---------------------------------------------------------------- delivery through the outbox


def test_every_verdict_arrives_in_order_through_failures_and_timeouts(tmp_path, caplog):
    """500s, 503s and late answers: nothing lost, duplicates carry the same id and bytes, the cursor ends at the end."""
    caplog.set_level(logging.DEBUG)
    failure = Answer(500, b"database locked; request had Authorization: {auth}")
    # Three outages: the first three requests fail, and two answers come too late.
    late = Answer(delay=2 * TIMEOUT)
    script = {0: failure, 1: Answer(503, b"busy"), 2: failure, 9: late, 23: late}
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger, Receiver(script) as receiver:
        ledger_id = ledger.ledger_id()
        records = commit_parts(ledger, tmp_path / "in", 0, 30)
        sink = sink_for(webhook(receiver.url + "?code=query-key-0815",
                                headers={"Authorization": TOKEN, "X-Line": "line 2"}))
        box = start(path, sink)
        time.sleep(0.2)
        records += commit_parts(ledger, tmp_path / "in", 30, 10)  # more verdicts while the outbox runs
        box.wake()
        drain(box, 40)
        assert ledger.cursor("webhook:mes") == records[-1].id

    ids = [r.id for r in records]
    new, duplicates = deduplicated(receiver.accepted)
    assert new == ids
    # Each late answer makes the outbox send its batch again: the late verdict at least, comes twice.
    assert duplicates >= 2 and len(receiver.accepted) == len(ids) + duplicates
    first: dict[str, bytes] = {}
    for request in receiver.requests:
        body = json.loads(request.body)
        assert request.headers["idempotency-key"] == body["id"] == f"pc-17:line2:{ledger_id}:{body['sequence']}"
        assert first.setdefault(body["id"], request.body) == request.body  # a duplicate is the same bytes
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"] == f"edge-inspect/{__version__}"
        assert request.headers["authorization"] == TOKEN and request.headers["x-line"] == "line 2"
        assert request.path == "/verdicts?code=query-key-0815"
    assert [b["verdict"] for b in receiver.accepted[:4]] == ["ok", "ok", "ng", "error"]

    # Each outage logged once when it starts, with the status and the start of the body, or the timeout, and once
    # when it ends; the retries within an outage at debug.
    failed = outbox_logs(caplog, logging.ERROR)
    assert len(failed) == len(outbox_logs(caplog, logging.INFO)) == 3
    assert "webhook:mes" in failed[0] and "500 Internal Server Error" in failed[0]
    assert "database locked; request had Authorization: ****" in failed[0]
    assert all("No answer from http://127.0.0.1:" in text and f"within {TIMEOUT:g} s" in text for text in failed[1:])
    # No header value, and not the URL's query, in any log line of any library.
    assert "s3cr3t" not in caplog.text and "query-key-0815" not in caplog.text


@pytest.mark.parametrize("refusal, said", [
    (Answer(302, b"moved", (("Location", "http://127.0.0.1:{port}/elsewhere?key=do-not-show"),)),
     "302 Found, a redirect to http://127.0.0.1:{port}/elsewhere?..., to verdict"),
    (Answer(400, b'{"error": "field \'line\' missing"}' + b" padding" * 60),
     "400 Bad Request to verdict"),
], ids=["3xx", "4xx"])
def test_a_redirect_or_a_client_error_is_an_outage_logged_once_and_retried(tmp_path, caplog, refusal, said):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger, Receiver({n: refusal for n in range(4)}) as receiver:
        records = commit_parts(ledger, tmp_path / "in", 0, 6)
        box = start(path, sink_for(webhook(receiver.url)), batch=3)
        drain(box, 6)
        assert ledger.cursor("webhook:mes") == records[-1].id
    assert deduplicated(receiver.accepted) == ([r.id for r in records], 0)
    assert [r.status for r in receiver.requests] == [refusal.status] * 4 + [200] * 6
    assert {r.path for r in receiver.requests} == {"/verdicts"}  # the redirect was not followed
    (failed,) = outbox_logs(caplog, logging.ERROR)
    assert said.format(port=receiver.port) in failed
    if refusal.status == 400:
        excerpt = re.search(r"acknowledgement: '(.*)'\. Verdicts wait", failed)[1].replace("\\'", "'")
        assert excerpt.startswith("{\"error\": \"field 'line' missing\"} padding") and len(excerpt) == 200
    (recovered,) = outbox_logs(caplog, logging.INFO)
    assert "works again" in recovered
    # (httpcore's debug lines quote the receiver's answer, its Location too: that is the receiver's text.)
    assert not [r for r in caplog.records if r.name.startswith("edge_inspect") and "do-not-show" in r.getMessage()]


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (only), and its key, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "receiver.pem", folder / "receiver.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=edge-inspect test receiver",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def test_https_with_the_receivers_ca_file_delivers(tmp_path, certificate):
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger, Receiver(tls=certificate) as receiver:
        records = commit_parts(ledger, tmp_path / "in", 0, 5)
        box = start(path, sink_for(webhook(receiver.url, verify=certificate[0])))
        drain(box, 5)
        assert ledger.cursor("webhook:mes") == records[-1].id
    assert deduplicated(receiver.accepted) == ([r.id for r in records], 0)


def test_https_to_a_host_the_certificate_does_not_name_fails_clearly(tmp_path, certificate):
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger, Receiver(tls=certificate) as receiver:
        (record,) = commit_parts(ledger, tmp_path / "in", 0, 1)
        sink = sink_for(webhook(receiver.url.replace("127.0.0.1", "localhost"), verify=certificate[0]))
        sink.open()
        with pytest.raises(WebhookError, match=r"certificate of https://localhost:\d+/verdicts is for another host "
                                               r"\(.*\)\. Write the host name .* in webhooks\.mes\.url"):
            sink.deliver([message(record, source="line2", installation="pc-17", ledger_id=ledger.ledger_id())])
        sink.close()


def test_https_with_a_certificate_the_system_does_not_trust_fails_clearly(tmp_path, certificate):
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger, Receiver(tls=certificate) as receiver:
        (record,) = commit_parts(ledger, tmp_path / "in", 0, 1)
        sink = sink_for(webhook(receiver.url, verify=True))
        sink.open()
        try:
            with pytest.raises(WebhookError) as failure:
                sink.deliver([message(record, source="line2", installation="pc-17", ledger_id=ledger.ledger_id())])
        finally:
            sink.close()
    said = str(failure.value)
    assert said.startswith(f"The TLS certificate of https://127.0.0.1:{receiver.port}/verdicts is not trusted")
    assert "self-signed certificate" in said and "this PC's trusted CAs" in said
    assert "Set webhooks.mes.verify to the PEM file of the CA" in said
    assert receiver.requests == []


# ---------------------------------------------------------------- the sink alone


def test_each_failure_says_what_happened(tmp_path):
    """A status with the start of the body, a timeout, a refused connection: one message each, no header value."""
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        (record,) = commit_parts(ledger, tmp_path / "in", 0, 1)
        batch = [message(record, source="line2", installation="pc-17", ledger_id=ledger.ledger_id())]
        script = {0: Answer(503, b"maintenance until 14:00, token {auth}"), 1: Answer(delay=2 * TIMEOUT)}
        with Receiver(script) as receiver:
            sink = sink_for(webhook(receiver.url, headers={"Authorization": TOKEN}))
            sink.open()
            refused = r"answered 503 Service Unavailable to verdict pc-17:line2:\w+:1, not a 2xx acknowledgement: "
            with pytest.raises(WebhookError, match=refused + r"'maintenance until 14:00, token \*\*\*\*'"):
                sink.deliver(batch)
            with pytest.raises(WebhookError, match=r"No answer from http://127\.0\.0\.1:\d+/verdicts within 0\.5 s "
                                                   r"\(waiting for the answer\).*same Idempotency-Key.*"
                                                   r"raise webhooks\.mes\.timeout"):
                sink.deliver(batch)
            sink.deliver(batch)
            sink.close()
            sink.close()  # twice: never raises
        port = receiver.port
        sink = sink_for(webhook(f"http://user:pw-0815@127.0.0.1:{port}/verdicts", headers={"Authorization": TOKEN}))
        sink.open()
        with pytest.raises(WebhookError, match=r"Cannot send verdict .* to http://127\.0\.0\.1:\d+/verdicts "
                                               r"\(ConnectError: .*refused\)") as failure:
            sink.deliver(batch)
        sink.close()
        assert "pw-0815" not in str(failure.value) and "s3cr3t" not in str(failure.value)


def test_headers_that_http_cannot_carry_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"At 'webhooks\.mes\.headers\.Authorization': the value holds a line "
                                          r"break") as failure:
        sink_for(webhook("http://127.0.0.1:1/v", headers={"Authorization": "Bearer x\r\nX-Evil: 1"}))
    assert "Evil" not in str(failure.value)
    with pytest.raises(ConfigError, match=r"'webhooks\.mes\.headers\.Idempotency-Key': the sink sets this header"):
        sink_for(webhook("http://127.0.0.1:1/v", headers={"Idempotency-Key": "fixed"}))
    with pytest.raises(ConfigError, match=r"not a valid HTTP header name"):
        sink_for(webhook("http://127.0.0.1:1/v", headers={"X Line": "2"}))
    missing = tmp_path / "ca.pem"
    sink = sink_for(webhook("https://127.0.0.1:1/v", verify=missing))
    with pytest.raises(WebhookError, match=rf"At 'webhooks\.mes\.verify': cannot load the CA file {missing}"):
        sink.open()
    assert sink.name == "webhook:mes"
