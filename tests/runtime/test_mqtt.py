"""The MQTT sink against a real mosquitto: the real Outbox, a real ledger, a real paho subscriber.

Each test starts its own broker on a free loopback port, with a persistence
folder in tmp so that QoS 1 sessions survive a restart. The subscriber keeps
a persistent session of its own (QoS 1), so what the broker accepted while
it was reconnecting still reaches it. Failures are real too: the broker
terminated mid-burst and started again, an outbox process killed with
SIGKILL, a client killed under its last will, TLS with a CA made here, and a
password file.

jsonschema is not installed in the venv: :func:`schema_errors` checks the
payloads against docs/verdict.schema.json with a small validator of the
keywords that schema uses (type, const, enum, required, properties,
pattern, minimum, minLength, oneOf, $ref).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_inspect import outbox as outbox_module
from edge_inspect.config import Mqtt, Tls
from edge_inspect.errors import ConfigError
from edge_inspect.ledger import Ledger, Record, file_identity, frame_identity
from edge_inspect.outbox import PAYLOAD_SCHEMA, Outbox, message, payload
from edge_inspect.sinks.mqtt import MqttError, MqttSink
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "verdict.schema.json").read_text(encoding="utf-8"))
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
INSTALLATION, SOURCE = "pc-test", "line2"
TOPIC = f"edge-inspect/{INSTALLATION}/{SOURCE}/verdict"
STATUS = f"edge-inspect/{INSTALLATION}/{SOURCE}/status"
MODEL_SHA = "ab" * 32


# ---------------------------------------------------------------- the broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto process with a config file written here; ``stop`` and ``start`` keep its port and its sessions."""

    def __init__(self, folder: Path, *, extra: str = "", tls: dict | None = None):
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (scripts/test.sh installs it): apt-get install mosquitto")
        self.folder = folder
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        (folder / "data").mkdir(parents=True, exist_ok=True)
        lines = [
            # Started as root, mosquitto would switch to its own user, which cannot read tmp.
            "user root" if os.geteuid() == 0 else "",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true" if "password_file" not in extra else "",
            "persistence true",
            f"persistence_location {folder / 'data'}/",
            # Unlimited queue for an offline persistent subscriber: the test counts every message.
            "max_queued_messages 0",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            extra,
        ]
        if tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls['ca']}", f"certfile {tls['cert']}",
                      f"keyfile {tls['key']}"]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = folder / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        for port in filter(None, (self.port, self.tls_port)):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited ({self.process.returncode}):\n{self.log.read_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mosquitto does not listen on {port}:\n{self.log.read_text()}") from None
                    time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its sessions and queued messages to the persistence file, then exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A paho client with a persistent session (QoS 1), recording every message it gets."""

    def __init__(self, port: int, topic: str, *, client_id: str = "test-subscriber", username=None, password=None):
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.topic = topic
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._connected
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self.ready.wait(5), "the subscriber did not get its SUBACK"

    def _connected(self, client, userdata, flags, reason, properties):
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)  # again after each reconnect: harmless with a session

    def _message(self, client, userdata, msg):
        with self.lock:
            self.messages.append(msg)

    def payloads(self) -> list[dict]:
        with self.lock:
            return [json.loads(m.payload) for m in self.messages]

    def count(self) -> int:
        with self.lock:
            return len(self.messages)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, topic: str, **login) -> bytes | None:
    """The retained message of a topic, as a new clean client reads it."""
    got: list[bytes] = []
    event = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"reader-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    if login:
        client.username_pw_set(login["username"], login["password"])
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: threading.Timer(1.0, event.set).start()  # none retained: nothing comes

    def on_message(c, u, msg):
        got.append(msg.payload)
        event.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    event.wait(5)
    client.disconnect()
    client.loop_stop()
    return got[0] if got else None


# ---------------------------------------------------------------- ledgers and sinks


def fill(path: Path, n: int) -> list[Record]:
    """A ledger at ``path`` with ``n`` verdicts (every 7th an error, every 5th NG), as the pipeline writes them."""
    now = time.time()
    records = []
    for i in range(n):
        name = f"/srv/line2/part_{i:05d}.png"
        sha = f"{i:064x}"
        error = "cannot decode: truncated PNG" if i % 7 == 3 else None
        verdict = "error" if error else ("ng" if i % 5 == 0 else "ok")
        records.append(Record(identity=file_identity(name, 1000 + i, 10**18 + i, sha), kind="file", source=name,
                              verdict=verdict, arrived_at=now, committed_at=now + 0.01, latency_ms=10.0,
                              size=1000 + i, mtime_ns=10**18 + i, sha256=sha,
                              score=None if error else 0.1 * (i % 13), threshold=1.0, criterion="range",
                              model_sha256=MODEL_SHA, error=error, read_at=None if error else now,
                              inspected_at=None if error else now))
    with Ledger.open(path) as ledger:
        written = ledger.record(records)
    assert all(w is not None for w in written)
    return written


def cursor(path: Path) -> int:
    """The MQTT sink's delivery cursor, read without writing (an outbox may be running on the ledger)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        found = conn.execute("SELECT last_id FROM cursors WHERE sink = 'mqtt'").fetchone()
    return found[0] if found else 0


def section(port: int, **more) -> Mqtt:
    return Mqtt(host="127.0.0.1", port=port, timeout=more.pop("timeout", 3.0), **more)


def sink(port: int, **more) -> MqttSink:
    return MqttSink(section(port, **more), source=SOURCE, installation=INSTALLATION)


def start_outbox(ledger: Path, port: int, batch: int = 50, **more) -> Outbox:
    box = Outbox(SOURCE, ledger, sink(port, **more), installation=INSTALLATION, batch=batch, start_at="start")
    box.start()
    return box


def duplicates(ids: list[str]) -> dict[str, int]:
    return {i: n - 1 for i, n in Counter(ids).items() if n > 1}


def drain(box: Outbox, sub, ledger: Path, ids: list[str], last_id: int, what: str) -> tuple[list[str], dict[str, int]]:
    """Wait until ``sub`` has every verdict and the cursor is at ``last_id``, stop ``box`` and ``sub``.

    Returns the ids received, in order, and the duplicates among them; asserts that none is missing or foreign.
    """
    try:
        wait_until(lambda: set(ids) <= {p["id"] for p in sub.payloads()}, 30, f"every verdict {what}")
        wait_until(lambda: cursor(ledger) == last_id, 10, "the cursor at the last row")
        time.sleep(0.5)  # room for a late duplicate to arrive and be counted
    finally:
        box.stop()
        box.join(10)
        sub.close()
    got = [p["id"] for p in sub.payloads()]
    assert set(got) == set(ids)
    return got, duplicates(got)


def ids_of(records: list[Record], ledger: Path) -> list[str]:
    with Ledger.open(ledger) as led:
        ledger_id = led.ledger_id()
    return [f"{INSTALLATION}:{SOURCE}:{ledger_id}:{r.id}" for r in records]


# ---------------------------------------------------------------- delivery


def test_every_verdict_arrives_once_in_order_with_its_payload_and_the_cursor_ends_at_the_last_row(broker, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    records = fill(ledger, 500)  # a 500-part burst
    sub = Subscriber(broker.port, "edge-inspect/#")
    box = start_outbox(ledger, broker.port)
    try:
        wait_until(lambda: sub.count() >= len(records) + 1, 20, "every verdict")  # + the retained "online"
        wait_until(lambda: box.delivered == len(records), 5, "the outbox's count")
        time.sleep(0.3)  # anything extra would have come by now
    finally:
        box.stop()
        box.join(10)
    wait_until(lambda: sub.messages[-1].payload == b"offline", 5, "the status 'offline'")
    sub.close()
    verdicts = [m for m in sub.messages if m.topic == TOPIC]
    statuses = [m.payload for m in sub.messages if m.topic == STATUS]
    assert statuses[:1] == [b"online"] and statuses[-1] == b"offline"  # close() says so on a clean stop
    assert not [m.topic for m in sub.messages if m.topic not in (TOPIC, STATUS)]
    with Ledger.open(ledger) as led:
        ledger_id = led.ledger_id()
        rows = led.after(0, 1000)
        assert led.cursor("mqtt") == records[-1].id
    expected = [payload(r, source=SOURCE, installation=INSTALLATION, ledger_id=ledger_id) for r in rows]
    got = [json.loads(m.payload) for m in verdicts]
    assert [p["id"] for p in got] == [p["id"] for p in expected]  # each once, in ledger order
    assert got == expected
    for m in verdicts:
        props = dict(m.properties.UserProperty)
        assert props == {"message_id": json.loads(m.payload)["id"]}
        assert m.qos == 1 and not m.retain
        assert m.properties.ContentType == "application/json"
    for p in got:
        assert schema_errors(p, SCHEMA) == [], p


def test_a_broker_stopped_mid_burst_and_started_10_s_later_gets_every_verdict(broker, tmp_path, monkeypatch,
                                                                              capsys):
    # The outbox's backoff is capped at 1 s here (30 s in service), so it tries again soon after the broker is back.
    monkeypatch.setattr(outbox_module, "RETRY_MAX_S", 1.0)
    ledger = tmp_path / "ledger.sqlite"
    records = fill(ledger, 4000)
    ids = ids_of(records, ledger)
    sub = Subscriber(broker.port, TOPIC)
    box = start_outbox(ledger, broker.port, batch=50, timeout=2.0)
    try:
        wait_until(lambda: sub.count() >= 400, 20, "the burst to start")
        broker.stop()
        at_stop = cursor(ledger)
        assert at_stop < len(records), "the burst ended before the broker stopped: nothing was tested"
        time.sleep(10)
        assert box.outage is not None  # the outbox noticed
        broker.start()
    except BaseException:
        box.stop()
        box.join(10)
        raise
    got, dups = drain(box, sub, ledger, ids, records[-1].id, "after the restart")
    with capsys.disabled():
        print(f"\nbroker restart: {len(got)} messages for {len(ids)} verdicts; cursor at the stop {at_stop}; "
              f"{sum(dups.values())} duplicate(s): {sorted(dups, key=lambda i: int(i.rsplit(':', 1)[1]))}")
    assert len(got) == len(ids) + sum(dups.values())
    # Only the batch in flight when the broker went away can come twice (50), and the messages the broker had
    # sent the subscriber without its PUBACK yet (mosquitto's window of 20), which it sends again after the restart:
    # everything before the cursor was acknowledged once and for all.
    assert sum(dups.values()) <= 50 + 20


CHILD = r'''
"""Run an Outbox with the MQTT sink until killed; or, with "idle", only hold the sink open."""
import logging, sys, time
from edge_inspect.config import Mqtt
from edge_inspect.outbox import Outbox
from edge_inspect.sinks.mqtt import MqttSink

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
mode, ledger, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sink = MqttSink(Mqtt(host="127.0.0.1", port=port, timeout=3.0), source="line2", installation="pc-test")
if mode == "idle":
    sink.open()
else:
    Outbox("line2", ledger, sink, installation="pc-test", batch=20, start_at="start").start()
print("running", flush=True)
while True:
    time.sleep(1)
'''


def run_child(tmp_path: Path, mode: str, ledger: Path, port: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, str(script), mode, str(ledger), str(port)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=open(tmp_path / f"child-{mode}.log", "ab"), text=True)
    assert child.stdout.readline().strip() == "running", (tmp_path / f"child-{mode}.log").read_text()
    return child


def test_an_outbox_process_killed_mid_delivery_loses_nothing_when_a_new_one_starts(broker, tmp_path, capsys):
    ledger = tmp_path / "ledger.sqlite"
    records = fill(ledger, 4000)
    ids = ids_of(records, ledger)
    sub = Subscriber(broker.port, TOPIC)
    child = run_child(tmp_path, "outbox", ledger, broker.port)
    try:
        wait_until(lambda: sub.count() >= 300, 20, "the child's delivery to start")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    at_kill = cursor(ledger)
    assert at_kill < len(records), "the child delivered everything before the kill: nothing was tested"
    box = start_outbox(ledger, broker.port)
    got, dups = drain(box, sub, ledger, ids, records[-1].id, "after the kill")
    with capsys.disabled():
        print(f"\nkill -9: cursor at the kill {at_kill}, {len(got)} messages for {len(ids)} verdicts, "
              f"{sum(dups.values())} duplicate(s)")
    assert sum(dups.values()) <= 20  # at most the batch the child had in flight (published, its cursor not moved)


def test_the_last_will_says_offline_after_a_kill_and_a_new_client_says_online(broker, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger, 1)
    child = run_child(tmp_path, "idle", ledger, broker.port)
    try:
        assert retained(broker.port, STATUS) == b"online"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    wait_until(lambda: retained(broker.port, STATUS) == b"offline", 10, "the will")
    again = sink(broker.port)
    again.open()
    assert retained(broker.port, STATUS) == b"online"
    # The connection drops under an open sink (the broker publishes the will); paho reconnects by itself, and the
    # sink says "online" again.
    watcher = Subscriber(broker.port, STATUS, client_id="status-watcher")
    wait_until(lambda: watcher.count() == 1, 5, "the retained status")
    again._client.socket().shutdown(socket.SHUT_RDWR)
    wait_until(lambda: watcher.count() == 3, 10, "the will, then 'online' after paho's reconnect")
    assert [m.payload for m in watcher.messages] == [b"online", b"offline", b"online"]
    watcher.close()
    again.close()
    assert retained(broker.port, STATUS) == b"offline"  # a clean stop publishes it itself


# ---------------------------------------------------------------- TLS and passwords


def make_ca(folder: Path) -> dict:
    """A test CA and a server certificate for 127.0.0.1 and localhost, made with the openssl command line."""
    folder.mkdir()

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=edge-inspect test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-new", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                       "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    return {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command line makes the test CA")
def test_tls_with_the_test_ca_delivers_and_an_untrusted_or_plain_connection_says_why(tmp_path):
    certs = make_ca(tmp_path / "pki")
    broker = Broker(tmp_path / "broker", tls=certs)
    broker.start()
    try:
        ledger = tmp_path / "ledger.sqlite"
        records = fill(ledger, 5)
        sub = Subscriber(broker.port, TOPIC)  # on the plain listener of the same broker
        box = start_outbox(ledger, broker.tls_port, tls=Tls(ca=certs["ca"]))
        try:
            wait_until(lambda: sub.count() == len(records), 10, "the verdicts over TLS")
        finally:
            box.stop()
            box.join(10)
        sub.close()
        assert [p["sequence"] for p in sub.payloads()] == [r.id for r in records]
        assert sink(broker.tls_port, tls=Tls()).port == broker.tls_port  # an explicit port wins
        assert MqttSink(Mqtt(host="h", tls=Tls()), source=SOURCE, installation=INSTALLATION).port == 8883
        assert MqttSink(Mqtt(host="h"), source=SOURCE, installation=INSTALLATION).port == 1883

        with pytest.raises(MqttError, match=r"127\.0\.0\.1:\d+: its TLS certificate is not trusted .*mqtt\.tls\.ca"):
            sink(broker.tls_port, tls=Tls()).open()  # the system's CAs do not know the test CA
        with pytest.raises(MqttError, match=rf"MQTT broker 127\.0\.0\.1:{broker.tls_port} .*TLS"):
            sink(broker.tls_port, timeout=1.0).open()  # plain MQTT to the TLS port
        with pytest.raises(MqttError, match=rf"127\.0\.0\.1:{broker.port}: .*TLS handshake"):
            sink(broker.port, tls=Tls(ca=certs["ca"])).open()  # TLS to the plain port
    finally:
        broker.stop()


@pytest.fixture
def locked_broker(tmp_path):
    """A broker that wants a password: user 'edge' may publish only its status; 'watcher' reads everything."""
    folder = tmp_path / "broker"
    folder.mkdir()
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwd = folder / "passwd"
    users = (("edge", "s3cret-edge"), ("watcher", "w"))
    try:
        for i, (user, secret) in enumerate(users):
            subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, secret],
                           check=True, capture_output=True)
    except subprocess.CalledProcessError:  # an old mosquitto_passwd without -b: hash a plain file in place
        passwd.write_text("".join(f"{user}:{secret}\n" for user, secret in users))
        subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True)
    passwd.chmod(0o600)
    acl = folder / "acl"
    acl.write_text("user edge\ntopic write edge-inspect/+/+/status\n\nuser watcher\ntopic read #\n")
    broker = Broker(folder, extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}")
    broker.start()
    yield broker
    broker.stop()


