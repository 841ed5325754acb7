"""The model card: what a model folder is, and the checks that it is intact.

A model folder is written by ``edge-inspect export`` and read by everything
that inspects. It holds one ONNX graph per precision and one card:

    MODEL_DIR/
      model.json           the card (this module's schema)
      model.onnx           fp32, always present: the reference precision
      model.fp16.onnx      optional, ``--precision fp16``
      model.int8.onnx      optional, ``--precision int8`` (static QDQ)

The card holds the schema version, the model kind, the input size and the
preprocessing, the calibration of every criterion (default criterion,
polarity, threshold), a summary of the training data, the versions and opset
of the export, and under ``files`` the sha256 and the export-time parity
report of every precision. Each ONNX file carries the same facts, all but
``files``, as JSON in its ``metadata_props`` (key :data:`METADATA_KEY`), so a
graph copied out of its folder still says what it is.

Loading checks, and refuses with the reason: the card's schema and keys, that
the preprocessing is the one this runtime implements, the file's sha256, and
(:func:`check_metadata`, once the session is up) that the graph's embedded
card is this card.

    >>> card = load_card("models/conv-ae")
    >>> data = read_verified(card, "fp32")      # bytes, checksum verified
    >>> card.size, card.default_criterion
    ((128, 128), 'range')
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from edge_inspect.calibrate import validate_calibration
from edge_inspect.errors import ModelCardError
from edge_inspect.preprocess import Preprocessing

SCHEMA = 1
KIND = "edge-inspect-model"
CARD_FILE = "model.json"
#: The precisions a model folder can hold, and the file of each.
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
PRECISIONS = tuple(MODEL_FILES)
#: Graph input and output: ``(batch, height, width)`` float32 in [0, 1], the
#: layout :func:`edge_inspect.preprocess.preprocess` produces and
#: :func:`edge_inspect.kernels.criteria` consumes, so neither side copies.
#: The model kinds a card may name: the default linear autoencoder and the paper's three.
MODEL_KINDS = ("linear-ae", "conv-ae", "vae", "dilated-vae")
#: A training run's model file: the linear-ae's bases, or a Keras model.
RUN_MODEL_FILES = ("model.npz", "model.keras")

INPUT_NAME = "image"
OUTPUT_NAME = "reconstruction"
LAYOUT = "NHW"
#: ONNX metadata_props keys. The first holds the card's facts (all but
#: ``files``) as JSON; the others are readable summaries for tools like Netron.
METADATA_KEY = "edge_inspect.card"
METADATA_SUMMARY_KEYS = ("edge_inspect.schema", "edge_inspect.kind", "edge_inspect.precision",
                         "edge_inspect.criterion", "edge_inspect.threshold")

# What this runtime's preprocess() does; a card asking for anything else is refused.
_RUNTIME_PREPROCESSING = {"color": "gray", "interpolation": "area", "scale": "unit",
                          "resize": "stretch", "padding": "none", "cropping": "none"}
_REQUIRED = {
    "schema": int,
    "kind": str,
    "model": dict,
    "input": dict,
    "output": dict,
    "preprocessing": dict,
    "calibration": dict,
    "training": dict,
    "versions": dict,
    "opset": int,
    "default_precision": str,
    "files": dict,
}


@dataclass(frozen=True)
class ModelCard:
    """A validated ``model.json`` and the folder it lives in.

    Attributes:
        folder: the model folder.
        data: the card as read (a JSON object).
    """

    folder: Path
    data: dict

    @property
    def model_kind(self) -> str:
        return self.data["model"]["kind"]

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        pre = self.data["preprocessing"]
        return (pre["height"], pre["width"])

    @property
    def preprocessing(self) -> Preprocessing:
        pre = self.data["preprocessing"]
        return Preprocessing(pre["height"], pre["width"], pre["color"], pre["interpolation"], pre["scale"])

    @property
    def calibration(self) -> dict:
        return self.data["calibration"]

    @property
    def default_criterion(self) -> str:
        return self.data["calibration"]["default_criterion"]

    @property
    def default_precision(self) -> str:
        return self.data["default_precision"]

    @property
    def precisions(self) -> list[str]:
        """The precisions this folder holds, in :data:`PRECISIONS` order."""
        return [p for p in PRECISIONS if p in self.data["files"]]

    def path(self, precision: str) -> Path:
        """The ONNX file of ``precision``.

        Raises:
            ModelCardError: the folder has no such precision.
        """
        if precision not in self.data["files"]:
            raise ModelCardError(
                f"{self.folder} has no {precision} model; it holds {', '.join(self.precisions)}. "
                f"Export one with: edge-inspect export RUN_DIR --out {self.folder} --precision {precision}"
            )
        return self.folder / self.data["files"][precision]["file"]

    def facts(self) -> dict:
        """The card without ``files``: what every ONNX file embeds."""
        return card_facts(self.data)


def card_facts(data: dict) -> dict:
    """``data`` without its ``files`` entry (checksums cannot sit inside the file they sum)."""
    return {k: v for k, v in data.items() if k != "files"}


def metadata_props(data: dict, precision: str) -> dict[str, str]:
    """The ``metadata_props`` an ONNX file of ``precision`` carries for card ``data``."""
    entry = data["calibration"]["criteria"][data["calibration"]["default_criterion"]]
    return {
        METADATA_KEY: canonical_json(card_facts(data)),
        "edge_inspect.schema": str(data["schema"]),
        "edge_inspect.kind": data["model"]["kind"],
        "edge_inspect.precision": precision,
        "edge_inspect.criterion": data["calibration"]["default_criterion"],
        "edge_inspect.threshold": repr(float(entry["threshold"])),
    }


def canonical_json(value) -> str:
    """One JSON text per value: sorted keys, no whitespace, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate(data, where: str) -> None:
    """Check a card's schema, keys and types.

    Raises:
        ModelCardError: naming the first key that is missing or wrong, what
            was expected and what was found.
    """
    def fail(key, expected, found):
        raise ModelCardError(f"{where}: at '{key}': expected {expected}, found {found!r}.")

    if not isinstance(data, dict):
        fail("(top)", "a JSON object", type(data).__name__)
    if data.get("kind") != KIND:
        fail("kind", f"{KIND!r} (a model card written by edge-inspect export)", data.get("kind"))
    schema = data.get("schema")
    if isinstance(schema, int) and schema > SCHEMA:
        raise ModelCardError(
            f"{where}: card schema {schema} is newer than this edge-inspect understands ({SCHEMA}). "
            "Upgrade edge-inspect on this machine, or export the model with the version installed here."
        )
    if schema != SCHEMA:
        fail("schema", SCHEMA, schema)
    for key, kind in _REQUIRED.items():
        if isinstance(data.get(key), bool) or not isinstance(data.get(key), kind):
            fail(key, f"a {kind.__name__}", data.get(key))

    pre = data["preprocessing"]
    for key in ("height", "width"):
        if isinstance(pre.get(key), bool) or not isinstance(pre.get(key), int) or pre[key] < 1:
            fail(f"preprocessing.{key}", "a positive pixel count", pre.get(key))
    for key, value in _RUNTIME_PREPROCESSING.items():
        if pre.get(key) != value:
            raise ModelCardError(
                f"{where}: at 'preprocessing.{key}': this runtime implements {value!r} only, the model was "
                f"trained with {pre.get(key)!r}. Inspecting with another preprocessing would give wrong verdicts; "
                "use the edge-inspect version the model was exported with."
            )
    size = [pre["height"], pre["width"]]
    for side, name in (("input", INPUT_NAME), ("output", OUTPUT_NAME)):
        io = data[side]
        if io.get("name") != name:
            fail(f"{side}.name", repr(name), io.get("name"))
        if io.get("layout") != LAYOUT or io.get("dtype") != "float32":
            fail(f"{side}.layout/dtype", f"{LAYOUT} float32", (io.get("layout"), io.get("dtype")))
        if io.get("shape") != ["batch", *size]:
            fail(f"{side}.shape", ["batch", *size], io.get("shape"))

    validate_calibration(data["calibration"], f"{where}: calibration")
    threshold = data["calibration"]["criteria"][data["calibration"]["default_criterion"]]["threshold"]
    if not math.isfinite(threshold):
        fail("calibration threshold", "a finite number", threshold)

    files = data["files"]
    if "fp32" not in files:
        fail("files.fp32", "an entry (model.onnx is always exported)", None)
    for precision, entry in files.items():
        if precision not in MODEL_FILES:
            fail(f"files.{precision}", f"one of {', '.join(PRECISIONS)}", precision)
        if not isinstance(entry, dict) or entry.get("file") != MODEL_FILES[precision]:
            fail(f"files.{precision}.file", MODEL_FILES[precision], entry.get("file") if isinstance(entry, dict) else entry)
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64):
            fail(f"files.{precision}.sha256", "64 hex digits", digest)
    if data["default_precision"] not in files:
        fail("default_precision", f"one of the exported precisions {', '.join(files)}", data["default_precision"])


