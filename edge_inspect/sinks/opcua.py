"""The OPC UA sink: the latest verdict, written to nodes of a PLC's OPC UA server.

A PLC does not consume a stream; it looks at the newest verdict. The sink
writes one *record* to the configured nodes: ``verdict`` (String),
``score`` (Double, NaN for an error verdict), ``part_id`` (String, the
message id) and, last, ``sequence`` (the ledger row). Two Write requests, so
no server can apply them out of order: the three values first, and the
sequence only once the server acknowledged them. A PLC that sees the
sequence change therefore finds that record's values in place; it can also
check that ``part_id`` ends with ``:SEQUENCE``.

Of a batch (a backlog drained after an outage) only the last verdict is
written. Writing every record would cost two round trips each and hand the
PLC a run of sequence changes faster than its scan; what it can act on is
the newest part. A jump in the sequence tells it how many it did not see;
every verdict stays in the ledger, the JSONL results and the other sinks.

The client (asyncua) runs on an event loop of its own, on a thread of its
own, so that its keep-alive reads and channel renewals go on while the
outbox waits for verdicts; the outbox thread hands it each request and
waits for the answer, at most the configured timeout.

    >>> sink = OpcUaSink(config.opcua, source="line2", installation="pc-17")
    >>> Outbox("line2", ledger_path, sink, installation="pc-17").start()
    >>> check(config.opcua)        # for `edge-inspect config check`
    []
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.crypto import security_policies, uacrypto
from cryptography import x509

from edge_inspect.config import OpcUa
from edge_inspect.errors import ConfigError, DeliveryError, EdgeInspectError
from edge_inspect.outbox import Message

log = logging.getLogger(__name__)

#: The record's nodes, in the order they are written (sequence alone, after the others).
KEYS = ("verdict", "score", "part_id", "sequence")

# The node DataTypes each key accepts (namespace 0 ids), and the Variant written to each. The values of
# VariantType are the ids of the built-in DataTypes they stand for (String = 12, Double = 11, ...).
_STRING = ("String",)
ACCEPTED = {
    "verdict": _STRING,
    "part_id": _STRING,
    "score": ("Double", "Float"),
    "sequence": ("UInt64", "Int64", "UInt32", "Int32"),
}
#: A sequence past a 32-bit node's range wraps around (a PLC only looks for a change).
_WRAP = {"UInt32": 1 << 32, "Int32": 1 << 31}
#: The session outlives a lost connection by this much at least: the server then frees it on its own.
_MIN_SESSION_S = 60.0


@dataclass(frozen=True)
class _Target:
    """A resolved node: its key, id as configured, NodeId and the Variant type its DataType takes."""

    key: str
    text: str
    node: object  # ua.NodeId
    variant: str  # a ua.VariantType name

    def value(self, value):
        """``value`` as the node takes it: a sequence wrapped into a 32-bit node's range."""
        if self.variant in _WRAP:
            return value % _WRAP[self.variant]
        return value


