"""The MQTT sink: each verdict published to a broker with QoS 1, for the outbox to drive.

This module owns the connection to one broker for one source: a paho-mqtt
client speaking MQTT 5 under a fixed client id, with a persistent session,
a retained ``online`` / ``offline`` status, and a ``deliver`` that returns
only once the broker acknowledged every message (PUBACK). The
:class:`~edge_inspect.outbox.Outbox` moves its cursor only then, so a
verdict is delivered at least once whatever fails in between.

Why MQTT 5 rather than 3.1.1:

- **a refused publish is an error, not a silent loss.** A 3.1.1 broker that
  denies a topic (ACL, quota) can only acknowledge the message and drop it,
  or close the connection (mosquitto 2.0 acknowledges, then closes): the
  cursor would move past verdicts that never arrived. MQTT 5 puts a reason
  code in the PUBACK, and :meth:`MqttSink.deliver` raises on any failure.
- the session's lifetime is the client's to choose (``SessionExpiryInterval``),
  not a broker-wide setting;
- each message carries its id as a user property (``message_id``): a
  receiver drops duplicates without parsing the JSON;
- a refused login says why (bad user name or password, not authorised,
  banned), and a stop that could not publish ``offline`` itself asks the
  broker to publish the will instead (DISCONNECT reason 0x04).

The brokers in common use speak MQTT 5 (mosquitto since 1.6, EMQX, HiveMQ,
VerneMQ, AWS IoT Core); one that does not is named in the error.

    >>> sink = MqttSink(config.mqtt, source="line2", installation="pc-17")
    >>> sink.open()                 # connected; status topic reads "online"
    >>> sink.deliver(messages)      # returns once every PUBACK arrived
    >>> sink.close()                # status "offline", then DISCONNECT
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_inspect.config import Mqtt
from edge_inspect.errors import ConfigError, DeliveryError
from edge_inspect.outbox import Message

log = logging.getLogger(__name__)

#: How long the broker keeps this client's session while it is away. A publisher's QoS 1 session holds little (the
#: ledger holds the verdicts, and paho resends what was in flight when the connection comes back), so a week is
#: generous: it covers a PC off over a long weekend, and the session of a PC taken off the line still goes away.
SESSION_EXPIRY_S = 7 * 86400
#: Messages in flight (published, PUBACK not yet in) at most; the broker's Receive Maximum lowers it.
MAX_INFLIGHT = 100
#: Seconds a stop waits for the broker to acknowledge the retained "offline", and for the DISCONNECT to be written.
CLOSE_WAIT_S = 2.0
#: Longest pause between paho's own reconnection attempts while a connection is open.
RECONNECT_MAX_S = 30
ONLINE, OFFLINE = b"online", b"offline"

# MQTT 5 CONNACK and DISCONNECT reason codes this module explains.
_UNSUPPORTED_VERSION, _BAD_LOGIN, _NOT_AUTHORIZED, _BANNED = 0x84, 0x86, 0x87, 0x8A
_SESSION_TAKEN_OVER = 0x8E
_DISCONNECT_WITH_WILL = 0x04


class _PahoToDebug(logging.Filter):
    """paho's own log, at DEBUG: what goes wrong reaches the log once, as this module's error or the outbox's.

    paho logs a refused connection or a reset socket at ERROR on every attempt (and, in 2.2, "Client is
    not connected" after every clean DISCONNECT); the outbox logs an outage once when it starts and once
    when it ends. An exception in this module's callbacks stays at ERROR.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and not str(record.msg).startswith("Caught exception"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return _paho_log.isEnabledFor(logging.DEBUG)
        return True


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_PahoToDebug())


class MqttError(DeliveryError):
    """The broker cannot be reached, refused the connection, or did not acknowledge a message."""


