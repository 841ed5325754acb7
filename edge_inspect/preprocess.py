"""THE definition of preprocessing, shared by training and the runtime.

Every image the models see, in training, calibration, evaluation and on the
line, goes through :func:`preprocess`: decode, convert to grayscale, scale to
[0, 1] float32, then resize with area interpolation to the model's input size.
Training and inspection therefore cannot drift apart.

The common input, a uint8 image at least as large as the model's input, takes
a compiled path (:func:`_grey_area_u8`) that does the same arithmetic in one
call: grey in float32 with OpenCV's weights, then OpenCV's INTER_AREA table,
rows first. It agrees with the OpenCV calls to within a few float32 roundings
(``tests/runtime/test_preprocess.py`` holds it to 1e-6) in half their
time (``docs/benchmarks.md``).

    >>> from edge_inspect.preprocess import read_image, preprocess
    >>> x = preprocess(read_image("part.png"), (128, 128))   # (128, 128) float32
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_inspect import numba_cache  # before Numba: it chooses the cache folder

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from edge_inspect.errors import InputError  # noqa: E402
from edge_inspect.imageheader import ACCEPTED, DEFAULT_MAX_PIXELS, admit  # noqa: E402

numba_cache.configure()

log = logging.getLogger(__name__)

#: File suffixes read as images (compared case-insensitively): those of the formats :func:`decode_image` decodes.
IMAGE_SUFFIXES = tuple(suffix for suffixes in ACCEPTED.values() for suffix in suffixes)

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class Preprocessing:
    """What :func:`preprocess` does, as recorded in run folders and model cards.

    Attributes:
        height, width: the model's input size in pixels.
        color: always ``"gray"``; 3- and 4-channel input is read as BGR(A),
            OpenCV's order, and weighted 0.299 R + 0.587 G + 0.114 B.
        interpolation: always ``"area"`` (``cv2.INTER_AREA``).
        scale: always ``"unit"``: uint8 / 255, uint16 / 65535, float as is.
    """

    height: int
    width: int
    color: str = "gray"
    interpolation: str = "area"
    scale: str = "unit"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(**data)


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_SUFFIXES`."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes into an array, keeping depth and channels.

    Only what :func:`edge_inspect.imageheader.admit` lets through reaches
    the decoder: PNG, JPEG, BMP, TIFF, WebP or PNM bytes whose header is
    sound and declares at most ``max_pixels`` pixels (and TIFF tiles or
    strips no larger), so a small file declaring a huge image is refused
    without the memory of decoding it.

    Args:
        data: the file's bytes.
        name: how to name the image in error messages.
        max_pixels: the most pixels the image may declare (see :func:`~edge_inspect.imageheader.admit`).

    Returns:
        ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array, uint8 or uint16
        (or the float or signed depth of a TIFF that holds one), channels in
        BGR(A) order.

    Raises:
        InputError: empty, truncated, undecodable or too large data, or data
            of another format.
    """
    if len(data) == 0:
        raise InputError(f"{name}: the file is empty (0 bytes); it was probably not written completely.")
    header = admit(data, name, max_pixels)
    # libjpeg decodes a truncated JPEG to a grey-filled image with only a
    # warning on stderr; a missing end-of-image marker is how we notice.
    if data[:2] == _JPEG_START and _JPEG_END not in data[-64:]:
        raise InputError(f"{name}: truncated JPEG (no end-of-image marker); the file was cut short.")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        # Raised, where a failure to decode returns None, by OpenCV's own size
        # guard (OPENCV_IO_MAX_IMAGE_PIXELS, _WIDTH, _HEIGHT) or a failed allocation.
        reason = str(exc).strip().splitlines()[-1]
        raise InputError(
            f"{name}: OpenCV refused to decode this {header.width} x {header.height} {header.format} image "
            f"({reason}). OpenCV's own limit is OPENCV_IO_MAX_IMAGE_PIXELS="
            f"{os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS', 'unset')}, read when it loads; raise it in the "
            "environment if such images are expected."
        ) from exc
    if image is None or image.size == 0:
        raise InputError(
            f"{name}: not a readable image: {header.format} data ({len(data)} bytes) that OpenCV cannot decode; "
            "it is corrupt or uses a variant OpenCV does not read."
        )
    return image


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file with :func:`decode_image`.

    Raises:
        InputError: the file cannot be opened or decoded, or is too large.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    return decode_image(data, str(path), max_pixels)


