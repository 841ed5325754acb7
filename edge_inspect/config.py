"""The service configuration: one typed, immutable object, and the only home of every default.

``edge-inspect serve --config FILE`` and ``edge-inspect watch DIR --model M``
both build a :class:`ServiceConfig` and run the same code
(:mod:`edge_inspect.service`). Values come in four layers, each over the
one before::

    defaults  <  TOML file  <  environment (EDGE_INSPECT_...)  <  command-line flags

- **file**: ``[sources.NAME]`` tables, one per hot folder or camera, and the
  ``[http]``, ``[disk]`` and ``[service]`` tables; see
  ``deploy/config.example.toml`` for every key.
- **environment**: ``EDGE_INSPECT_`` and the key path joined by double
  underscores, case-insensitive: ``EDGE_INSPECT_HTTP__PORT=9200``,
  ``EDGE_INSPECT_SOURCES__LINE2__THRESHOLD=0.31``. Values are read as TOML
  values (``true``, ``12``, ``["*.bmp"]``), or as text when they are not one.
- **flags**: the CLI hands a dict of key paths; it alone knows which flag
  sets which key, and maps keys back to flags in its error messages.

Errors name the key, what was wrong and the fix::

    At 'sources.line2.path': folder /srv/x does not exist. Create it or fix the path.

:func:`load` builds and validates the object (types, ranges, cross-field
rules); :func:`check` also looks at the machine (folders, permissions,
model folders and their checksums) without starting anything.

    >>> config = load("/etc/edge-inspect/config.toml")
    >>> config.sources["line2"].settle
    1.0
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_inspect.errors import ConfigError

#: Prefix of the environment variables that set configuration keys.
ENV_PREFIX = "EDGE_INSPECT_"
#: Names a source may have: they appear in metric labels, file names and key paths.
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: Key names whose values are never printed.
SECRET = re.compile(r"password|secret|token|key_file|private|authorization|api[-_]?key", re.IGNORECASE)
#: The ledger of a camera source when none is given: in the working directory.
CAMERA_LEDGER = "edge-inspect-ledger.sqlite"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def seconds(value: Any) -> Any:
    """A duration as seconds: a number, or text such as ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write seconds (90) or 90s, 30m, 12h, 7d, 2w")
        return float(match.group(1)) * _SECONDS[match.group(2)]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------ sources


class Sinks(_Section):
    """What happens to a part after its verdict is committed."""

    sort: bool = Field(False, description="Move each file into ok/, ng/ or error/ inside the watched folder "
                                          "(folder sources only).")
    heatmaps: Path | None = Field(None, description="Folder for an anomaly-map overlay (PNG) of each NG part.")
    heatmaps_all: bool = Field(False, description="Overlays of OK parts too, not only of NG parts (needs "
                                                  "sinks.heatmaps).")
    results: Path | None = Field(None, description="JSONL file: one line per verdict.")

    @model_validator(mode="after")
    def _overlays_need_a_folder(self) -> Sinks:
        if self.heatmaps_all and self.heatmaps is None:
            raise ValueError("@heatmaps_all overlays of every part need a folder: set sinks.heatmaps too, or drop "
                             "heatmaps_all")
        return self


class Retention(_Section):
    """Caps that keep a source's outputs from filling the disk; rows whose sinks are pending are never dropped."""

    sorted_max_age: float | None = Field(None, gt=0, description="Delete sorted parts older than this (seconds, "
                                                                 "or 30d, 12h...).")
    sorted_max_bytes: ByteSize | None = Field(None, gt=0, description="Delete the oldest sorted parts beyond this "
                                                                      "total size (bytes, or 20GB, 500MiB...).")
    heatmaps_max_age: float | None = Field(None, gt=0, description="Delete overlays older than this.")
    heatmaps_max_bytes: ByteSize | None = Field(None, gt=0, description="Delete the oldest overlays beyond this "
                                                                        "total size.")
    ledger_max_age: float | None = Field(None, gt=0, description="Drop ledger rows older than this whose part is "
                                                                 "no longer in the watched folder.")
    interval: float = Field(600.0, gt=0, description="Seconds between retention passes.")

    _durations = field_validator("sorted_max_age", "heatmaps_max_age", "ledger_max_age", "interval",
                                 mode="before")(seconds)