def load_card(folder: str | os.PathLike) -> ModelCard:
    """Read and validate ``folder/model.json``.

    Raises:
        ModelCardError: no such folder or card, not JSON, or invalid.
    """
    folder = Path(folder)
    path = folder / CARD_FILE
    if not folder.is_dir():
        raise ModelCardError(
            f"Model folder '{folder}' does not exist. Export one with: edge-inspect export RUN_DIR --out {folder}"
        )
    if not path.is_file():
        hint = " It looks like a training run folder; export it first: edge-inspect export " \
               f"{folder} --out MODEL_DIR" if any((folder / f).is_file() for f in RUN_MODEL_FILES) else ""
        raise ModelCardError(f"'{folder}' is not a model folder: {CARD_FILE} is missing.{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelCardError(f"{path} cannot be read: {exc}.") from exc
    except json.JSONDecodeError as exc:
        raise ModelCardError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "The card was edited or cut short; export the model again."
        ) from None
    validate(data, str(path))
    return ModelCard(folder, data)


def read_verified(card: ModelCard, precision: str) -> bytes:
    """The bytes of the ``precision`` graph, after checking its sha256 against the card.

    The session is created from these bytes, so the graph that runs is the
    one that was checked.

    Raises:
        ModelCardError: the precision is absent, the file is missing, or its
            checksum differs from the card's.
    """
    path = card.path(precision)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelCardError(
            f"{path} is missing, but {card.folder / CARD_FILE} lists it. Export the model again."
        ) from None
    except OSError as exc:
        raise ModelCardError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    expected = card.data["files"][precision]["sha256"]
    found = sha256_bytes(data)
    if found != expected:
        raise ModelCardError(
            f"{path} does not match its model card: sha256 {found[:16]}... where {CARD_FILE} says "
            f"{expected[:16]}.... The file was modified or replaced after export; refusing to load it. "
            "Export the model again from its run folder."
        )
    return data