def to_unit_gray(image: np.ndarray) -> np.ndarray:
    """Grayscale float32 in [0, 1] at the image's own size.

    Args:
        image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` BGR or ``(H, W, 4)``
            BGRA; uint8, uint16, or float in [0, 1].

    Returns:
        ``(H, W)`` float32.

    Raises:
        InputError: unsupported dtype or shape.
    """
    if image.dtype == np.uint8:
        unit = image.astype(np.float32) * np.float32(1 / 255)
    elif image.dtype == np.uint16:
        unit = image.astype(np.float32) * np.float32(1 / 65535)
    elif image.dtype in (np.float32, np.float64):
        unit = np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)
    else:
        raise InputError(f"Unsupported image dtype {image.dtype}; expected uint8, uint16 or float in [0, 1].")
    if unit.ndim == 3 and unit.shape[2] == 1:
        unit = unit[:, :, 0]
    if unit.ndim == 2:
        return unit
    if unit.ndim == 3 and unit.shape[2] == 3:
        return cv2.cvtColor(unit, cv2.COLOR_BGR2GRAY)
    if unit.ndim == 3 and unit.shape[2] == 4:
        return cv2.cvtColor(unit, cv2.COLOR_BGRA2GRAY)
    raise InputError(
        f"Unsupported image shape {image.shape}; expected (H, W) or (H, W, C) with 1, 3 or 4 channels."
    )