class _Source(_Section):
    model: Path = Field(description="Model folder written by edge-inspect export.")
    criterion: str | None = Field(None, description="Decide with this criterion (default: the card's).")
    threshold: float | None = Field(None, description="Decide with this threshold, in the criterion's units "
                                                      "(default: the card's, calibrated for that criterion).")
    precision: Literal["fp32", "fp16", "int8"] | None = Field(None, description="Which graph of the model folder "
                                                                                 "runs (default: the card's).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if it loads, else CPU.")
    batch_size: int | None = Field(None, ge=1, le=1024, description="At most this many images per model run; a "
                                   "lone part runs alone. Default: the model's (32 for linear-ae, 8 for the deep models).")
    readers: int = Field(2, ge=1, le=64, description="Threads reading and decoding parts.")
    max_pixels: int = Field(50_000_000, ge=1, description="Images with more pixels get an error verdict, "
                                                          "undecoded.")
    ledger: Path | None = Field(None, description="The ledger file (default: FOLDER/.edge-inspect/ledger.sqlite "
                                                  "for a folder, ./edge-inspect-ledger.sqlite for a camera).")
    stale_after: float = Field(60.0, gt=0, description="Health: seconds without progress or a passed idle check "
                                                       "before the source is reported unhealthy.")
    sinks: Sinks = Sinks()
    retention: Retention = Retention()

    _durations = field_validator("stale_after", mode="before")(seconds)


class FolderSource(_Source):
    """A hot folder: files dropped in it, each inspected once it is complete."""

    kind: Literal["folder"] = "folder"
    path: Path = Field(description="The hot folder.")
    poll: float | None = Field(None, gt=0, description="Scan every SECONDS instead of inotify events (network "
                                                       "shares).")
    settle: float = Field(1.0, ge=0, description="Seconds a file must hold still, with no process writing it, when "
                                                 "no close event says it is complete.")
    settle_unsure: float = Field(10.0, ge=0, description="Seconds a file must hold still where open writers cannot "
                                                         "be seen (network shares).")
    rescan: float | None = Field(60.0, gt=0, description="Seconds between safety rescans in event mode.")
    backlog: bool = Field(True, description="Inspect the files already in the folder at start.")
    recursive: bool = Field(False, description="Also inspect the files in sub-folders, at any depth (not the "
                                               "sort folders, nor hidden ones). Off: images in a sub-folder are "
                                               "not inspected, and each such sub-folder is named in a warning.")
    ignore: tuple[str, ...] = Field((), description="More file name patterns to ignore, besides hidden and "
                                                    "partial files.")

    _folder_durations = field_validator("poll", "settle", "settle_unsure", "rescan", mode="before")(seconds)

    @model_validator(mode="after")
    def _settles(self) -> FolderSource:
        if self.settle_unsure < self.settle:
            raise ValueError(f"@settle_unsure must be at least settle ({self.settle_unsure:g} s < {self.settle:g} s). "
                             "Raise it, or lower settle")
        return self

    @property
    def ledger_path(self) -> Path:
        return self.ledger if self.ledger is not None else self.path / ".edge-inspect" / "ledger.sqlite"


class CameraSource(_Source):
    """A camera: a device index or path, an rtsp:// or http:// URL, a video file, or a GStreamer pipeline."""

    kind: Literal["camera"]
    uri: str = Field(min_length=1, description="Device index, /dev/videoN, rtsp:// or http:// URL, video file, or "
                                               "GStreamer pipeline.")
    every: int = Field(1, ge=1, description="Inspect every N-th frame.")
    fps: float | None = Field(None, gt=0, description="Inspect at most this many frames per second.")

    @model_validator(mode="after")
    def _no_sort(self) -> CameraSource:
        if self.sinks.sort:
            raise ValueError("@sinks.sort a camera's frames are not files: there is nothing to sort. "
                             "Set it to false")
        return self

    @property
    def ledger_path(self) -> Path:
        return self.ledger if self.ledger is not None else Path(CAMERA_LEDGER)