def test_a_wrong_password_says_so_and_names_the_keys_and_the_password_never_shows(locked_broker, tmp_path,
                                                                                  monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("EDGE_MQTT_PW", "wrong-password")
    with pytest.raises(MqttError) as raised:
        sink(locked_broker.port, username="edge", password_env="EDGE_MQTT_PW").open()
    text = str(raised.value)
    assert f"MQTT broker 127.0.0.1:{locked_broker.port}" in text
    assert re.search(r"bad user name or password.*check mqtt\.username \('edge'\) and the password in "
                     r"\$EDGE_MQTT_PW", text), text

    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret-edge\nthe second line is not read\n")
    good = sink(locked_broker.port, username="edge", password_file=secret)
    good.open()  # the first line only; "online" goes out: the ACL lets edge write its status
    assert retained(locked_broker.port, STATUS, username="watcher", password="w") == b"online"
    # The ACL refuses the verdict topic: MQTT 5 says so in the PUBACK, where 3.1.1 would acknowledge and drop it.
    ledger = tmp_path / "ledger.sqlite"
    records = fill(ledger, 1)
    with Ledger.open(ledger) as led:
        ledger_id = led.ledger_id()
    messages = [message(r, source=SOURCE, installation=INSTALLATION, ledger_id=ledger_id) for r in records]
    with pytest.raises(MqttError, match=r"refused message pc-test:line2:\w+:1 on topic .*Not authorized.*'edge'"):
        good.deliver(messages)
    good.close()
    assert "s3cret-edge" not in caplog.text and "wrong-password" not in caplog.text
    paho = [r for r in caplog.records if r.name == "edge_inspect.sinks.mqtt.paho"]
    assert paho, "paho's own log was captured too"
    # paho logs a refused login and a reset socket at ERROR; the outbox logs the outage, once: paho's stays at DEBUG.
    assert {r.levelno for r in paho} == {logging.DEBUG}


def test_a_missing_password_variable_or_file_names_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_MQTT_NOPE", raising=False)
    with pytest.raises(ConfigError, match=r"^At 'mqtt\.password_env': the environment variable EDGE_MQTT_NOPE is "
                                          r"not set") as raised:
        sink(1883, username="edge", password_env="EDGE_MQTT_NOPE")
    assert raised.value.key == "mqtt.password_env"
    with pytest.raises(ConfigError, match=r"^At 'mqtt\.password_file': .*nope\.pass does not exist"):
        sink(1883, username="edge", password_file=tmp_path / "nope.pass")
    with pytest.raises(ConfigError, match=r"^At 'mqtt\.tls\.ca': .*ca\.pem does not exist"):
        sink(1883, tls=Tls(ca=tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match=r"^At 'mqtt\.topic': .*wildcard"):
        sink(1883, topic="plant/+/verdict")


def test_a_broker_that_is_not_there_is_named(tmp_path):
    port = free_port()
    with pytest.raises(MqttError, match=rf"^Cannot connect to MQTT broker 127\.0\.0\.1:{port}: connection refused"):
        sink(port).open()


# ---------------------------------------------------------------- the payload's schema


def test_payloads_of_files_frames_and_errors_follow_the_schema():
    now = time.time()
    frame = Record(identity=frame_identity("rtsp://cam/1", now, 12), kind="frame", source="rtsp://cam/1",
                   verdict="ng", arrived_at=now, committed_at=now, latency_ms=3.5, frame_index=12, frame_time=now,
                   score=4.2, threshold=1.0, criterion="smooth_range", model_sha256=MODEL_SHA, read_at=now,
                   inspected_at=now, heatmap="/srv/heatmaps/x.png", id=7)
    unreadable = Record(identity=file_identity("/srv/in/bad\\xff.png", 3, 5, None), kind="file",
                        source="/srv/in/bad\\xff.png", verdict="error", arrived_at=now, committed_at=now,
                        latency_ms=0.2, size=3, mtime_ns=5, error="cannot read: permission denied", id=8)
    for record in (frame, unreadable):
        data = payload(record, source="cam-1", installation="pc.example", ledger_id="0123456789ab")
        assert schema_errors(data, SCHEMA) == [], data
        assert data["$schema"] == PAYLOAD_SCHEMA == SCHEMA["$id"]
        # Every key the payload has, the schema describes (and the other way round): they must not drift apart.
        assert set(data) == set(SCHEMA["properties"]) == set(SCHEMA["required"])
        kind = SCHEMA["$defs"][record.kind]
        assert set(data["part"]) == set(kind["properties"]) == set(kind["required"])
        assert set(data["timestamps"]) == set(SCHEMA["properties"]["timestamps"]["properties"])
    broken = payload(frame, source="cam-1", installation="pc", ledger_id="0123456789ab")
    broken["verdict"], broken["sequence"], broken["part"]["kind"] = "maybe", "7", "file"
    del broken["score"]
    assert len(schema_errors(broken, SCHEMA)) == 4  # the validator below does catch what it should


_TYPES = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool}


def _is(value, kind: str) -> bool:
    if kind in ("number", "integer"):
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and (kind == "number" or isinstance(value, int)))
    return isinstance(value, _TYPES[kind])