class MqttSink:
    """Publish verdicts to an MQTT broker: the outbox's :class:`~edge_inspect.outbox.Delivery` for ``[mqtt]``.

    Args:
        config: the ``[mqtt]`` section.
        source: the source's name: in the topics and the client id.
        installation: this PC's id (``ServiceConfig.installation``): likewise.

    Raises:
        ConfigError: the password's variable or file is missing or empty,
            a TLS file cannot be read, or a topic holds a wildcard.
    """

    name = "mqtt"

    def __init__(self, config: Mqtt, *, source: str, installation: str):
        self.config = config
        self.source = source
        self.installation = installation
        self.topic = _fill(config.topic, installation, source)
        self.status_topic = _fill(config.status_topic, installation, source)
        self.client_id = _fill(config.client_id, installation, source)
        self.port = config.port or (8883 if config.tls is not None else 1883)
        self.broker = f"{config.host}:{self.port}"
        for key, topic in (("mqtt.topic", self.topic), ("mqtt.status_topic", self.status_topic)):
            if not topic or "+" in topic or "#" in topic or "\0" in topic:
                raise ConfigError(f"At '{key}': {topic!r} is not a topic to publish on: it is empty or holds a "
                                  "wildcard (+ or #) or a NUL. Write a plain topic; {installation} and {source} "
                                  "are replaced.", key=key)
        if config.tls is not None:
            tls = config.tls
            if tls.key_file is not None and tls.cert is None:
                raise ConfigError("At 'mqtt.tls.cert': a key_file is set but no cert. Set cert to this client's "
                                  "certificate, or remove key_file.", key="mqtt.tls.cert")
            for key, path in (("ca", tls.ca), ("cert", tls.cert), ("key_file", tls.key_file)):
                _check_readable(f"mqtt.tls.{key}", path)
        self._password()  # a missing variable or file stops the service at start, not at the first connect
        self._client: mqtt.Client | None = None
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._dropped: str | None = None
        self._acks: dict[int, ReasonCode] = {}  # PUBACKs not yet taken, by message id (mid)
        self._ignore: set[int] = set()  # mids no one waits for: their PUBACK must not pass for a later one's
        self._window = MAX_INFLIGHT
        self._closing = False
        self._gone = False

    # ------------------------------------------------------------ the Delivery protocol

    def open(self) -> None:
        """Connect, with the last will set; publish the retained ``online``.

        Raises:
            ConfigError: the password's variable or file went missing.
            MqttError: the broker cannot be reached, refused the login, or
                did not answer within ``mqtt.timeout``.
        """
        self.close()
        password = self._password()
        timeout = self.config.timeout
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        client.enable_logger(_paho_log)  # at DEBUG (_PahoToDebug); it logs whether a password is set, never it
        client.connect_timeout = timeout
        client.reconnect_delay_set(1, RECONNECT_MAX_S)
        client.max_inflight_messages = MAX_INFLIGHT  # deliver() keeps to the broker's lower limit, if any
        if self.config.username is not None or password is not None:
            client.username_pw_set(self.config.username, password)
        if self.config.tls is not None:
            self._tls(client)
        client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        with self._cond:
            self._connack, self._dropped, self._acks, self._ignore, self._closing = None, None, {}, set(), False
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            client.connect(self.config.host, self.port, self.config.keepalive, clean_start=False,
                           properties=properties)
        except (OSError, ValueError) as exc:  # socket errors, TLS errors (ssl.SSLError is an OSError)
            raise MqttError(self._unreachable(exc)) from None
        client.loop_start()
        with self._cond:
            answered = self._cond.wait_for(lambda: self._connack is not None or self._dropped is not None, timeout)
            connack, dropped = self._connack, self._dropped
        if not answered or connack is None or connack.is_failure:
            self._stop(client)
            if connack is not None:
                raise MqttError(self._refused(connack))
            if dropped is not None:
                tls = " and that it expects TLS" if self.config.tls else ", and whether it expects TLS ([mqtt.tls])"
                raise MqttError(f"MQTT broker {self.broker} closed the connection before accepting it ({dropped}). "
                                f"Check that port {self.port} is its MQTT port{tls}, and that it speaks MQTT 5.")
            raise MqttError(f"MQTT broker {self.broker} accepted the TCP connection but did not answer the MQTT "
                            f"CONNECT within {timeout:g} s (mqtt.timeout). Check that port {self.port} is its MQTT "
                            "port, with TLS if it expects TLS.")
        self._client = client
        try:
            self._publish_all(client, [(self.status_topic, ONLINE, True, None)], timeout)
        except MqttError:
            self._stop(client)
            self._client = None
            raise
        log.info("Connected to MQTT broker %s as %s (MQTT 5, QoS 1); verdicts of %s go to %s.", self.broker,
                 self.client_id, self.source, self.topic)

    def deliver(self, messages: Sequence[Message]) -> None:
        """Publish each message with QoS 1, in order; return once the broker acknowledged all of them.

        Raises:
            MqttError: no PUBACK for ``mqtt.timeout`` seconds (the broker is
                gone, or stalled), or a PUBACK with a failure reason code
                (not authorised, quota exceeded...).
        """
        if self._client is None:
            raise MqttError(f"Not connected to MQTT broker {self.broker}: open() first.")
        items = []
        for m in messages:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = ("message_id", m.message_id)
            properties.ContentType = "application/json"
            properties.PayloadFormatIndicator = 1  # UTF-8 text
            items.append((self.topic, m.body, False, properties))
        self._publish_all(self._client, items, self.config.timeout, [m.message_id for m in messages])

    def close(self) -> None:
        """Publish the retained ``offline`` (when connected), disconnect, stop the network thread; never raises."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            clean = False
            if client.is_connected():
                try:
                    self._publish_all(client, [(self.status_topic, OFFLINE, True, None)],
                                      min(CLOSE_WAIT_S, self.config.timeout))
                    clean = True
                except MqttError as exc:
                    log.debug("MQTT broker %s did not acknowledge 'offline' (%s); asking it for the will.",
                              self.broker, exc)
            with self._cond:
                self._closing, self._gone = True, False
            # Not acknowledged: the broker publishes the will ("offline") as if the connection had dropped.
            client.disconnect(reasoncode=None if clean else ReasonCode(PacketTypes.DISCONNECT,
                                                                        identifier=_DISCONNECT_WITH_WILL))
        except Exception as exc:  # noqa: BLE001  (close never raises; the outbox reconnects anyway)
            log.debug("Closing the MQTT connection to %s: %s", self.broker, exc)
        self._stop(client, disconnect=False)

    # ------------------------------------------------------------ publishing

    def _publish_all(self, client: mqtt.Client, items: list[tuple], timeout: float,
                     ids: Sequence[str] | None = None) -> None:
        """Publish ``(topic, body, retain, properties)`` items in order, at most a window in flight; wait for PUBACKs.

        ``timeout`` counts from the last progress: a long batch on a slow
        link is not cut short while acknowledgements keep coming.
        """
        outstanding: dict[int, int] = {}  # mid -> index in items
        try:
            self._publish_in_order(client, items, timeout, ids, outstanding)
        except BaseException:
            with self._cond:  # abandoned: their PUBACKs, if they come, belong to no one
                for mid in outstanding:
                    if self._acks.pop(mid, None) is None:
                        self._ignore.add(mid)
            raise

    def _publish_in_order(self, client: mqtt.Client, items: list[tuple], timeout: float, ids: Sequence[str] | None,
                          outstanding: dict[int, int]) -> None:
        sent = acked = 0
        deadline = time.monotonic() + timeout
        while acked < len(items):
            while sent < len(items) and sent - acked < self._window:
                topic, body, retain, properties = items[sent]
                info = client.publish(topic, body, qos=1, retain=retain, properties=properties)
                # NO_CONN: queued in the client, sent when it has reconnected (it retries on its own).
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    raise MqttError(f"Cannot publish to MQTT broker {self.broker} on {topic}: "
                                    f"{mqtt.error_string(info.rc)}.")
                outstanding[info.mid] = sent
                sent += 1
            with self._cond:
                self._cond.wait_for(lambda: any(mid in self._acks for mid in outstanding),
                                    max(0.0, deadline - time.monotonic()))
                done = {mid: self._acks.pop(mid) for mid in list(outstanding) if mid in self._acks}
                dropped = self._dropped
            for mid, reason in done.items():
                index = outstanding.pop(mid)
                if reason.is_failure:
                    what = f"message {ids[index]}" if ids else "the status"
                    raise MqttError(f"MQTT broker {self.broker} refused {what} on topic {items[index][0]}: "
                                    f"{reason}{_refusal_hint(reason, self.config.username)}")
            if done:
                acked += len(done)
                deadline = time.monotonic() + timeout
            elif time.monotonic() >= deadline:
                state = f"the connection dropped ({dropped}) and is not back" if dropped else "it is connected"
                raise MqttError(f"MQTT broker {self.broker} did not acknowledge {len(outstanding)} of "
                                f"{len(items)} message(s) within {timeout:g} s (mqtt.timeout); {state}.")

    # ------------------------------------------------------------ paho's callbacks (its network thread)

    def _on_connect(self, client, userdata, flags, reason: ReasonCode, properties) -> None:
        receive_max = getattr(properties, "ReceiveMaximum", None)
        with self._cond:
            again = self._connack is not None and not self._connack.is_failure
            if not reason.is_failure:
                # Never more in flight than the broker takes: paho ignores its Receive Maximum, and resends
                # everything unacknowledged at once after a reconnect.
                self._window = min(MAX_INFLIGHT, receive_max or MAX_INFLIGHT)
                if again:
                    log.info("MQTT broker %s reachable again (the connection had dropped: %s).", self.broker,
                             self._dropped)
                self._dropped = None
            self._connack = reason
            self._cond.notify_all()
        if again and not reason.is_failure:
            # paho reconnected on its own; the broker published the will ("offline") when the connection dropped.
            # Its PUBACK comes on this thread, after this callback: no race with the line below.
            info = client.publish(self.status_topic, ONLINE, qos=1, retain=True)
            with self._cond:
                self._ignore.add(info.mid)

    def _on_disconnect(self, client, userdata, flags, reason: ReasonCode, properties) -> None:
        with self._cond:
            closing = self._closing
            if closing:
                self._gone = True
            else:
                self._dropped = str(reason)
            self._cond.notify_all()
        if closing or self._connack is None or self._connack.is_failure:
            return
        if reason == _SESSION_TAKEN_OVER:
            log.warning("MQTT broker %s dropped this connection: another client connected with the same client "
                        "id %s. Each PC needs its own service.installation_id (or mqtt.client_id).", self.broker,
                        self.client_id)
        else:
            log.warning("MQTT connection to %s lost (%s); reconnecting.", self.broker, reason)

    def _on_publish(self, client, userdata, mid: int, reason: ReasonCode, properties) -> None:
        with self._cond:
            if mid in self._ignore:
                self._ignore.discard(mid)
                return
            self._acks[mid] = reason
            self._cond.notify_all()

    # ------------------------------------------------------------ helpers

    def _stop(self, client: mqtt.Client, *, disconnect: bool = True) -> None:
        """Stop the network thread once the DISCONNECT is written (or no connection is left to close)."""
        if disconnect:
            with self._cond:
                self._closing, self._gone = True, False
            try:
                client.disconnect()  # no effect when no socket is open
            except Exception:  # noqa: BLE001
                pass
        with self._cond:
            # The network thread writes the DISCONNECT: let it, rather than stop it with the packet still queued.
            self._cond.wait_for(lambda: self._gone or client.socket() is None, CLOSE_WAIT_S)
        client.loop_stop()

    def _password(self) -> str | None:
        """The password from ``password_env`` or ``password_file`` (its first line), or None."""
        config = self.config
        if config.password_env is not None and config.password_file is not None:
            raise ConfigError("At 'mqtt.password_file': both password_env and password_file are set. Keep one.",
                              key="mqtt.password_file")
        if config.password_env is not None:
            value = os.environ.get(config.password_env)
            if not value:
                state = "is empty" if value is not None else "is not set"
                raise ConfigError(f"At 'mqtt.password_env': the environment variable {config.password_env} {state}. "
                                  "Set it (for the service: Environment= or EnvironmentFile= in a drop-in of the "
                                  "unit), or use mqtt.password_file.", key="mqtt.password_env")
            return value
        if config.password_file is not None:
            path = config.password_file
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise ConfigError(f"At 'mqtt.password_file': {path} does not exist. Create it with the password on "
                                  "its first line (mode 0600, readable by the service's user), or fix the path.",
                                  key="mqtt.password_file") from None
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(f"At 'mqtt.password_file': cannot read {path} ({reason}). Check its owner and "
                                  "mode: the service's user must read it.", key="mqtt.password_file") from None
            if not lines or not lines[0]:
                raise ConfigError(f"At 'mqtt.password_file': the first line of {path} is empty. Put the password "
                                  "there.", key="mqtt.password_file")
            return lines[0]
        return None

    def _password_origin(self) -> str:
        if self.config.password_env is not None:
            return f"the password in ${self.config.password_env} (mqtt.password_env)"
        if self.config.password_file is not None:
            return f"the password in {self.config.password_file} (mqtt.password_file)"
        return "the password (none is set: mqtt.password_env or mqtt.password_file)"

    def _tls(self, client: mqtt.Client) -> None:
        tls = self.config.tls
        try:
            client.tls_set(ca_certs=_str(tls.ca), certfile=_str(tls.cert), keyfile=_str(tls.key_file))
        except (OSError, ValueError) as exc:  # ssl.SSLError: a file that is not PEM, a key that does not match
            raise ConfigError(f"At 'mqtt.tls': the TLS files cannot be used ({exc}). Check that ca, cert and "
                              "key_file are PEM files and that the key belongs to the certificate.",
                              key="mqtt.tls") from None

    def _unreachable(self, exc: Exception) -> str:
        at = f"Cannot connect to MQTT broker {self.broker}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"{at}: its TLS certificate is not trusted ({exc.verify_message}). Set mqtt.tls.ca to the CA "
                    "that signed it, and check that mqtt.host is a name (or address) the certificate holds.")
        if isinstance(exc, ssl.SSLError):
            return (f"{at}: the TLS handshake failed ({exc.reason or exc}). Check that port {self.port} expects TLS, "
                    "and the files of mqtt.tls.")
        if isinstance(exc, ConnectionResetError) and self.config.tls is not None:
            return (f"{at}: it reset the connection during the TLS handshake. Check that port {self.port} expects "
                    "TLS (plain MQTT is usually 1883, TLS 8883).")
        if isinstance(exc, ConnectionRefusedError):
            return f"{at}: connection refused. Check that the broker runs and listens on port {self.port}."
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return (f"{at}: no answer within {self.config.timeout:g} s (mqtt.timeout). Check the address, the "
                    "network and the firewall.")
        if isinstance(exc, socket.gaierror):
            return f"{at}: the host name {self.config.host!r} cannot be resolved ({exc.strerror}). Check mqtt.host."
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return f"{at}: {reason}."

    def _refused(self, reason: ReasonCode) -> str:
        at = f"MQTT broker {self.broker} refused the connection of client {self.client_id}"
        login = f"check mqtt.username ({self.config.username!r}) and {self._password_origin()}"
        if reason == _BAD_LOGIN:
            return f"{at}: bad user name or password: {login}."
        if reason == _NOT_AUTHORIZED:
            return (f"{at}: not authorized (bad user name or password, or a user the broker does not let in): "
                    f"{login}, and the broker's access rules.")
        if reason == _UNSUPPORTED_VERSION:
            return f"{at}: it does not speak MQTT 5. Upgrade it (mosquitto 1.6 or later), or use another broker."
        if reason == _BANNED:
            return f"{at}: this client is banned. Ask the broker's administrator."
        return f"{at}: {reason} (MQTT 5 reason code 0x{reason.value:02X})."


def _fill(template: str, installation: str, source: str) -> str:
    return template.replace("{installation}", installation).replace("{source}", source)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _check_readable(key: str, path: Path | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"At '{key}': {path} does not exist. Fix the path.", key=key) from None
    except OSError as exc:
        raise ConfigError(f"At '{key}': cannot read {path} ({exc.strerror or exc}). Check its owner and mode: the "
                          "service's user must read it.", key=key) from None


def _refusal_hint(reason: ReasonCode, username: str | None) -> str:
    if reason == _NOT_AUTHORIZED:
        who = f"user {username!r}" if username else "anonymous clients"
        return f". The broker's access rules do not let {who} publish there: fix them, or mqtt.topic."
    return "."