Source = Annotated[FolderSource | CameraSource, Field(discriminator="kind")]


# ------------------------------------------------------------------ the plant


class _Output(_Section):
    """What every network sink shares: which sources, timeouts, backlog caps."""

    sources: tuple[str, ...] = Field((), description="Names of the sources whose verdicts go out here; empty: all.")
    timeout: float = Field(10.0, gt=0, description="Seconds to wait for the receiver's acknowledgement.")
    batch: int = Field(100, ge=1, le=10_000, description="Verdicts handed over at once at most (a backlog drains "
                                                          "in batches).")
    max_backlog_age: float | None = Field(3600.0, gt=0, description="Alarm (log, health 503, metric) when the oldest "
                                                                    "undelivered verdict is older; nothing is dropped.")
    max_backlog_rows: int | None = Field(100_000, ge=1, description="Alarm when more verdicts than this wait; nothing "
                                                                    "is dropped.")
    start_at: Literal["end", "start"] = Field("end", description="A sink new to a ledger: 'end' sends the verdicts "
                                                                 "from now on, 'start' every verdict the ledger holds.")

    _output_durations = field_validator("timeout", "max_backlog_age", mode="before")(seconds)


class Tls(_Section):
    """TLS to a receiver: the CA that signed its certificate, and a client certificate when it asks for one."""

    ca: Path | None = Field(None, description="PEM file of the CA certificates to trust (default: the system's).")
    cert: Path | None = Field(None, description="PEM file of this client's certificate.")
    key_file: Path | None = Field(None, description="PEM file of this client's private key.")


class Mqtt(_Output):
    """One MQTT message per verdict (paho-mqtt, QoS 1, a persistent session)."""

    host: str = Field(min_length=1, description="The broker's host name or address.")
    port: int | None = Field(None, ge=1, le=65535, description="The broker's port (default: 1883, or 8883 with tls).")
    topic: str = Field("edge-inspect/{installation}/{source}/verdict", description="Topic of each verdict; "
                       "{installation} and {source} are replaced.")
    status_topic: str = Field("edge-inspect/{installation}/{source}/status", description="Retained 'online' / "
                              "'offline' status, with 'offline' as the last will.")
    client_id: str = Field("edge-inspect-{installation}-{source}", description="Fixed client id (the broker keeps "
                           "the session across reconnects).")
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds between keep-alive pings.")
    username: str | None = Field(None, description="User name, when the broker asks for one.")
    password_env: str | None = Field(None, description="Name of the environment variable holding the password.")
    password_file: Path | None = Field(None, description="File holding the password (its first line).")
    tls: Tls | None = Field(None, description="Connect with TLS.")


class OpcUaNodes(_Section):
    """Node ids of the PLC's server that receive the latest verdict; sequence is written last."""

    verdict: str = Field(description="String node: 'ok', 'ng' or 'error'.")
    score: str | None = Field(None, description="Double or Float node: the score (NaN for an error).")
    part_id: str | None = Field(None, description="String node: the message id of the verdict.")
    sequence: str = Field(description="UInt64, Int64, UInt32 or Int32 node, written last: the verdict's sequence "
                                      "number (its ledger row); a change means a new, complete record.")


