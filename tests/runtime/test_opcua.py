"""The OPC UA sink against a real asyncua server: records written sequence last, outages, node checks, security.

The "PLC" is an asyncua server on a thread of its own in this process, on a
free loopback port. A callback inside the server, run at the instant the
sequence node is written, copies the other nodes: what a PLC reacting to the
sequence change would find there.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from pathlib import Path

import pytest
from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_inspect.config import OpcUa
from edge_inspect.errors import ConfigError
from edge_inspect.ledger import Ledger, Record, frame_identity
from edge_inspect.outbox import Message, Outbox, message
from edge_inspect.sinks.opcua import OpcUaSink, check
from tests.support.waiting import running, wait_until

NAMESPACE = "urn:edge-inspect:test-plc"
#: The PLC's variables: name -> (Variant type, initial value, writable).
VARIABLES = {
    "Verdict": (ua.VariantType.String, "", True),
    "Score": (ua.VariantType.Double, 0.0, True),
    "PartId": (ua.VariantType.String, "", True),
    "Sequence": (ua.VariantType.UInt64, 0, True),
    # What an S7 program may declare instead: Real and DInt.
    "ScoreReal": (ua.VariantType.Float, 0.0, True),
    "SequenceDInt": (ua.VariantType.Int32, 0, True),
    "Locked": (ua.VariantType.String, "", False),
}
SOURCE, INSTALLATION = "line2", "pc-17"


def node(name: str) -> str:
    return f"ns=2;s=Line2.{name}"  # the first namespace a server registers gets index 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Users:
    """An asyncua user manager with one user and password."""

    def __init__(self, name: str, password: str):
        self.name, self.password = name, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.name and password == self.password:
            return User(role=UserRole.User, name=username)
        return None


class Plc:
    """An asyncua server on an event loop of its own (on a thread), holding VARIABLES under Objects/Line2.

    Attributes:
        snapshots: at each write of Sequence, ``(sequence, verdict, score, part_id)`` as the server holds them.
        requests: the variables named in each Write request from a client, with whether any value carried a
            timestamp (``(("Verdict", "Score", "PartId"), False)``).
    """

    def __init__(self, port: int, *, certificate: Path | None = None, private_key: Path | None = None,
                 users: Users | None = None):
        self.port, self.certificate, self.private_key, self.users = port, certificate, private_key, users
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/"
        self.snapshots: list[tuple] = []
        self.requests: list[tuple] = []
        self.server: Server | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-plc", daemon=True)
        self.thread.start()

    def _run(self, coro, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Plc:
        self._run(self._start())
        return self

    async def _start(self) -> None:
        server = Server(user_manager=self.users)
        await server.init()
        server.set_endpoint(self.endpoint)
        if self.certificate is not None:
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NAMESPACE)
        assert idx == 2
        line = await server.nodes.objects.add_object(ua.NodeId("Line2", idx), "Line2")
        for name, (vtype, initial, writable) in VARIABLES.items():
            var = await line.add_variable(ua.NodeId(f"Line2.{name}", idx), name, ua.Variant(initial, vtype))
            if writable:
                await var.set_writable()
        aspace = server.iserver.aspace

        def value(name):
            return aspace.read_attribute_value(ua.NodeId(f"Line2.{name}", idx), ua.AttributeIds.Value).Value.Value

        async def on_sequence(handle, datavalue):
            # Runs inside the Write service, as the value lands: nothing else can be written meanwhile.
            self.snapshots.append((datavalue.Value.Value, value("Verdict"), value("Score"), value("PartId")))

        def on_write(event, dispatcher):
            writes = event.request_params.NodesToWrite
            self.requests.append((tuple(str(w.NodeId.Identifier).removeprefix("Line2.") for w in writes),
                                  any(w.Value.SourceTimestamp or w.Value.ServerTimestamp for w in writes)))

        aspace.add_datachange_callback(ua.NodeId("Line2.Sequence", idx), ua.AttributeIds.Value, on_sequence)
        server.subscribe_server_callback(CallbackType.PreWrite, on_write)
        await server.start()
        self.server = server

    def values(self) -> dict:
        async def read():
            return {name: await self.server.get_node(node(name)).read_value() for name in VARIABLES}

        return self._run(read())

    def stop(self) -> None:
        if self.server is not None:
            self._run(self.server.stop())
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def plc():
    server = Plc(free_port()).start()
    yield server
    server.close()


def settings(endpoint: str, **nodes) -> OpcUa:
    names = {"verdict": node("Verdict"), "score": node("Score"), "part_id": node("PartId"),
             "sequence": node("Sequence")} | nodes
    return OpcUa(endpoint=endpoint, nodes={k: v for k, v in names.items() if v is not None}, timeout=3.0)


def verdicts(ledger: Ledger, n: int, start: int = 0) -> list[Record]:
    """Commit ``n`` camera verdicts: ok, ng and, every fifth, an error without a score."""
    now = time.time()
    records = []
    for i in range(start, start + n):
        verdict = "error" if i % 5 == 4 else "ng" if i % 3 == 0 else "ok"
        records.append(Record(identity=frame_identity("rtsp://cam/line2", now, i), kind="frame",
                              source="rtsp://cam/line2", verdict=verdict, arrived_at=now, committed_at=now,
                              latency_ms=1.0, frame_index=i, frame_time=now,
                              score=None if verdict == "error" else (2.0 if verdict == "ng" else 0.5) + i / 1000,
                              threshold=1.0, criterion="range", error="unreadable" if verdict == "error" else None))
    return ledger.record(records)


def plc_outbox(ledger: Ledger, plc: Plc, batch: int) -> Outbox:
    """An outbox that delivers the ledger's verdicts to ``plc`` from the first row."""
    return Outbox(SOURCE, ledger.path, OpcUaSink(settings(plc.endpoint), source=SOURCE, installation=INSTALLATION),
                  installation=INSTALLATION, batch=batch, start_at="start", poll=0.01)