def schema_errors(value, node: dict, root: dict | None = None, at: str = "$") -> list[str]:
    """What is wrong with ``value`` under the keywords of JSON Schema that docs/verdict.schema.json uses."""
    root = root or node
    if "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_errors(value, target, root, at)
    errors = []
    kinds = node.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return [f"{at}: {value!r} is not of type {kinds}"]
    if "const" in node and value != node["const"]:
        errors.append(f"{at}: {value!r} is not {node['const']!r}")
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{at}: {value!r} is not one of {node['enum']}")
    if isinstance(value, str):
        if "pattern" in node and not re.search(node["pattern"], value):
            errors.append(f"{at}: {value!r} does not match {node['pattern']}")
        if len(value) < node.get("minLength", 0):
            errors.append(f"{at}: {value!r} is too short")
    if _is(value, "number") and "minimum" in node and value < node["minimum"]:
        errors.append(f"{at}: {value!r} is below {node['minimum']}")
    if isinstance(value, dict):
        errors += [f"{at}: {key!r} is missing" for key in node.get("required", ()) if key not in value]
        for key, child in node.get("properties", {}).items():
            if key in value:
                errors += schema_errors(value[key], child, root, f"{at}.{key}")
    if "oneOf" in node:
        matching = sum(not schema_errors(value, option, root, at) for option in node["oneOf"])
        if matching != 1:
            errors.append(f"{at}: matches {matching} of the oneOf alternatives, not exactly one")
    return errors