def preprocess(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Turn a decoded image into the model's input.

    Args:
        image: any array :func:`to_unit_gray` accepts.
        size: ``(height, width)`` of the model input.

    Returns:
        ``(height, width)`` float32 in [0, 1], C-contiguous.
    """
    height, width = size
    if _compiled_path(image, size):
        return _grey_area(image, size)
    gray = to_unit_gray(image)
    if gray.shape != (height, width):
        gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(gray, dtype=np.float32)


def _compiled_path(image: np.ndarray, size: tuple[int, int]) -> bool:
    """Whether :func:`grey_area_u8` does :func:`preprocess`'s work: uint8, 1, 3 or 4 channels, not enlarged."""
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        return False
    return image.shape[0] >= size[0] >= 1 and image.shape[1] >= size[1] >= 1


#: OpenCV's grey weights (``cvtColor``, BGR order) and the uint8 scale, in float32: :func:`to_unit_gray`'s numbers.
_GREY_B, _GREY_G, _GREY_R = np.float32(0.114), np.float32(0.587), np.float32(0.299)
_UNIT8 = np.float32(1 / 255)


def grey_area_u8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`preprocess` of a uint8 image no smaller than ``size``, compiled.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` uint8, C 1, 3 (BGR) or 4 (BGRA),
            ``H >= height`` and ``W >= width``.
        size: ``(height, width)`` of the model input.

    Returns:
        ``(height, width)`` float32 in [0, 1].

    Raises:
        InputError: another dtype, channel count, or an image smaller than ``size``.
    """
    if not _compiled_path(image, size):
        raise InputError(f"grey_area_u8 takes a uint8 image of 1, 3 or 4 channels no smaller than {size}; got "
                         f"{image.shape} {image.dtype}. Use preprocess(), which takes any image.")
    return _grey_area(image, size)


def _grey_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`grey_area_u8` without its check, for :func:`preprocess`, which has made it."""
    height, width = size
    rows, columns = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    out = np.empty((height, width), np.float32)
    _grey_area_u8(np.ascontiguousarray(image).reshape(-1), rows, columns, channels,
                  *_area_taps(rows, height), *_area_taps(columns, width), out)
    return out


@functools.lru_cache(maxsize=32)
def _area_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights along one axis, ``source`` -> ``target`` pixels, ``source >= target``.

    Output pixel ``d`` covers ``[d * s, (d + 1) * s)`` of the source, ``s =
    source / target``; each source pixel it overlaps weighs the overlap over
    ``s`` (``computeResizeAreaTab`` in OpenCV's ``imgproc/resize.cpp``, with
    its 1e-3 tolerance and float32 weights).

    Returns:
        ``(first, weights)``: ``(target,)`` int32 and ``(K, target)`` float32,
        K the most source pixels an output pixel covers; output ``d`` is
        ``sum(weights[k, d] * source[first[d] + k] for k in range(K))``.
    """
    scale = source / target
    spans = []
    for d in range(target):
        start = d * scale
        end = start + scale
        cell = min(scale, source - start)
        first, last = math.ceil(start), min(math.floor(end), source - 1)
        first = min(first, last)
        span = []
        if first - start > 1e-3:
            span.append((first - 1, (first - start) / cell))
        span += [(i, 1.0 / cell) for i in range(first, last)]
        if end - last > 1e-3:
            span.append((last, min(end - last, 1.0, cell) / cell))
        spans.append(span)
    taps = max(len(span) for span in spans)
    firsts = np.empty(target, np.int32)
    weights = np.zeros((taps, target), np.float32)
    for d, span in enumerate(spans):
        firsts[d] = min(span[0][0], source - taps)  # every first + k stays in the image; the weights shift with it
        for i, weight in span:
            weights[i - firsts[d], d] = weight
    return firsts, weights


@njit(cache=True, nogil=True)
def _grey_area_u8(pixels, rows, columns, channels, row_first, row_weights, column_first, column_weights, out):
    """Grey, [0, 1] and area resize of uint8 pixels, in float32.

    Args:
        pixels: ``(rows * columns * channels,)`` uint8, C order; channels
            1, 3 (BGR) or 4 (BGRA, alpha ignored).
        row_first, row_weights, column_first, column_weights: :func:`_area_taps`
            of the rows and of the columns.
        out: ``(height, width)`` float32, written.

    Each loop runs along contiguous memory, so that it vectorises: grey,
    then the rows' weights (over whole source rows), then the columns'
    weights on the transposed intermediate.
    """
    height, width = out.shape
    n = rows * columns
    grey = np.empty(n, np.float32)
    if channels == 1:
        for i in range(n):
            grey[i] = np.float32(pixels[i]) * _UNIT8
    elif channels == 3:
        _weigh_channels(pixels, 3, grey)  # a literal stride, so that the loop vectorises
    else:
        _weigh_channels(pixels, 4, grey)
    # The two passes are written out, not one helper called twice: as a helper, whose arrays the compiler cannot
    # prove apart, neither loop vectorised and the whole took twice as long (bench_preprocess.py).
    image = grey.reshape((rows, columns))
    tall = np.zeros((height, columns), np.float32)
    for d in range(height):
        first = row_first[d]
        for k in range(row_weights.shape[0]):
            weight = row_weights[k, d]
            if weight != 0:
                for x in range(columns):
                    tall[d, x] += weight * image[first + k, x]
    across = np.ascontiguousarray(tall.T)
    result = np.zeros((width, height), np.float32)
    for d in range(width):
        first = column_first[d]
        for k in range(column_weights.shape[0]):
            weight = column_weights[k, d]
            if weight != 0:
                for y in range(height):
                    result[d, y] += weight * across[first + k, y]
    out[:, :] = result.T


#: An image whose linear size (the square root of its pixel count) is more than this factor larger or smaller
#: than the model's input gets an input note: resizing then throws away detail, or invents it.
NOTE_SCALE = 2.0
#: An image whose aspect ratio differs from the input's by more than this factor gets an input note:
#: resizing stretches the part (preprocessing neither crops nor pads).
NOTE_ASPECT = 1.2
#: A 3- or 4-channel image is colour when two of its colour channels differ by more than this share of full
#: scale at some pixel of a sampled grid (10 of 255 levels: more than JPEG noise on a grey image saved as colour).
NOTE_COLOUR = 0.04
#: The sampled grid for the colour test: at most this many rows and columns.
_NOTE_GRID = 128


@dataclass(frozen=True)
class InputNote:
    """How far an image is from what the model was trained on, in words (see :func:`input_note`).

    Attributes:
        kinds: which differences: ``colour``, ``larger``, ``smaller``,
            ``aspect``; one warning per kind is enough for a source.
        text: the note, for the result and the ledger (``input_note``).
    """

    kinds: tuple[str, ...]
    text: str


def input_note(image: np.ndarray, size: tuple[int, int]) -> InputNote | None:
    """Say how preprocessing changes an image much, or None when it does not.

    Three things are noted, because the model learned from images that had
    none of them: colour (a 3- or 4-channel image whose channels differ by
    more than :data:`NOTE_COLOUR` of full scale; a grey image stored with
    three equal channels is not colour), a size more than
    :data:`NOTE_SCALE` times larger or smaller than the input (linear, by
    pixel count), and an aspect ratio more than :data:`NOTE_ASPECT` times
    off the input's.

        >>> input_note(np.zeros((1024, 1024, 3), np.uint8), (256, 256)).text
        '1024x1024 scaled down 4.0x to 256x256'

    Args:
        image: the decoded image, as :func:`preprocess` takes it.
        size: ``(height, width)`` of the model input.
    """
    kinds: list[str] = []
    parts: list[str] = []
    if image.ndim == 3 and image.shape[2] in (3, 4) and _is_colour(image):
        kinds.append("colour")
        parts.append(f"colour image ({image.shape[2]} channels) converted to grey")
    if image.ndim >= 2 and image.shape[0] > 0 and image.shape[1] > 0:
        height, width = image.shape[:2]
        in_h, in_w = size
        factor = float(np.sqrt((height * width) / (in_h * in_w)))
        aspect = (width / height) / (in_w / in_h)
        shown = f"{width}x{height}"
        resized = []
        if factor > NOTE_SCALE:
            kinds.append("larger")
            resized.append(f"scaled down {factor:.1f}x to {in_w}x{in_h}")
        elif factor < 1.0 / NOTE_SCALE:
            kinds.append("smaller")
            resized.append(f"scaled up {1.0 / factor:.1f}x to {in_w}x{in_h}")
        if max(aspect, 1.0 / aspect) > NOTE_ASPECT:
            kinds.append("aspect")
            if not resized:
                resized.append(f"resized to {in_w}x{in_h}")
            resized.append(f"aspect ratio {width / height:.2f} stretched to {in_w / in_h:.2f}")
        if resized:
            parts.append(f"{shown} {', '.join(resized)}")
    return InputNote(tuple(kinds), "; ".join(parts)) if parts else None


class NoteWarnings:
    """Log a warning the first time a source's parts show each kind of input note; later ones stay in the results.

    Not thread-safe: call it from one thread.

        >>> warn = NoteWarnings("watch /srv/parts", (256, 256))
        >>> warn("part-7.jpeg", input_note(image, (256, 256)))   # logs once per kind

    Args:
        source: how the log names the source.
        size: ``(height, width)`` of the model input.
    """

    def __init__(self, source: str, size: tuple[int, int]):
        self.source = source
        self.size = size
        self._seen: set[str] = set()

    def __call__(self, name: str, note: InputNote | None) -> None:
        if note is None or self._seen.issuperset(note.kinds):
            return
        self._seen.update(note.kinds)
        height, width = self.size
        log.warning("%s: %s is inspected, but not as the model was trained: %s (the model takes %dx%d grey "
                    "images). Verdicts on such images are less reliable: feed images like the training ones, or "
                    "train a model on these. Each such result says so in input_note; this warning comes once per "
                    "source for each kind of note.", self.source, name, note.text, width, height)


def _is_colour(image: np.ndarray) -> bool:
    """Whether the first three channels differ by more than :data:`NOTE_COLOUR` somewhere on a sampled grid."""
    step_y = max(1, image.shape[0] // _NOTE_GRID)
    step_x = max(1, image.shape[1] // _NOTE_GRID)
    if image.dtype == np.uint8:
        return _colour_spread_u8(image, step_y, step_x) > NOTE_COLOUR * 255.0
    sample = image[::step_y, ::step_x, :3]
    full = 65535.0 if image.dtype == np.uint16 else 1.0
    # Elementwise over the three channel planes: a reduction along an axis of three costs 1.8 ms an image,
    # as much as the rest of the pipeline around inference (docs/benchmarks.md); fmax/fmin skip NaN.
    b, g, r = (sample[..., c].astype(np.float32) for c in range(3))
    spread = np.fmax(np.fmax(b, g), r) - np.fmin(np.fmin(b, g), r)
    return bool(spread.size and np.nanmax(spread) > NOTE_COLOUR * full)


@njit(cache=True, nogil=True, inline="always")
def _weigh_channels(pixels, stride, grey):
    """``grey[i]`` = OpenCV's grey of the BGR pixel at ``pixels[stride * i]``, on the [0, 1] scale, in float32."""
    for i in range(grey.size):
        grey[i] = ((np.float32(pixels[stride * i]) * _UNIT8) * _GREY_B + (np.float32(pixels[stride * i + 1]) * _UNIT8)
                   * _GREY_G + (np.float32(pixels[stride * i + 2]) * _UNIT8) * _GREY_R)


@njit(cache=True, nogil=True)
def _colour_spread_u8(image, step_y, step_x):
    """The largest max - min of the first three channels over ``image[::step_y, ::step_x]``.

    Args:
        image: ``(H, W, C)`` uint8, C >= 3.
        step_y, step_x: the grid's steps, >= 1.

    Returns:
        An int in [0, 255].
    """
    spread = 0
    for y in range(0, image.shape[0], step_y):
        for x in range(0, image.shape[1], step_x):
            b, g, r = np.int32(image[y, x, 0]), np.int32(image[y, x, 1]), np.int32(image[y, x, 2])
            spread = max(spread, max(b, g, r) - min(b, g, r))
    return spread


def load(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """``preprocess(read_image(path), size)``."""
    return preprocess(read_image(path), size)