def cursor(ledger: Ledger) -> int:
    # start_at as the outbox's: asked first, cursor() would otherwise create the cursor at the last row.
    return ledger.cursor("opcua", start_at="start")


def expected(ledger: Ledger, row_id: int) -> tuple:
    """``(sequence, verdict, score, part_id)`` the PLC must hold for a row."""
    row = ledger.get(row_id)
    score = math.nan if row.verdict == "error" else row.score
    return row_id, row.verdict, score, f"{INSTALLATION}:{SOURCE}:{ledger.ledger_id()}:{row_id}"


def same(a: tuple, b: tuple) -> bool:
    return all((x != x and y != y) or x == y for x, y in zip(a, b, strict=True))  # NaN == NaN here


def plc_record(plc: Plc) -> tuple:
    v = plc.values()
    return v["Sequence"], v["Verdict"], v["Score"], v["PartId"]


# ---------------------------------------------------------------- delivery through the outbox


def test_a_burst_leaves_the_last_record_and_the_sequence_never_runs_ahead(plc, tmp_path):
    plc.snapshots.clear()
    plc.requests.clear()
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        with running(plc_outbox(ledger, plc, batch=20)) as outbox:
            for burst in range(30):
                verdicts(ledger, 10, start=burst * 10)
                outbox.wake()
                time.sleep(0.005)
            last = ledger.after(0, 1000)[-1].id
            wait_until(lambda: cursor(ledger) == last, 15, "the cursor reaches the last row")
        assert outbox.outage is None
        assert same(plc_record(plc), expected(ledger, last))
        # Every sequence change found that record's verdict, score and part id already in place.
        assert len(plc.snapshots) >= 10, plc.snapshots
        sequences = [s[0] for s in plc.snapshots]
        assert sequences == sorted(set(sequences)) and sequences[-1] == last
        for snapshot in plc.snapshots:
            assert same(snapshot, expected(ledger, snapshot[0])), snapshot
        # A server need not apply the writes of one request in order: the sequence always comes in a request of
        # its own, after the one with its record; and no write carries a timestamp (PLCs refuse those).
        assert plc.requests[:2] == [(("Verdict", "Score", "PartId"), False), (("Sequence",), False)]
        assert plc.requests == plc.requests[:2] * (len(plc.requests) // 2)
        assert len(plc.requests) == 2 * len(plc.snapshots)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("opcua-")]