class OpcUa(_Output):
    """The latest verdict written to nodes of an OPC UA server (asyncua), for a PLC to act on."""

    endpoint: str = Field(min_length=1, description="The server, e.g. opc.tcp://plc.line2:4840.")
    nodes: OpcUaNodes
    security_policy: Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = Field(
        "None", description="Security policy.")
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = Field("None", description="Message security mode.")
    certificate: Path | None = Field(None, description="This client's certificate (DER or PEM), for Sign modes.")
    private_key: Path | None = Field(None, description="This client's private key (PEM), for Sign modes.")
    server_certificate: Path | None = Field(None, description="The server's certificate to trust.")
    username: str | None = Field(None, description="User name, when the server asks for one.")
    password_env: str | None = Field(None, description="Name of the environment variable holding the password.")
    password_file: Path | None = Field(None, description="File holding the password (its first line).")

    @model_validator(mode="after")
    def _security(self) -> OpcUa:
        if (self.security_mode == "None") != (self.security_policy == "None"):
            raise ValueError("@security_mode security_mode and security_policy must both be None, or both set")
        if self.security_mode != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError("@certificate a signed or encrypted connection needs certificate and private_key")
        return self


class Webhook(_Output):
    """The verdict's JSON POSTed to a URL; a 2xx answer acknowledges it."""

    url: str = Field(pattern=r"^https?://", description="The URL (http:// or https://).")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers (an Authorization "
                                                                      "header, for instance).")
    verify: bool | Path = Field(True, description="Check the server's TLS certificate: true, false, or a CA file.")


# ------------------------------------------------------------------ service


class Http(_Section):
    """Health (/healthz) and Prometheus metrics (/metrics) over HTTP."""

    enabled: bool = Field(True, description="Serve /healthz and /metrics.")
    address: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 keeps it on this PC.")
    port: int = Field(9464, ge=1, le=65535, description="TCP port.")


class Disk(_Section):
    """The low-disk guard."""

    min_free: ByteSize = Field(ByteSize(1 << 30), ge=0, description="Below this free space where a source writes, "
                                                                   "sorting and heatmaps pause (verdicts still "
                                                                   "commit); bytes, or 2GB, 500MiB...")


class Service(_Section):
    """The process itself."""

    installation_id: str | None = Field(None, description="This PC's name in verdict ids sent to the plant "
                                                          "(default: the host name).")


class ServiceConfig(_Section):
    """Everything ``serve`` (and ``watch``) runs on."""

    sources: dict[str, Source] = Field(description="One table per hot folder or camera: [sources.NAME].")
    http: Http = Http()
    disk: Disk = Disk()
    service: Service = Service()
    mqtt: Mqtt | None = Field(None, description="Send each verdict to an MQTT broker.")
    opcua: OpcUa | None = Field(None, description="Write the latest verdict to an OPC UA server.")
    webhooks: dict[str, Webhook] = Field(default_factory=dict, description="POST each verdict to these URLs: "
                                                                           "[webhooks.NAME].")

    def outputs(self) -> list[tuple[str, _Output]]:
        """Every network sink: ``(cursor name, its section)``."""
        out: list[tuple[str, _Output]] = []
        if self.mqtt is not None:
            out.append(("mqtt", self.mqtt))
        if self.opcua is not None:
            out.append(("opcua", self.opcua))
        out += [(f"webhook:{name}", hook) for name, hook in self.webhooks.items()]
        return out

    @property
    def installation(self) -> str:
        """This PC's id in message ids: service.installation_id, or the host name."""
        import socket

        return self.service.installation_id or socket.gethostname()

    @field_validator("sources")
    @classmethod
    def _names(cls, sources: dict) -> dict:
        if not sources:
            raise ValueError("no source. Add a [sources.NAME] table with kind = \"folder\" or \"camera\"")
        for name in sources:
            if not SOURCE_NAME.match(name):
                raise ValueError(f"source name {name!r} is not allowed. Use letters, digits, '-' and '_' (at most 64)")
        return sources

    @model_validator(mode="after")
    def _apart(self) -> ServiceConfig:
        """Two sources must not share what each must own alone: a ledger, a results file, a sorted folder."""
        import os.path

        owners: dict[tuple[str, str], str] = {}

        def claim(what: str, path: Path | None, name: str, key: str) -> None:
            if path is None:
                return
            real = (what, os.path.abspath(path))
            if real in owners:
                raise ValueError(f"@sources.{name}.{key} sources {owners[real]!r} and {name!r} both use {what} "
                                 f"{path}: each source needs its own. Change it for one of them")
            owners[real] = name

        for key, output in (("mqtt", self.mqtt), ("opcua", self.opcua),
                            *((f"webhooks.{n}", h) for n, h in self.webhooks.items())):
            unknown = [n for n in (output.sources if output is not None else ()) if n not in self.sources]
            if unknown:
                raise ValueError(f"@{key}.sources names no source {', '.join(map(repr, unknown))}; the sources are "
                                 f"{', '.join(map(repr, self.sources))}")
        if self.opcua is not None and len(self.opcua.sources or self.sources) != 1:
            raise ValueError("@opcua.sources the OPC UA nodes hold one source's latest verdict: several sources "
                             "would overwrite each other's. Name exactly one source here")
        for name, source in self.sources.items():
            claim("the ledger", source.ledger_path, name, "ledger")
            claim("the results file", source.sinks.results, name, "sinks.results")
            if isinstance(source, FolderSource) and source.sinks.sort:
                claim("the sorted folders of", source.path, name, "path")
            _refuse_inside(name, source)
        return self