class OpcUaSink:
    """Write the latest verdict of a batch to the nodes of an OPC UA server (a :class:`~edge_inspect.outbox.Delivery`).

    Args:
        config: the ``[opcua]`` section.
        source: the source's name (in log lines).
        installation: this PC's id (in log lines; the message ids carry it).
    """

    name = "opcua"

    def __init__(self, config: OpcUa, *, source: str, installation: str):
        self.config = config
        self.source = source
        self.installation = installation
        self._loop: _Loop | None = None
        self._client = None
        self._targets: list[_Target] = []
        if config.security_mode != "None" and config.server_certificate is None:
            log.warning("OPC UA: opcua.server_certificate is not set: the certificate %s presents is taken "
                        "unchecked. Set it to pin the server's certificate.", _shown(config.endpoint))

    def open(self) -> None:
        """Connect, log in and resolve the nodes.

        Raises:
            ConfigError: a node is missing, of the wrong type or not
                writable, a credential cannot be read, or the server refuses
                the security settings or the user; the message names the key.
            EdgeInspectError: the server cannot be reached or does not answer
                within the timeout.
        """
        self.close()
        password = _password(self.config)
        loop = _Loop(f"opcua-{self.source}")
        try:
            self._client, self._targets = loop.run(_connect(self.config, password), _connect_budget(self.config))
        except BaseException:
            loop.stop()
            raise
        self._loop = loop
        log.info("OPC UA sink of source %s connected to %s (%s, %s).", self.source, _shown(self.config.endpoint),
                 self.config.security_policy, self.config.security_mode)

    def deliver(self, messages: Sequence[Message]) -> None:
        """Write the last message's record, sequence last; return once the server acknowledged every write.

        Raises:
            EdgeInspectError: not open, the connection is lost, no answer
                within the timeout, or a write's status is not Good.
        """
        if not messages:
            return
        if self._loop is None:
            raise DeliveryError("The OPC UA sink is not connected; open() it first.")
        last = messages[-1]
        verdict = last.payload["verdict"]
        score = last.payload.get("score")
        values = {"verdict": verdict, "part_id": last.message_id, "sequence": last.row_id,
                  "score": math.nan if verdict == "error" or score is None else float(score)}
        record = [(t, values[t.key]) for t in self._targets if t.key != "sequence"]
        sequence = [(t, values[t.key]) for t in self._targets if t.key == "sequence"]
        self._loop.run(_write_record(self._client, self.config.endpoint, record, sequence), 2 * self.config.timeout)

    def close(self) -> None:
        """Close the session and the connection; never raises."""
        loop, client = self._loop, self._client
        self._loop, self._client, self._targets = None, None, []
        if loop is None:
            return
        try:
            loop.run(_disconnect(client), self.config.timeout)
        except BaseException as exc:  # noqa: BLE001  (closing a lost connection fails; nothing to do about it)
            log.debug("Closing the OPC UA connection to %s: %s", _shown(self.config.endpoint), exc)
        finally:
            loop.stop()


def check(config: OpcUa) -> list[str]:
    """Connect once and check every node, for ``edge-inspect config check``.

    Returns:
        One line per problem, each naming its key (``At 'opcua.nodes.score': ...``); empty: all good.
    """
    try:
        password = _password(config)
    except ConfigError as exc:
        return str(exc).splitlines()
    loop = _Loop("opcua-check")
    try:
        client, _ = loop.run(_connect(config, password), _connect_budget(config))
        loop.run(_disconnect(client), config.timeout)
    except ConfigError as exc:
        return str(exc).splitlines()
    except EdgeInspectError as exc:
        return [f"At 'opcua.endpoint': {exc}"]
    except Exception as exc:  # noqa: BLE001  (closing may fail after a good check: report it, never crash the check)
        return [f"At 'opcua.endpoint': {type(exc).__name__}: {exc}"]
    finally:
        loop.stop()
    return []


# ------------------------------------------------------------------ the loop thread