def test_a_server_restart_mid_burst_loses_nothing(tmp_path):
    port = free_port()
    plc = Plc(port).start()
    try:
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            with running(plc_outbox(ledger, plc, batch=7)) as outbox:
                verdicts(ledger, 20)
                wait_until(lambda: cursor(ledger) == 20, 10, "the first rows delivered")
                plc.stop()
                verdicts(ledger, 30, start=20)  # the PLC is down: they wait
                wait_until(lambda: outbox.outage is not None, 10, "the outage noticed")
                assert cursor(ledger) < 50
                plc.start()  # the same port, a fresh address space
                verdicts(ledger, 25, start=50)
                wait_until(lambda: cursor(ledger) == 75, 30, "the cursor reaches the last row after the restart")
            assert outbox.outage is None and outbox.delivered == 75
            assert same(plc_record(plc), expected(ledger, 75))
            for snapshot in plc.snapshots:
                assert same(snapshot, expected(ledger, snapshot[0])), snapshot
    finally:
        plc.close()


# ---------------------------------------------------------------- the sink alone


def test_error_verdicts_write_nan_and_types_of_a_plc_program_are_honoured(plc):
    """A Real (Float) score and a DInt (Int32) sequence take their own Variant types; the sequence wraps at 2**31."""
    config = settings(plc.endpoint, score=node("ScoreReal"), sequence=node("SequenceDInt"))
    sink = OpcUaSink(config, source=SOURCE, installation=INSTALLATION)
    sink.open()
    try:
        row = (1 << 31) + 5
        sink.deliver([Message(row, SOURCE, f"pc-17:line2:x:{row}", {"verdict": "error", "score": None}, b"{}")])
        values = plc.values()
        assert values["SequenceDInt"] == 5 and math.isnan(values["ScoreReal"])
        assert values["Verdict"] == "error" and values["PartId"] == f"pc-17:line2:x:{row}"
        sink.deliver([])  # nothing to write, nothing written
    finally:
        sink.close()
        sink.close()  # twice: never raises


def test_the_record_of_a_batch_is_its_last_message(plc, tmp_path):
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        rows = verdicts(ledger, 4)
        messages = [message(r, source=SOURCE, installation=INSTALLATION, ledger_id=ledger.ledger_id()) for r in rows]
        sink = OpcUaSink(settings(plc.endpoint), source=SOURCE, installation=INSTALLATION)
        sink.open()
        try:
            plc.snapshots.clear()
            sink.deliver(messages)
        finally:
            sink.close()
        assert [s[0] for s in plc.snapshots] == [rows[-1].id]
        assert same(plc_record(plc), expected(ledger, rows[-1].id))


def test_wrong_nodes_are_named_by_key_in_check_and_open(plc):
    config = settings(plc.endpoint, score="ns=2;s=Scroe")
    problems = check(config)
    assert problems == [f"At 'opcua.nodes.score': node ns=2;s=Scroe does not exist on {plc.endpoint}. Browse the "
                        "server (UaExpert, or `uabrowse`) for the right node id, or add the variable to the PLC "
                        "program."]
    sink = OpcUaSink(config, source=SOURCE, installation=INSTALLATION)
    with pytest.raises(ConfigError) as raised:
        sink.open()
    assert str(raised.value) == problems[0] and raised.value.key == "opcua.nodes.score"
    sink.close()

    config = settings(plc.endpoint, verdict=node("Locked"), score=node("Verdict"), part_id="ns=2;x=bad",
                      sequence=node("Score"))
    problems = check(config)
    assert [p.split(":")[0] for p in problems] == ["At 'opcua.nodes.verdict'", "At 'opcua.nodes.score'",
                                                   "At 'opcua.nodes.part_id'", "At 'opcua.nodes.sequence'"]
    assert "is not writable by an anonymous client" in problems[0]
    assert "is a String variable; score needs Double or Float" in problems[1]
    assert "'ns=2;x=bad' is not a node id" in problems[2]
    assert "is a Double variable; sequence needs UInt64 or Int64 or UInt32 or Int32" in problems[3]

    assert check(settings(plc.endpoint, part_id=node("Verdict"))) == [
        f"At 'opcua.nodes.part_id': node {node('Verdict')} is also nodes.verdict: each value needs a node of its "
        "own. Fix one of them."]
    assert check(settings(plc.endpoint, part_id=None, score=f"nsu={NAMESPACE};s=Line2.Score")) == []
    assert check(settings(plc.endpoint)) == []