def _refuse_inside(name: str, source) -> None:
    """A file the watcher writes must not sit where its hot folder would yield it back as a part."""
    import fnmatch
    import os.path

    if not isinstance(source, FolderSource):
        return
    from edge_inspect.sources import DEFAULT_IGNORE

    folder = os.path.abspath(source.path)
    patterns = (*DEFAULT_IGNORE, *source.ignore)
    for key, path in (("ledger", source.ledger), ("sinks.results", source.sinks.results)):
        if path is None or os.path.dirname(os.path.abspath(path)) != folder:
            continue
        if any(fnmatch.fnmatchcase(path.name.lower(), p.lower()) for p in patterns):
            continue
        raise ValueError(f"@sources.{name}.{key} {path} lies in the watched folder, which would inspect it as a "
                         f"part. Put it elsewhere, in a sub-folder, or give it a hidden name (.{path.name})")
    if source.sinks.heatmaps is not None and os.path.abspath(source.sinks.heatmaps) == folder:
        raise ValueError(f"@sources.{name}.sinks.heatmaps {source.sinks.heatmaps} is the watched folder itself, "
                         "which would inspect the overlays as parts. Give a sub-folder or another folder")


# ------------------------------------------------------------------ loading


class Loaded:
    """A validated configuration and where each of its values came from.

    Attributes:
        config: the :class:`ServiceConfig`.
        origins: key path (``"sources.line2.settle"``) -> ``"file FILE"``,
            ``"environment NAME"`` or ``"flag"``; keys not listed are defaults.
    """

    def __init__(self, config: ServiceConfig, origins: dict[str, str]):
        self.config = config
        self.origins = origins


