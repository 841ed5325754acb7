"""The inspector: image array in, :class:`Result` out.

This module owns one step of the line, from decoded images to verdicts:
preprocess (:mod:`edge_inspect.preprocess`, the definition training used),
batch, reconstruct with the ONNX Runtime session (:mod:`edge_inspect.session`),
compute every criterion and the anomaly map with the fused kernel
(:mod:`edge_inspect.kernels`), and decide with the card's calibration
(:mod:`edge_inspect.calibrate`). The core takes ``np.ndarray`` images only:
paths, folders and cameras become arrays in :mod:`edge_inspect.sources`.
The heatmap overlays at the end of the module draw a result's anomaly map.

    >>> inspector = Inspector.load("models/conv-ae", device="auto")
    >>> result = inspector.inspect(image)          # any (H, W[, C]) array
    >>> result.verdict, result.score, result.threshold
    ('ng', 0.83, 0.61)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_inspect.calibrate import is_anomalous, oriented
from edge_inspect.card import INPUT_NAME, OUTPUT_NAME, ModelCard, check_metadata, load_card, read_verified
from edge_inspect.errors import ConfigError, EdgeInspectError, InputError, ModelCardError
from edge_inspect.kernels import CRITERIA, criteria, criterion_index
from edge_inspect.preprocess import InputNote, input_note, preprocess
from edge_inspect.session import create_session

log = logging.getLogger(__name__)

VERDICTS = ("ok", "ng", "error")
#: Images per session run unless configured, per model kind (see :func:`default_batch_size`).
DEFAULT_BATCH_SIZE = 8
BATCH_SIZES = {"linear-ae": 32}


def default_batch_size(model_kind: str) -> int:
    """Images per session run for ``model_kind`` when none is configured.

    The linear autoencoder's cost is reading its weights, once per run: 32
    images a run inspect files 1.5x faster than 8 (``benchmarks/bench_e2e.py
    --batch 8 16 32``), for about 70 MB more memory. The deep models' cost
    per image does not fall with the batch (the conv AE: 72.6 and 74.7
    images/s at 8 and 32), while their activations grow with it (+176 MB at
    32), so they stay at 8. A lone part runs alone either way.
    """
    return BATCH_SIZES.get(model_kind, DEFAULT_BATCH_SIZE)


@dataclass
class Result:
    """The outcome of inspecting one image.

    Attributes:
        verdict: ``"ok"``, ``"ng"`` (anomalous) or ``"error"`` (the image
            could not be inspected; ``error`` says why).
        score: the decision score: the criterion's raw value oriented by
            its polarity (higher = more anomalous; see
            :func:`edge_inspect.calibrate.oriented`), compared with
            ``threshold``: ``ng`` iff ``score > threshold``.
        threshold: the calibrated threshold of ``criterion``.
        criterion: the criterion that decided.
        criteria: every criterion's raw value, by name (empty on error).
        latency_ms: wall time from the start of the image's batch
            (preprocessing included) to its verdict; every image of a batch
            waits for the whole batch.
        batch_size: how many images shared the session run.
        source: where the image came from (a path), when known.
        error: the reason of an ``error`` verdict.
        anomaly_map: ``(H, W)`` float32 ``|residual|`` at the model's input
            size, when asked for; not part of :meth:`to_dict`.
        polarity: the criterion's polarity (``high``, ``low``,
            ``two-sided``), which says how ``score`` comes from its raw value.
        input_note: how far the image was from the model's input (colour,
            much larger or smaller, another aspect ratio), or None; see
            :func:`~edge_inspect.preprocess.input_note`. :meth:`to_dict`
            gives its text.
    """

    verdict: str
    score: float | None
    threshold: float | None
    criterion: str
    criteria: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0
    batch_size: int = 1
    source: str | None = None
    error: str | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    polarity: str | None = None
    input_note: InputNote | None = None

    def to_dict(self) -> dict:
        """The JSON-line form: every field but the map, NaN as None.

        ``score`` is the decision score, the number compared with
        ``threshold``; ``raw_score`` the criterion's own value beside it.
        """
        clean = lambda v: None if v is None or not math.isfinite(v) else float(v)  # noqa: E731
        return {
            "source": self.source,
            "verdict": self.verdict,
            "score": clean(self.score),
            "raw_score": clean(self.criteria.get(self.criterion)),
            "threshold": clean(self.threshold),
            "criterion": self.criterion,
            "polarity": self.polarity,
            "criteria": {k: clean(v) for k, v in self.criteria.items()},
            "latency_ms": round(self.latency_ms, 3),
            "batch_size": self.batch_size,
            "error": self.error,
            "input_note": self.input_note.text if self.input_note is not None else None,
        }


def open_model(model_dir: str | os.PathLike, *, precision: str | None = None, device: str = "auto",
               threads: int | None = None) -> tuple[ModelCard, object, str, str]:
    """A model folder's card and one ONNX Runtime session of it, which several inspectors may share.

    Returns:
        ``(card, session, active device, precision)``.

    Raises:
        ModelCardError: missing, invalid or tampered card or graph.
        ConfigError: an unknown device; CUDA not active.
    """
    card = load_card(model_dir)
    precision = precision or card.default_precision
    data = read_verified(card, precision)
    name = f"{card.path(precision)}"
    session, active = create_session(data, device, threads=threads, name=name)
    check_metadata(card, precision, session.get_modelmeta().custom_metadata_map)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        raise ModelCardError(
            f"{name} has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; "
            f"expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}. Export the model again."
        )
    return card, session, active, precision


class Inspector:
    """A loaded model folder, ready to inspect images.

    Build one with :meth:`load`; it holds one ONNX Runtime session for its
    lifetime. Not thread-safe: use one inspector per thread.

    Args:
        card: the validated model card.
        session: the session of the card's ``precision`` graph.
        device: where the session runs, ``"cpu"`` or ``"cuda"``.
        precision: which graph of the folder runs.
        criterion: the deciding criterion (default: the card's).
        batch_size: images per session run in :meth:`inspect_batch`
            (default: :func:`default_batch_size` of the card's model kind).
        anomaly_map: return the per-pixel map with each result.
        sigma: Gaussian smoothing of the map, in pixels (0: none).
        threshold: decide with this threshold instead of the card's (on
            the criterion's own scale, as the card writes it).
    """

    def __init__(self, card: ModelCard, session, *, device: str, precision: str, criterion: str | None = None,
                 batch_size: int | None = None, anomaly_map: bool = False, sigma: float = 0.0,
                 threshold: float | None = None):
        if batch_size is None:
            batch_size = default_batch_size(card.model_kind)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        self.card = card
        self.session = session
        self.device = device
        self.precision = precision
        self.criterion = criterion or card.default_criterion
        criterion_index(self.criterion)  # ConfigError for an unknown name
        if self.criterion not in card.calibration["criteria"]:
            raise ModelCardError(
                f"Criterion {self.criterion!r} has no calibration in {card.folder}; calibrated: "
                f"{', '.join(card.calibration['criteria'])}."
            )
        self.entry = card.calibration["criteria"][self.criterion]
        if threshold is not None:
            if not math.isfinite(threshold):
                raise ConfigError(f"threshold must be a finite number, got {threshold!r}.", key="threshold")
            self.entry = {**self.entry, "threshold": float(threshold)}
        self.size = card.size
        self.batch_size = batch_size
        self.anomaly_map = anomaly_map
        self.sigma = sigma
        self._column = CRITERIA.index(self.criterion)
        self._known = [name for name in CRITERIA if name in card.calibration["criteria"]]

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, precision: str | None = None, device: str = "auto",
             threads: int | None = None, **kwargs) -> "Inspector":
        """Load a model folder: validate card and checksum, create the session.

        Args:
            model_dir: a folder written by ``edge-inspect export``.
            precision: ``fp32``, ``fp16`` or ``int8`` (default: the card's
                ``default_precision``).
            device: ``auto``, ``cpu`` or ``cuda`` (see :mod:`edge_inspect.session`).
            threads: CPU threads of the session.
            **kwargs: the other :class:`Inspector` arguments.

        Raises:
            ModelCardError: missing, invalid or tampered card or graph.
            ConfigError: an unknown criterion or device; CUDA not active.
        """
        card, session, active, precision = open_model(model_dir, precision=precision, device=device, threads=threads)
        inspector = cls(card, session, device=active, precision=precision, **kwargs)
        inspector.warmup()
        return inspector

    def warmup(self) -> None:
        """Run one batch of blank images, so the first part is not the slow one.

        The first run loads the Numba kernel from its cache (about a second)
        and lets ONNX Runtime allocate its buffers; a part on the line should
        not wait for either.
        """
        self.inspect_batch([np.zeros(self.size, np.float32)] * self.batch_size)

    # ---------------------------------------------------------------- core

    def reconstruct(self, batch: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` float32 preprocessed images -> ``(N, H, W)`` float32 reconstructions."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def inspect(self, image: np.ndarray, source: str | None = None) -> Result:
        """Inspect one decoded image (any array :func:`preprocess` accepts)."""
        return self.inspect_batch([image], [source])[0]

    def inspect_batch(self, images: Sequence[np.ndarray], sources: Sequence[str | None] | None = None, *,
                      prepared: bool = False) -> list[Result]:
        """Inspect images in runs of :attr:`batch_size`, one result per image, in order.

        An image that cannot be preprocessed, or whose residual is not
        finite, gets an ``error`` result with the reason; the others are
        inspected as usual. An error of the session itself (the model
        cannot run) is raised, not hidden in results.

        ``prepared``: the images are model inputs already, what
        :func:`preprocess` returns for :attr:`size` (``(H, W)`` float32 in
        [0, 1]), as the watcher's reader threads make them; they are copied
        into the batch as they are, not preprocessed a second time on the
        inference thread. One of another shape or dtype gets an ``error``
        result.
        """
        sources = list(sources) if sources is not None else [None] * len(images)
        results: list[Result] = []
        for start in range(0, len(images), self.batch_size):
            results += self._run(images[start:start + self.batch_size], sources[start:start + self.batch_size],
                                 prepared)
        return results

    def decide(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, len(CRITERIA))`` raw criteria -> (oriented scores, ng flags) of the criterion."""
        values = scores[:, self._column]
        return np.atleast_1d(oriented(values, self.entry)), np.atleast_1d(is_anomalous(values, self.entry))

    def _run(self, images, sources, prepared: bool = False) -> list[Result]:
        start = time.perf_counter()
        n = len(images)
        batch = np.empty((n, *self.size), np.float32)
        errors: dict[int, str] = {}
        notes: dict[int, InputNote | None] = {}  # a prepared input's caller knows the image, and notes it itself
        for i, image in enumerate(images):
            if prepared:
                if image.shape == self.size and image.dtype == np.float32:
                    batch[i] = image
                else:
                    errors[i] = (f"a prepared input must be {self.size} float32, got {image.shape} {image.dtype}; "
                                 "pass the decoded image without prepared=True")
                    batch[i] = 0.0
                continue
            try:
                batch[i] = preprocess(np.asarray(image), self.size)
            except EdgeInspectError as exc:
                errors[i] = str(exc)
                batch[i] = 0.0
            else:
                notes[i] = input_note(np.asarray(image), self.size)
        recons = self.reconstruct(batch)
        out = criteria(batch, recons, return_map=self.anomaly_map, sigma=self.sigma, on_nan="propagate")
        scores, maps = out if self.anomaly_map else (out, None)
        score, flags = self.decide(scores)
        latency = (time.perf_counter() - start) * 1e3
        threshold = float(self.entry["threshold"])
        results = []
        for i in range(n):
            if i not in errors and not np.isfinite(scores[i]).all():
                errors[i] = ("the residual is not finite (NaN or infinity in the image or the model output); "
                             "check the image source and the model")
            if i in errors:
                results.append(Result("error", None, threshold, self.criterion, {}, latency, n, sources[i], errors[i],
                                      polarity=self.entry["polarity"]))
                continue
            results.append(Result(
                verdict="ng" if flags[i] else "ok",
                score=float(score[i]),
                threshold=threshold,
                criterion=self.criterion,
                criteria={name: float(scores[i, CRITERIA.index(name)]) for name in self._known},
                latency_ms=latency,
                batch_size=n,
                source=sources[i],
                anomaly_map=None if maps is None else maps[i],
                polarity=self.entry["polarity"],
                input_note=notes.get(i),
            ))
        return results


#: |residual| shown at full colour in overlays: a fixed scale, so that
#: overlays of different parts compare at a glance.
HEATMAP_FULL_SCALE = 0.25
#: Overlays with a banner are at least this wide, so that its text is legible: a narrower part sits at its own
#: size in the middle of a dark canvas of this width (enlarging the part made a 32 px part's file 100 times larger).
HEATMAP_MIN_WIDTH = 512
#: Banner colours (BGR): background, text, and the verdict words.
_BANNER = (32, 32, 32)
_TEXT = (235, 235, 235)
_VERDICT_COLOURS = {"ng": (60, 60, 235), "ok": (80, 200, 80), "error": (0, 200, 230)}
#: The length of decision line the banner's text size is chosen for.
_TYPICAL_LINE = "NG  score 0.012345 > threshold 0.012345 (smooth_range)"


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, *, score: float | None = None,
                    threshold: float | None = None, verdict: str | None = None, criterion: str | None = None,
                    alpha: float = 0.6, banner: bool = True) -> np.ndarray:
    """The anomaly map in colour over the image, above a banner with the decision and a colour scale.

    Each pixel is tinted in proportion to its ``|residual|``: where the
    model reconstructed the part exactly, the image keeps its own grey;
    from :data:`HEATMAP_FULL_SCALE` up, the colour weighs ``alpha``. An
    image narrower than :data:`HEATMAP_MIN_WIDTH` is enlarged by a whole
    factor (each pixel repeated) so that the banner's text stays legible.

    Args:
        image: the decoded image, any array :func:`preprocess` accepts.
        anomaly_map: ``(h, w)`` float32 ``|residual|`` at the model's size.
        score, threshold, verdict, criterion: the part's decision, written
            in the banner (``score`` and ``threshold`` on the oriented
            scale of :class:`Result`: NG iff score > threshold).
        alpha: weight of the colour where the residual is at full scale.
        banner: False: the tinted image alone, at the image's own size
            (for thumbnails whose page says the rest).

    Returns:
        ``(H + banner, max(W, HEATMAP_MIN_WIDTH), 3)`` uint8 BGR (``(H, W,
        3)`` without the banner), ready for ``cv2.imwrite``: the
        map, resized with linear interpolation and coloured with the JET map
        on a fixed scale (0 blue, :data:`HEATMAP_FULL_SCALE` and above red),
        over the image; below it a dark banner with the verdict, score,
        threshold and criterion, and the colour bar with its range.
    """
    import cv2

    from edge_inspect.preprocess import to_unit_gray

    gray = to_unit_gray(np.asarray(image))
    height, width = gray.shape
    amap = cv2.resize(np.asarray(anomaly_map, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    strength = np.clip(np.nan_to_num(amap, nan=0.0) / HEATMAP_FULL_SCALE, 0.0, 1.0)
    colour = cv2.applyColorMap((strength * 255.0).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    base = cv2.cvtColor((gray * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    weight = (alpha * strength)[..., None]
    tinted = np.where(weight > 0, base * (1.0 - weight) + colour * weight + 0.5, base).astype(np.uint8)
    if not banner:
        return tinted
    canvas_width = max(width, HEATMAP_MIN_WIDTH)
    picture = np.full((height, canvas_width, 3), _BANNER, np.uint8)
    left = (canvas_width - width) // 2
    picture[:, left:left + width] = tinted
    return np.vstack([picture, _banner(canvas_width, score, threshold, verdict, criterion)])


def _banner(width: int, score, threshold, verdict, criterion) -> np.ndarray:
    """The strip under an overlay: the decision on one line, the colour bar and its range on the next."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    margin = max(6, width // 64)
    word = (verdict or "").upper()
    relation = ">" if verdict == "ng" else "<=" if verdict == "ok" else "vs"
    from edge_inspect.numbers import score_pair

    shown_score, shown_threshold = score_pair(score, threshold)
    decision = f"score {shown_score} {relation} threshold {shown_threshold}"
    if criterion:
        decision += f" ({criterion})"
    low, high = "0", f"{HEATMAP_FULL_SCALE:g}+"
    caption = "|residual|"
    # One scale for both lines, from the width alone (every overlay of a size gets the same banner): a
    # decision line of typical length fills the width, up to a size that suits a large image; a longer
    # one is written smaller.
    line_one = f"{word}  {decision}" if word else decision
    (unit_width, _), _ = cv2.getTextSize(_TYPICAL_LINE, font, 1.0, 1)
    scale = min((width - 2 * margin) / unit_width, width / 700.0 + 0.2, 1.6)
    thick = max(1, round(scale * 2))
    scale *= min(1.0, (width - 2 * margin) / cv2.getTextSize(_TYPICAL_LINE, font, scale, thick)[0][0])
    (_, text_h), base_h = cv2.getTextSize(_TYPICAL_LINE, font, scale, thick)
    fitted = scale * min(1.0, (width - 2 * margin) / cv2.getTextSize(line_one, font, scale, thick)[0][0])
    row = text_h + base_h + margin
    strip = np.full((2 * row + margin, width, 3), _BANNER, np.uint8)
    x, y = margin, margin + text_h
    if word:
        cv2.putText(strip, word, (x, y), font, fitted, _VERDICT_COLOURS.get(verdict, _TEXT), thick, cv2.LINE_AA)
        x += cv2.getTextSize(word + "  ", font, fitted, thick)[0][0]
    cv2.putText(strip, decision, (x, y), font, fitted, _TEXT, thick, cv2.LINE_AA)
    # The colour bar: JET from 0 to full scale, between its two labels, after the caption.
    y = row + margin + text_h
    x = margin
    cv2.putText(strip, caption, (x, y), font, scale, _TEXT, thick, cv2.LINE_AA)
    x += cv2.getTextSize(caption + " ", font, scale, thick)[0][0]
    cv2.putText(strip, low, (x, y), font, scale, _TEXT, thick, cv2.LINE_AA)
    x += cv2.getTextSize(low + " ", font, scale, thick)[0][0]
    high_w = cv2.getTextSize(" " + high, font, scale, thick)[0][0]
    bar_w = max(8, width - margin - high_w - x)
    ramp = np.linspace(0, 255, bar_w).astype(np.uint8)[None, :]
    bar = cv2.applyColorMap(np.repeat(ramp, text_h, axis=0), cv2.COLORMAP_JET)
    strip[y - text_h:y, x:x + bar_w] = bar[:, : max(0, min(bar_w, width - x))]
    cv2.putText(strip, high, (x + bar_w + high_w - cv2.getTextSize(high, font, scale, thick)[0][0], y), font, scale,
                _TEXT, thick, cv2.LINE_AA)
    return strip


def write_heatmap(path: str | os.PathLike, image: np.ndarray, anomaly_map: np.ndarray, **decision) -> Path:
    """Write :func:`heatmap_overlay` as a PNG file; returns its path.

    ``decision``: the ``score``, ``threshold``, ``verdict`` and
    ``criterion`` written in the banner.

    Raises:
        InputError: the file cannot be written.
    """
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), heatmap_overlay(image, anomaly_map, **decision)):
        raise InputError(f"Cannot write heatmap {path}; check that the folder is writable.")
    return path