def test_an_unreachable_server_is_a_problem_at_the_endpoint():
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    (problem,) = check(settings(endpoint))
    assert problem.startswith(f"At 'opcua.endpoint': Cannot connect to {endpoint}: ")
    assert "Check that the server runs" in problem


def test_a_server_that_never_answers_times_out_at_the_configured_timeout():
    with socket.socket() as silent:  # accepts the connection (the kernel does), then says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"opc.tcp://127.0.0.1:{silent.getsockname()[1]}/"
        config = settings(endpoint).model_copy(update={"timeout": 0.5})
        started = time.monotonic()
        assert check(config) == [f"At 'opcua.endpoint': Cannot connect to {endpoint}: no answer within 0.5 s. Check "
                                 "that the server runs and is reachable, or raise opcua.timeout."]
        assert time.monotonic() - started < 3


# ---------------------------------------------------------------- security


def _certificate(folder: Path, name: str, uri: str, use) -> tuple[Path, Path]:
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName(socket.gethostname())], extended=use)
    (folder / f"{name}.der").write_bytes(cert.public_bytes(Encoding.DER))
    (folder / f"{name}.pem").write_bytes(cert_gen.dump_private_key_as_pem(key))
    return folder / f"{name}.der", folder / f"{name}.pem"


def test_basic256sha256_sign_and_encrypt_with_a_user_and_password(tmp_path, monkeypatch):
    server_cert, server_key = _certificate(tmp_path, "server", "urn:freeopcua:python:server",
                                           [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client_cert, client_key = _certificate(tmp_path, "client", "urn:line2-pc:edge-inspect",
                                           [ExtendedKeyUsageOID.CLIENT_AUTH])
    plc = Plc(free_port(), certificate=server_cert, private_key=server_key, users=Users("line2", "s3cret")).start()
    try:
        monkeypatch.setenv("EDGE_INSPECT_TEST_OPCUA_PASSWORD", "s3cret")
        secure = dict(security_policy="Basic256Sha256", security_mode="SignAndEncrypt", certificate=client_cert,
                      private_key=client_key, server_certificate=server_cert, username="line2",
                      password_env="EDGE_INSPECT_TEST_OPCUA_PASSWORD")
        config = settings(plc.endpoint).model_copy(update=secure)
        sink = OpcUaSink(config, source=SOURCE, installation=INSTALLATION)
        sink.open()  # the server offers no other endpoint than Basic256Sha256 SignAndEncrypt (checked below)
        try:
            sink.deliver([Message(9, SOURCE, "pc-17:line2:x:9", {"verdict": "ng", "score": 2.5}, b"{}")])
        finally:
            sink.close()
        assert plc_record(plc) == (9, "ng", 2.5, "pc-17:line2:x:9")

        # Without security the server offers no endpoint; with a wrong password it refuses the user.
        assert check(settings(plc.endpoint)) == [
            f"At 'opcua.security_policy': {plc.endpoint} offers no endpoint with security policy None and mode None. "
            "Choose a pair the server offers, or enable it on the server."]
        monkeypatch.setenv("EDGE_INSPECT_TEST_OPCUA_PASSWORD", "wrong")
        (problem,) = check(config)
        assert problem.startswith("At 'opcua.username': ") and "wrong" not in problem and "s3cret" not in problem
        monkeypatch.delenv("EDGE_INSPECT_TEST_OPCUA_PASSWORD")
        assert check(config) == ["At 'opcua.password_env': environment variable EDGE_INSPECT_TEST_OPCUA_PASSWORD "
                                 "is not set. Set it in the service's environment (an EnvironmentFile of the unit), "
                                 "or use password_file."]
    finally:
        plc.close()