def load(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """Build the configuration from a TOML file, the environment and overrides (see the module docstring).

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is wrong;
            the message names the key (``At 'sources.a.path': ...``).
    """
    return load_with_origins(path, environ=environ, overrides=overrides).config


def load_with_origins(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None,
                      overrides: Mapping[str, Any] | None = None) -> Loaded:
    """:func:`load`, also telling where each value came from."""
    data: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        data = read_toml(path)
        for key in _leaves(data):
            origins[key] = f"file {path}"
    for name, value in sorted((environ if environ is not None else os.environ).items()):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == ENV_PREFIX + "CONFIG":
            continue
        parts = name[len(ENV_PREFIX):].split("__")
        key = ".".join(part.lower() for part in parts)
        if key.startswith("sources.") and len(parts) > 1:
            # Variables are upper case by custom: SOURCES__LINE2__ names the source line2 of the file if it has one.
            known = {existing.lower(): existing
                     for existing in [*data.get("sources", {}),
                                      *(k.split(".")[1] for k in (overrides or {}) if k.startswith("sources."))]}
            source = known.get(parts[1].lower(), parts[1])
            key = ".".join(["sources", source, *(p.lower() for p in parts[2:])])
        _set(data, key, _env_value(value))
        origins[key] = f"environment {name}"
    for key, value in (overrides or {}).items():
        _set(data, key, value)
        origins[key] = "flag"
    return Loaded(validate(data), origins)


def read_toml(path: str | os.PathLike) -> dict:
    """The TOML file as a dict.

    Raises:
        ConfigError: missing, unreadable or not TOML (with the line).
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"Configuration file {path} does not exist. Copy deploy/config.example.toml there and "
                          "edit it, or give the right path.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read the configuration file {path} ({exc.strerror or exc}). Check its owner "
                          "and mode.") from exc
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Configuration file {path} is not UTF-8 text (byte {exc.start}). Save it as UTF-8.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Configuration file {path} is not valid TOML: {exc}. Fix that line.") from None


def validate(data: Mapping) -> ServiceConfig:
    """A :class:`ServiceConfig` from plain data.

    Raises:
        ConfigError: every problem, one line each, naming its key.
    """
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(error) for error in exc.errors()),
                          key=_key(exc.errors()[0]["loc"])) from None


def _key(loc) -> str:
    # Discriminated unions add the tag to the location: sources.a.folder.path -> sources.a.path
    parts = [str(p) for p in loc]
    if len(parts) >= 3 and parts[0] == "sources" and parts[2] in ("folder", "camera"):
        del parts[2]
    return ".".join(parts)


def _describe(error: dict) -> str:
    key = _key(error["loc"])
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"At '{key}': unknown key. Check its spelling against `edge-inspect config schema`, or remove it."
    if kind == "missing" and key == "sources":
        return "At 'sources': no source. Add a [sources.NAME] table with kind = \"folder\" or \"camera\"."
    if kind == "missing":
        return f"At '{key}': missing. Set it."
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"At '{key}': kind must be \"folder\" or \"camera\". Set sources.NAME.kind."
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
        if message.startswith("@"):  # "@sub.key message": the key below the model that raised it
            sub, message = message[1:].split(" ", 1)
            key = f"{key}.{sub}" if key else sub
        return f"At '{key or 'sources'}': {message}."
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"At '{key}': {message[0].lower() + message[1:]}{shown}."


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _leaves(data: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            keys += _leaves(value, key + ".")
        else:
            keys.append(key)
    return keys


# ------------------------------------------------------------------ showing


def effective(loaded: Loaded) -> list[tuple[str, str, str]]:
    """``(key, value as TOML, origin)`` for every leaf of the effective configuration; secrets masked."""
    import json

    rows = []
    data = loaded.config.model_dump(mode="json")
    for key in _leaves(data):
        value: Any = data
        for part in key.split("."):
            value = value[part]
        text = "****" if SECRET.search(key.rsplit(".", 1)[-1]) and value not in (None, "") else json.dumps(value)
        rows.append((key, text, loaded.origins.get(key, "default")))
    return rows


_DEFAULT_CLAUSE = re.compile(r"(?P<open>\()?[Dd]efault: (?P<means>.+)$")


def unset_means(config: ServiceConfig, key: str) -> str | None:
    """What an unset (null) key stands for, from its description's "default: ..." clause; None if it says nothing.

    ``precision`` null is "the card's", ``batch_size`` null "the model's
    (32 for linear-ae, ...)": ``config show`` prints that beside the null.
    """
    node: Any = config
    info = None
    for part in key.split("."):
        if isinstance(node, BaseModel):
            info = type(node).model_fields.get(part)
            node = getattr(node, part, None)
        elif isinstance(node, dict):
            info, node = None, node.get(part)
        else:
            return None
    found = _DEFAULT_CLAUSE.search(info.description or "") if info is not None else None
    if not found:
        return None
    means = found["means"].removesuffix(".")
    return means.removesuffix(")") if found["open"] else means


def schema() -> dict:
    """The JSON Schema of the configuration file."""
    document = ServiceConfig.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "edge-inspect service configuration"
    return document


# ------------------------------------------------------------------ checking


def check(config: ServiceConfig, *, network: bool = True) -> list[str]:
    """Everything that can be checked without starting: folders, permissions, models, camera URIs.

    Args:
        config: the configuration.
        network: also connect to the OPC UA server once and check its
            nodes (their ids, types and write access).

    Returns:
        One line per problem, each naming its key and the fix (empty: all good).
    """
    from edge_inspect.card import load_card, read_verified
    from edge_inspect.errors import EdgeInspectError

    problems: list[str] = []
    seen_models: dict[tuple[str, str | None], tuple] = {}
    for name, source in config.sources.items():
        at = f"sources.{name}"
        if isinstance(source, FolderSource):
            problems += _check_folder(f"{at}.path", source.path, write=source.sinks.sort or source.ledger is None)
        else:
            problem = _check_uri(source.uri)
            if problem:
                problems.append(f"At '{at}.uri': {problem}")
        for key, path in ((f"{at}.ledger", source.ledger_path), (f"{at}.sinks.results", source.sinks.results)):
            if path is not None:
                problems += _check_writable_file(key, Path(path))
        if source.sinks.heatmaps is not None:
            problems += _check_folder(f"{at}.sinks.heatmaps", source.sinks.heatmaps, write=True, create=True)
        model = (os.path.abspath(source.model), source.precision)
        if model not in seen_models:
            try:
                card = load_card(source.model)
                read_verified(card, source.precision or card.default_precision)
                seen_models[model] = (card, None)
            except EdgeInspectError as exc:
                seen_models[model] = (None, str(exc))
        card, problem = seen_models[model]
        if problem is not None:
            problems.append(f"At '{at}.model': {problem}")
        elif source.criterion is not None and source.criterion not in card.calibration["criteria"]:
            problems.append(f"At '{at}.criterion': {source.criterion!r} has no calibration in {source.model}; "
                            f"calibrated: {', '.join(card.calibration['criteria'])}.")
    if network and config.opcua is not None:
        from edge_inspect.sinks.opcua import check as check_opcua

        problems += check_opcua(config.opcua)
    return problems


def _check_folder(key: str, path: Path, *, write: bool, create: bool = False) -> list[str]:
    if not path.exists():
        if create:
            parent = next((p for p in path.parents if p.exists()), None)
            if parent is not None and os.access(parent, os.W_OK | os.X_OK):
                return []
            return [f"At '{key}': folder {path} does not exist and cannot be created. Create it or fix the path."]
        return [f"At '{key}': folder {path} does not exist. Create it or fix the path."]
    if not path.is_dir():
        return [f"At '{key}': {path} is a file, not a folder. Fix the path."]
    if not os.access(path, os.R_OK | os.X_OK):
        return [f"At '{key}': folder {path} is not readable by this user. Check its owner and mode."]
    if write and not os.access(path, os.W_OK):
        return [f"At '{key}': folder {path} is not writable by this user. Check its owner and mode."]
    return []


def _check_writable_file(key: str, path: Path) -> list[str]:
    if path.is_dir():
        return [f"At '{key}': {path} is a folder; expected a file path. Fix the path."]
    if path.exists():
        return [] if os.access(path, os.W_OK) else [f"At '{key}': {path} is not writable by this user. Check its "
                                                    "owner and mode."]
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        return [f"At '{key}': {path} cannot be created: {parent} is not writable by this user. Create the folder "
                "or fix the path."]
    return []


def _check_uri(uri: str) -> str | None:
    from urllib.parse import urlsplit

    if uri.isdigit() or uri.startswith("/dev/video") or "!" in uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme in ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp"):
        if not parts.hostname:
            return f"{uri!r} names no host. Write it as {parts.scheme}://HOST[:PORT]/PATH."
        try:
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            return f"{uri!r} has a port that is not a number from 1 to 65535. Fix the port."
        return None
    if parts.scheme:
        return (f"{uri!r}: unknown scheme {parts.scheme!r}. Expected a device index, /dev/videoN, rtsp://, http:// "
                "or a video file.")
    if not Path(uri).exists():
        return (f"video file {uri!r} does not exist (and it is not a device index, /dev/videoN or a URL). Fix the "
                "path or the URI.")
    return None