class _Loop:
    """An asyncio event loop running on a daemon thread of its own; :meth:`run` waits for a coroutine on it."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        """The coroutine's result; raises what it raises, ``EdgeInspectError`` after ``timeout`` seconds."""

        async def bounded():
            return await asyncio.wait_for(coro, timeout)

        future = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        try:
            # wait_for cancels the coroutine at the timeout; the extra second only guards against a stuck loop.
            return future.result(timeout + 1.0)
        except TimeoutError:
            future.cancel()
            raise DeliveryError(f"No answer within {timeout:g} s. Check that the server runs and is reachable, "
                                   "or raise opcua.timeout.") from None

    def stop(self) -> None:
        """Cancel what still runs (the client's keep-alive tasks), stop the loop and close it."""

        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)

        if not self.loop.is_closed() and self.thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(3.0)
            except Exception as exc:  # noqa: BLE001
                log.debug("Cancelling the OPC UA client's tasks: %s", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(3.0)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


# ------------------------------------------------------------------ connecting


def _password(config: OpcUa) -> str | None:
    """The password from password_env or password_file; never logged.

    Raises:
        ConfigError: the variable is not set, or the file cannot be read.
    """
    if config.password_env is not None:
        value = os.environ.get(config.password_env)
        if value is None:
            raise ConfigError(f"At 'opcua.password_env': environment variable {config.password_env} is not set. "
                              "Set it in the service's environment (an EnvironmentFile of the unit), or use "
                              "password_file.", key="opcua.password_env")
        return value
    if config.password_file is not None:
        try:
            text = Path(config.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"At 'opcua.password_file': cannot read {config.password_file} "
                              f"({exc.strerror or exc}). Check the path, its owner and mode.",
                              key="opcua.password_file") from None
        return text.splitlines()[0] if text else ""
    return None


def _connect_budget(config: OpcUa) -> float:
    # A connect is about six round trips (a few more to fetch the server's certificate): each gets the timeout.
    return 8 * config.timeout


async def _connect(config: OpcUa, password: str | None):
    """A connected, logged-in client and the resolved nodes; the client is closed again on any failure."""
    for key in ("certificate", "private_key", "server_certificate"):
        path = getattr(config, key)
        if path is not None and config.security_mode != "None" and not Path(path).is_file():
            raise ConfigError(f"At 'opcua.{key}': file {path} does not exist. Fix the path.", key=f"opcua.{key}")
    # The client reads the server's state every `timeout` seconds: that keeps the session alive between verdicts
    # and finds a dead connection. The session it asks for outlives a lost connection by a few probes only, so a
    # PLC with few sessions to give frees ours soon after a crash.
    client = Client(config.endpoint, timeout=config.timeout, watchdog_intervall=config.timeout)
    client.session_timeout = int(1000 * max(_MIN_SESSION_S, 6 * config.timeout))
    client.name = client.description = f"edge-inspect {socket.gethostname()}"
    client.application_uri = f"urn:{socket.gethostname()}:edge-inspect"
    client.product_uri = "urn:edge-inspect"
    if config.username:
        client.set_user(config.username)
    if password is not None:
        client.set_password(password)
    if config.security_mode != "None":
        uri = await _certificate_uri(config.certificate)
        if uri:
            # Servers check that the session's ApplicationUri is the one in the client's certificate.
            client.application_uri = uri
    try:
        if config.security_mode != "None":
            await client.set_security(getattr(security_policies, f"SecurityPolicy{config.security_policy}"),
                                      str(config.certificate), str(config.private_key),
                                      server_certificate=(str(config.server_certificate)
                                                          if config.server_certificate else None),
                                      mode=getattr(ua.MessageSecurityMode, config.security_mode))
        await client.connect()
    except Exception as exc:  # noqa: BLE001  (asyncua raises many kinds: each becomes one message naming a key)
        client.disconnect_socket()
        raise _connect_error(config, exc) from None
    except BaseException:  # cancelled at the timeout: leave no socket behind
        client.disconnect_socket()
        raise
    try:
        targets = await _resolve(client, config)
    except BaseException:
        await _disconnect(client)
        raise
    return client, targets


async def _certificate_uri(path: Path) -> str | None:
    """The URI in the certificate's subjectAltName (the client's ApplicationUri), if any."""
    try:
        cert = await uacrypto.load_certificate(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"At 'opcua.certificate': {path} is not a certificate (DER or PEM) ({exc}). Give the "
                          "client's certificate file.", key="opcua.certificate") from None
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _connect_error(config: OpcUa, exc: Exception) -> EdgeInspectError:
    endpoint = _shown(config.endpoint)
    if isinstance(exc, ua.UaStatusCodeError):
        status = ua.StatusCode(exc.code)
        name = status.name
        said = f"{name}: {status.doc}" if status.doc else name
        if name in ("BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected",
                    "BadUserSignatureInvalid"):
            key = "opcua.username"
            fix = "Check the user name and its password, or ask for the user to be allowed on the server."
        elif name.startswith("BadCertificate") or name in ("BadSecurityChecksFailed", "BadSecurityPolicyRejected",
                                                           "BadSecurityModeRejected"):
            key = "opcua.certificate"
            fix = ("Trust this client's certificate on the server (move it from its rejected to its trusted list), "
                   "and check security_policy and security_mode against the server's endpoints.")
        else:
            return DeliveryError(f"{endpoint} refused the connection ({said}). Check the server's state and its "
                                    "settings for clients.")
        return ConfigError(f"At '{key}': {endpoint} refused the connection ({said}). {fix}", key=key)
    text = str(exc) or type(exc).__name__
    if "No matching endpoints" in text:
        return ConfigError(f"At 'opcua.security_policy': {endpoint} offers no endpoint with security policy "
                           f"{config.security_policy} and mode {config.security_mode}. Choose a pair the server "
                           "offers, or enable it on the server.", key="opcua.security_policy")
    if "certificate mismatch" in text.lower():
        return ConfigError(f"At 'opcua.server_certificate': {endpoint} presents another certificate than "
                           f"{config.server_certificate}. Copy the server's current certificate there, or check "
                           "that the endpoint is the right server.", key="opcua.server_certificate")
    if isinstance(exc, TimeoutError):
        return DeliveryError(f"Cannot connect to {endpoint}: no answer within {config.timeout:g} s. Check that "
                                "the server runs and is reachable, or raise opcua.timeout.")
    if isinstance(exc, OSError):
        return DeliveryError(f"Cannot connect to {endpoint}: {exc.strerror or text}. Check that the server runs, "
                                "and the host and port of opcua.endpoint.")
    return DeliveryError(f"Cannot connect to {endpoint}: {type(exc).__name__}: {text}.")


async def _disconnect(client) -> None:
    if client.uaclient.state is UaClientState.CONNECTED:
        await client.disconnect()
    else:
        # The connection is lost: there is no session to close, only the socket.
        client.disconnect_socket()


# ------------------------------------------------------------------ nodes


async def _resolve(client, config: OpcUa) -> list[_Target]:
    """Parse, find and check every configured node: it exists, is a scalar Variable of an accepted type, writable.

    Raises:
        ConfigError: one line per node at fault, in the order of :data:`KEYS`, each naming its key.
    """
    endpoint = _shown(config.endpoint)
    problems: dict[str, str] = {}

    def fault(key: str, text: str) -> None:
        problems.setdefault(key, f"At 'opcua.nodes.{key}': {text}")

    parsed: list[tuple[str, str, ua.NodeId]] = []
    namespaces: list[str] | None = None
    for key in KEYS:
        text = getattr(config.nodes, key)
        if text is None:
            continue
        try:
            node = ua.NodeId.from_string(text)
        except Exception:  # noqa: BLE001  (asyncua raises several kinds for a malformed id)
            fault(key, f"{text!r} is not a node id. Write it as ns=3;s=Name, ns=3;i=1001 or nsu=URI;s=Name.")
            continue
        uri = getattr(node, "NamespaceUri", None)
        if uri:
            # The namespace's index may change when the PLC program changes; its URI does not.
            namespaces = namespaces if namespaces is not None else await client.get_namespace_array()
            if uri not in namespaces:
                fault(key, f"{endpoint} has no namespace {uri!r} (node {text}); its namespaces are "
                           f"{', '.join(map(repr, namespaces))}. Fix the URI.")
                continue
            node = ua.NodeId(node.Identifier, namespaces.index(uri), node.NodeIdType)
        parsed.append((key, text, node))
    seen: dict[ua.NodeId, str] = {}
    for key, text, node in parsed:
        if node in seen:
            fault(key, f"node {text} is also nodes.{seen[node]}: each value needs a node of its own. Fix one of them.")
        seen.setdefault(node, key)

    attributes = (ua.AttributeIds.NodeClass, ua.AttributeIds.DataType, ua.AttributeIds.ValueRank,
                  ua.AttributeIds.UserAccessLevel)
    params = ua.ReadParameters()
    params.NodesToRead = [ua.ReadValueId(NodeId=node, AttributeId=a) for _, _, node in parsed for a in attributes]
    values = await client.uaclient.read(params) if parsed else []
    targets = []
    for i, (key, text, node) in enumerate(parsed):
        node_class, data_type, rank, access = values[i * len(attributes):(i + 1) * len(attributes)]
        if not node_class.StatusCode.is_good():
            name = node_class.StatusCode.name
            if name in ("BadNodeIdUnknown", "BadNodeIdInvalid"):
                fault(key, f"node {text} does not exist on {endpoint}. Browse the server (UaExpert, or `uabrowse`) "
                           "for the right node id, or add the variable to the PLC program.")
            else:
                fault(key, f"node {text} cannot be read on {endpoint} ({name}). Check the user's rights on it.")
            continue
        if node_class.Value.Value != ua.NodeClass.Variable:
            fault(key, f"node {text} is of class {ua.NodeClass(node_class.Value.Value).name}, not a Variable. Give "
                       "a variable's node id.")
            continue
        dtype = data_type.Value.Value if data_type.StatusCode.is_good() else None
        variant = _variant(dtype)
        if variant not in ACCEPTED[key]:
            found = variant or await _type_name(client, dtype)
            fault(key, f"node {text} is a {found} variable; {key} needs {' or '.join(ACCEPTED[key])}. Change the "
                       "variable's type in the PLC program, or give another node.")
            continue
        if rank.StatusCode.is_good() and rank.Value.Value is not None and rank.Value.Value >= 0:
            fault(key, f"node {text} is an array (ValueRank {rank.Value.Value}); {key} needs a scalar. Give a scalar "
                       "variable.")
            continue
        level = access.Value.Value if access.StatusCode.is_good() else None
        if level is not None and not level & (1 << ua.AccessLevel.CurrentWrite):
            who = f"user {config.username}" if config.username else "an anonymous client"
            fault(key, f"node {text} is not writable by {who}. Make it writable from OPC UA in the PLC program, or "
                       "log in as a user that may write it.")
            continue
        targets.append(_Target(key, text, node, variant))
    if problems:
        first = next(key for key in KEYS if key in problems)
        raise ConfigError("\n".join(problems[key] for key in KEYS if key in problems), key=f"opcua.nodes.{first}")
    return targets


def _variant(dtype) -> str | None:
    """The built-in type name of a DataType NodeId of namespace 0 (``"Double"``), None for any other."""
    if dtype is None or dtype.NamespaceIndex != 0 or not isinstance(dtype.Identifier, int):
        return None
    try:
        return ua.VariantType(dtype.Identifier).name
    except ValueError:
        return None


async def _type_name(client, dtype) -> str:
    """The data type's browse name, for messages (its node id when that cannot be read)."""
    if dtype is None:
        return "untyped"
    try:
        return (await client.get_node(dtype).read_browse_name()).Name
    except Exception:  # noqa: BLE001
        return dtype.to_string()


# ------------------------------------------------------------------ writing


async def _write_record(client, endpoint: str, record, sequence) -> None:
    """Write the record's values, then (once acknowledged) its sequence.

    Raises:
        EdgeInspectError: a write's status is not Good.
    """
    for batch in (record, sequence):
        if batch:
            await _write(client, endpoint, batch)


async def _write(client, endpoint: str, batch) -> None:
    params = ua.WriteParameters()
    # No timestamps: many PLCs (S7-1200/1500, Kepware) answer BadWriteNotSupported to a write that carries one.
    params.NodesToWrite = [
        ua.WriteValue(NodeId=target.node, AttributeId=ua.AttributeIds.Value,
                      Value=ua.DataValue(ua.Variant(target.value(value), getattr(ua.VariantType, target.variant))))
        for target, value in batch]
    try:
        statuses = await client.uaclient.write(params)
    except ua.UaStatusCodeError as exc:
        status = ua.StatusCode(exc.code)
        raise DeliveryError(f"{_shown(endpoint)} refused the write request ({status.name}: {status.doc}).") from exc
    except (OSError, ua.UaError) as exc:
        raise DeliveryError(f"Lost the connection to {_shown(endpoint)} ({type(exc).__name__}: {exc}).") from exc
    bad = [(target, status) for (target, _), status in zip(batch, statuses) if not status.is_good()]
    if len(statuses) != len(batch):
        raise DeliveryError(f"{_shown(endpoint)} answered {len(statuses)} statuses to {len(batch)} writes.")
    if bad:
        said = "; ".join(f"nodes.{t.key} ({t.text}): {s.name}" for t, s in bad)
        raise DeliveryError(f"{_shown(endpoint)} refused the write of {said}. Check the nodes' types and rights "
                               "(edge-inspect config check).")


def _shown(endpoint: str) -> str:
    """The endpoint without a user or password written into it."""
    parts = urlsplit(endpoint)
    if "@" not in parts.netloc:
        return endpoint
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