def check_metadata(card: ModelCard, precision: str, metadata: dict[str, str]) -> None:
    """Check that a graph's embedded card (``metadata_props``) is this card.

    Args:
        metadata: the graph's custom metadata, e.g.
            ``session.get_modelmeta().custom_metadata_map``.

    Raises:
        ModelCardError: no embedded card, or one that differs, naming the
            first key that differs.
    """
    path = card.path(precision)
    text = metadata.get(METADATA_KEY)
    if text is None:
        raise ModelCardError(
            f"{path} carries no edge-inspect card in its metadata ({METADATA_KEY}); it was not written "
            "by edge-inspect export. Export the model again."
        )
    embedded = json.loads(text)
    facts = json.loads(canonical_json(card.facts()))
    if embedded != facts:
        key = _first_difference(embedded, facts)
        raise ModelCardError(
            f"{card.folder / CARD_FILE} does not describe {path}: they differ at '{key}'. "
            "The card was edited after export; refusing to load. Export the model again."
        )
    if metadata.get("edge_inspect.precision") != precision:
        raise ModelCardError(
            f"{path} is a {metadata.get('edge_inspect.precision')} graph, but the card lists it as {precision}."
        )


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key, _MISSING) != b.get(key, _MISSING):
                return _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
    return prefix or "(top)"


_MISSING = object()


def write_card(data: dict, folder: str | os.PathLike) -> Path:
    """Validate ``data`` and write it as ``folder/model.json``.

    Raises:
        ModelCardError: the card is invalid.
    """
    path = Path(folder) / CARD_FILE
    validate(data, str(path))
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
