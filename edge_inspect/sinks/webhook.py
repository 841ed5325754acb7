"""The webhook sink: each verdict's JSON POSTed to a URL, for a MES or any HTTP receiver.

:class:`WebhookSink` is a :class:`~edge_inspect.outbox.Delivery`: the
:class:`~edge_inspect.outbox.Outbox` hands it the verdicts after its cursor,
and moves the cursor once :meth:`WebhookSink.deliver` returns. The contract
with the receiver:

- one ``POST`` per verdict, in ledger order, the body the message's compact
  JSON (``Content-Type: application/json``);
- an ``Idempotency-Key`` header holding the message id: a verdict may arrive
  twice (a timeout after the receiver stored it, a restart), and the
  receiver drops the second by that key;
- any 2xx status acknowledges the verdict. Anything else fails the batch,
  which the outbox sends again, from its first verdict, after a backoff: a
  3xx (redirects are not followed: a ``POST`` silently turned into a ``GET``
  would lose the verdict), a 4xx, a 5xx, a timeout, a connection or TLS
  error. The error names the status and the start of the answer's body, or
  the network error.

Configured header values (an ``Authorization`` token) never appear in a log
line or an error, nor does a password or query string in the URL. Proxies,
``.netrc`` and certificate paths from the environment are ignored: the
configuration alone says where and how verdicts go.

    >>> sink = WebhookSink(config.webhooks["mes"], name="mes", source="line2", installation="pc-17")
    >>> Outbox("line2", ledger_path, sink, installation="pc-17").start()
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from edge_inspect import __version__
from edge_inspect.config import Webhook
from edge_inspect.errors import ConfigError, DeliveryError
from edge_inspect.outbox import Message

log = logging.getLogger(__name__)

# httpx logs every request at INFO with its whole URL (a key in the query string too): one journal line per verdict.
# Quiet it, unless someone set its level on purpose.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

#: Characters of a refused answer's body quoted in the error.
BODY_EXCERPT = 200
#: Bytes of a refused answer's body read at most (the excerpt is cut from them).
_BODY_READ = 4096
#: Headers the sink sets itself, which the configuration may not: they would break the protocol.
RESERVED = ("idempotency-key", "content-length", "transfer-encoding", "host", "connection")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class WebhookError(DeliveryError):
    """The receiver did not acknowledge a verdict: a status other than 2xx, a timeout, a network or TLS error.

    Messages end without a full stop: the outbox quotes them inside a sentence of its own.
    """


class WebhookSink:
    """POST each verdict to ``config.url``; a 2xx answer acknowledges it.

    Args:
        config: the ``[webhooks.NAME]`` section.
        name: NAME; the sink's cursor is ``webhook:NAME``.
        source: the source whose verdicts this sink sends (for messages).
        installation: this PC's id (for messages).

    Raises:
        ConfigError: a header that cannot be sent as configured (a name that
            is not an HTTP token, a value with a line break or a character
            outside ASCII, or a header the sink sets itself); the message
            names the header, never its value.
    """

    def __init__(self, config: Webhook, *, name: str, source: str, installation: str):
        self.config = config
        self.name = f"webhook:{name}"
        self.key = f"webhooks.{name}"
        self.source = source
        self.installation = installation
        self.url = _shown(config.url)
        self.headers = {"Content-Type": "application/json", "User-Agent": f"edge-inspect/{__version__}"}
        for header, value in config.headers.items():
            self.headers[_checked(self.key, header, value)] = value
        # Longest first, so that a value containing another is hidden whole.
        self._secrets = sorted({v for v in config.headers.values() if len(v) >= 3}, key=len, reverse=True)
        self._client: httpx.Client | None = None
        if config.verify is False:
            log.warning("Webhook %s: verify is false: the certificate of %s is not checked, and anyone on the path "
                        "can read or answer in its place.", self.key, self.url)

    # ------------------------------------------------------------ Delivery

    def open(self) -> None:
        """Make the HTTP client (connections are opened by the first POST).

        Raises:
            WebhookError: ``verify`` names a CA file that cannot be read or holds no certificate.
        """
        self.close()
        self._client = httpx.Client(timeout=self.config.timeout, verify=self._tls(), headers=self.headers,
                                    follow_redirects=False, trust_env=False)

    def deliver(self, messages: Sequence[Message]) -> None:
        """POST each message in order; return once every one was answered with a 2xx status.

        Raises:
            WebhookError: at the first message not acknowledged, saying why
                (the messages before it were; the outbox sends the batch again).
        """
        if self._client is None:
            raise WebhookError(f"Webhook {self.key}: deliver() before open(); the outbox opens the sink first")
        for message in messages:
            self._post(self._client, message)
        log.debug("Webhook %s: %d verdict(s) of source %s acknowledged by %s (up to sequence %d).", self.key,
                  len(messages), self.source, self.url, messages[-1].row_id if messages else 0)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.close()
        except Exception as exc:  # noqa: BLE001  (close never raises: the outbox calls it while handling a failure)
            log.debug("Webhook %s: closing the client failed: %s", self.key, type(exc).__name__)

    # ------------------------------------------------------------ one POST

    def _post(self, client: httpx.Client, message: Message) -> None:
        what = f"verdict {message.message_id}"
        try:
            with client.stream("POST", self.config.url, content=message.body,
                               headers={"Idempotency-Key": message.message_id}) as response:
                status = response.status_code
                if 200 <= status < 300:
                    response.read()  # to the end, so that the connection can carry the next POST
                    return
                body = _start_of(response)
                location = response.headers.get("Location")
        except httpx.TimeoutException as exc:
            raise WebhookError(
                f"No answer from {self.url} within {self.config.timeout:g} s "
                f"({_timeout_kind(exc)}) to {what}. The receiver may have stored it: it will come again with the "
                f"same Idempotency-Key. If the receiver is just slow, raise {self.key}.timeout") from None
        except httpx.HTTPError as exc:
            raise self._network_error(exc, what) from None
        reason = f"{status} {_phrase(status)}".rstrip()
        if 300 <= status < 400:
            raise WebhookError(
                f"{self.url} answered {reason}, a redirect to "
                f"{_shown(location) if location else '(no Location header)'}, to {what}; redirects are not "
                f"followed. Set {self.key}.url to the URL the receiver really takes")
        raise WebhookError(f"{self.url} answered {reason} to {what}, not a 2xx acknowledgement: {self._redact(body)!r}")

    def _network_error(self, exc: httpx.HTTPError, what: str) -> WebhookError:
        cause = exc
        while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None and "hostname" in (cause.verify_message or "").lower():
            return WebhookError(
                f"The TLS certificate of {self.url} is for another host ({cause.verify_message}). Write the host "
                f"name or address the certificate names in {self.key}.url, or have the certificate fixed")
        if cause is not None:
            verify = self.config.verify
            against = f"the CA file {verify}" if isinstance(verify, Path) else "this PC's trusted CAs"
            return WebhookError(
                f"The TLS certificate of {self.url} is not trusted ({cause.verify_message}; checked against "
                f"{against}). Set {self.key}.verify to the PEM file of the CA that signed it, or have the "
                "receiver's certificate fixed")
        said = self._redact(str(exc)) or type(exc).__name__
        return WebhookError(f"Cannot send {what} to {self.url} ({type(exc).__name__}: {said}). Check that the "
                            "receiver runs and that this PC reaches it")

    # ------------------------------------------------------------ helpers

    def _tls(self) -> ssl.SSLContext | bool:
        verify = self.config.verify
        if verify is False:
            return False
        if verify is True:
            # The system's CA store (where a plant installs its own CA), rather than httpx's bundled certifi.
            return ssl.create_default_context()
        try:
            return ssl.create_default_context(cafile=str(verify))
        except (OSError, ssl.SSLError) as exc:
            said = getattr(exc, "strerror", None) or str(exc)
            raise WebhookError(f"At '{self.key}.verify': cannot load the CA file {verify} ({said}). Expected a "
                               "readable PEM file of CA certificates; fix the path or the file") from None

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "****")
        return text


def _checked(key: str, header: str, value: str) -> str:
    at = f"At '{key}.headers.{header}'"
    if not _TOKEN.match(header):
        raise ConfigError(f"{at}: not a valid HTTP header name. Use letters, digits and '-'.",
                          key=f"{key}.headers")
    if header.lower() in RESERVED:
        raise ConfigError(f"{at}: the sink sets this header itself. Remove it.", key=f"{key}.headers.{header}")
    if not value.isascii() or any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{at}: the value holds a line break, a NUL or a character outside ASCII, which HTTP "
                          "cannot carry. Fix the value.", key=f"{key}.headers.{header}")
    return header


def _shown(url: str) -> str:
    """The URL as messages show it: without a user name, password, query or fragment (any may hold a secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unreadable URL)"
    host = f"[{host}]" if ":" in host else host
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}" if parts.scheme else f"{parts.path}{query}"


def _start_of(response: httpx.Response) -> str:
    """The first characters of a refused answer's body, on one line."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= _BODY_READ:
                break
    except httpx.HTTPError:
        pass  # the status says enough
    try:
        text = data[:_BODY_READ].decode(response.charset_encoding or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        text = data[:_BODY_READ].decode("utf-8", "replace")
    return " ".join(text.split())[:BODY_EXCERPT]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _timeout_kind(exc: httpx.TimeoutException) -> str:
    return {httpx.ConnectTimeout: "connecting", httpx.ReadTimeout: "waiting for the answer",
            httpx.WriteTimeout: "sending", httpx.PoolTimeout: "waiting for a connection"}.get(type(exc), "timeout")
