"""Fused Numba criteria kernels and the criteria registry.

This module owns the step from (image, reconstruction) to numbers: the signed
residual ``r = image - reconstruction`` on the [0, 1] scale, the criteria
that summarise it per image (the paper's eleven, then the extremes of the
residual after a light Gaussian smoothing), and the per-pixel anomaly map
``|r|``. One fused, parallel kernel computes everything for a batch: two
passes over each image for the eleven, a third, filtering one, for the
smoothed extremes; ``docs/criteria.md`` gives the definitions with their edge
cases.

    >>> from edge_inspect.kernels import CRITERIA, criteria
    >>> scores = criteria(images, recons)                  # (N, 14) float64
    >>> scores[:, CRITERIA.index("range")]                 # one criterion
    >>> scores, amap = criteria(images, recons, return_map=True, sigma=2.0)

Adding a criterion: append its name to :data:`CRITERIA` (never reorder or
rename; the position is the output column and model cards store names),
describe it in :data:`DEFINITIONS` and ``docs/criteria.md``, compute it into
its column in :func:`_image_criteria` (in the pass that already reads the
pixels, if it can; a criterion of the smoothed residual in
:func:`_smooth_extremes`), and give it a twin in ``tests/runtime/naive.py``.
"""

from __future__ import annotations

import math

from edge_inspect import numba_cache  # before Numba: it chooses the cache folder

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import carray, njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from edge_inspect.errors import ConfigError, InputError  # noqa: E402

numba_cache.configure()

#: The criteria, in output column order. Append only: every criterion keeps
#: its name and column when more are added. The first eleven are the paper's.
CRITERIA: tuple[str, ...] = (
    "mean",
    "std",
    "variance",
    "kurtosis",
    "skewness",
    "range",
    "min",
    "max",
    "cumsum",
    "mse",
    "entropy",
    "smooth_min",
    "smooth_max",
    "smooth_range",
)

#: One-line definition of each criterion, over the n pixels of the signed
#: residual r of one image (``docs/criteria.md`` has the long form).
DEFINITIONS: dict[str, str] = {
    "mean": "mean of r: sum(r) / n",
    "std": "population standard deviation of r (ddof=0): sqrt(m2)",
    "variance": "population variance of r (ddof=0): m2 = mean((r - mean)^2)",
    "kurtosis": "excess (Fisher) kurtosis, biased: m4 / m2^2 - 3; 0.0 when r is constant",
    "skewness": "skewness, biased: m3 / m2^1.5; 0.0 when r is constant",
    "range": "max(r) - min(r)",
    "min": "minimum of r",
    "max": "maximum of r",
    "cumsum": "cumulative sum of r: sum(r)",
    "mse": "mean squared residual: sum(r^2) / n",
    "entropy": "Shannon entropy in bits of the 256-bin histogram of r over [-1, 1]",
    "smooth_min": "minimum of s = G * r, r smoothed by a Gaussian (sigma 1 px, radius 3, 'reflect' border)",
    "smooth_max": "maximum of s = G * r, r smoothed by a Gaussian (sigma 1 px, radius 3, 'reflect' border)",
    "smooth_range": "max(s) - min(s), s = G * r smoothed as for smooth_min",
}

#: Histogram of the entropy criterion: equal bins over [ENTROPY_RANGE], values
#: outside clipped into the first or last bin, the right edge in the last bin
#: (``np.histogram`` conventions).
ENTROPY_BINS = 256
ENTROPY_RANGE = (-1.0, 1.0)

#: Gaussian of the smooth_* criteria: standard deviation in pixels, and the
#: taps on each side, ``int(3 sigma + 0.5)`` (``scipy.ndimage``'s rule with
#: ``truncate=3``). :func:`_smooth_extremes` writes out the 3 taps a side.
SMOOTH_SIGMA = 1.0
SMOOTH_RADIUS = int(3.0 * SMOOTH_SIGMA + 0.5)

# Column of each criterion, frozen into the kernel as compile-time constants.
_MEAN = CRITERIA.index("mean")
_STD = CRITERIA.index("std")
_VARIANCE = CRITERIA.index("variance")
_KURTOSIS = CRITERIA.index("kurtosis")
_SKEWNESS = CRITERIA.index("skewness")
_RANGE = CRITERIA.index("range")
_MIN = CRITERIA.index("min")
_MAX = CRITERIA.index("max")
_CUMSUM = CRITERIA.index("cumsum")
_MSE = CRITERIA.index("mse")
_ENTROPY = CRITERIA.index("entropy")
_SMOOTH_MIN = CRITERIA.index("smooth_min")
_SMOOTH_MAX = CRITERIA.index("smooth_max")
_SMOOTH_RANGE = CRITERIA.index("smooth_range")
_N_CRITERIA = len(CRITERIA)


def _gaussian_weights(sigma: float, radius: int) -> np.ndarray:
    """``exp(-k^2 / (2 sigma^2))`` for k in -radius..radius, normalised to sum 1.

    Computed as ``scipy.ndimage`` computes its ``gaussian_filter`` weights,
    operation for operation, so that both filters use the same float64s.
    """
    k = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * k**2)
    return phi / phi.sum()


# The kernel takes the half k = 0..radius of the symmetric weights.
_SMOOTH_WEIGHTS = np.ascontiguousarray(_gaussian_weights(SMOOTH_SIGMA, SMOOTH_RADIUS)[SMOOTH_RADIUS:])

# uint8 -> [0, 1]: k * fl(1/255). Within one unit in the last place of
# k / 255 and exact for 0 and 255; no residual near a histogram edge can tell
# the two apart (docs/criteria.md shows why), so entropy agrees bin for bin.
_UINT8_SCALE = 1.0 / 255.0

_NAN_POLICIES = ("raise", "propagate")

# Pixels per chunk: sums are added up per chunk, then across chunks (a
# shallow summation tree); pass 2 computes a chunk's bins into a stack buffer
# of this many bytes, then counts them, both in L1.
_CHUNK = 4096
# Sub-histograms the count is spread over, so that runs of equal bins (the
# normal case: residuals cluster around 0) do not wait on each other's stores.
_LANES = 4

# reassoc lets LLVM vectorise the float64 sums (a change of summation order,
# ~1e-16 relative). Deliberately absent: "contract" (an FMA in r = x*s - rec
# would move r across histogram edges), "nnan"/"ninf" (NaN must survive to be
# detected) and "nsz" (together with reassoc it made math.isfinite(NaN) come
# out True in numba 0.68 / LLVM 22).
_FASTMATH = {"reassoc"}
_FLOAT64_MAX = float(np.finfo(np.float64).max)


def criterion_index(name: str) -> int:
    """Column of criterion ``name`` in the output of :func:`criteria`.

    Raises:
        ConfigError: ``name`` is not in :data:`CRITERIA`.
    """
    try:
        return CRITERIA.index(name)
    except ValueError:
        known = ", ".join(CRITERIA)
        raise ConfigError(f"Unknown criterion {name!r}. Expected one of: {known}.") from None


def _llvm_binary(name):
    """A float64 (a, b) -> float64 LLVM intrinsic, callable from njit code."""

    @intrinsic
    def call(typingctx, a, b):
        def codegen(context, builder, signature, args):
            double = ir.DoubleType()
            fn = builder.module.declare_intrinsic(name, [double], ir.FunctionType(double, [double, double]))
            return builder.call(fn, args)

        return types.float64(types.float64, types.float64), codegen

    return call


@intrinsic
def _stack_bytes(typingctx, size):
    """A pointer to ``size`` (a literal int) bytes on the caller's stack.

    Memory LLVM can see is private to the function: a loop that stores into
    it and sums at the same time is vectorised without run-time overlap
    checks, so it runs one code path whatever the inputs' addresses.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None
    nbytes = size.literal_value

    def codegen(context, builder, signature, args):
        buf = cgutils.alloca_once(builder, ir.ArrayType(ir.IntType(8), nbytes))
        return builder.bitcast(buf, ir.IntType(8).as_pointer())

    return types.CPointer(types.uint8)(size), codegen


# NaN-propagating min and max (IEEE 754-2019 minimum/maximum). LLVM vectorises
# reductions over these, which it does not do for numba's min()/max() or a
# compare-and-select without the "nnan" flag.
_minimum = _llvm_binary("llvm.minimum")
_maximum = _llvm_binary("llvm.maximum")


@njit(cache=True, parallel=True)
def _criteria_kernel(images, recons, scale, height, width, weights, write_map, out, amap):
    """All criteria of a batch of residuals, one image per thread.

    Args:
        images: ``(N, P)`` uint8 or float32, P = H * W pixels per image, row
            by row.
        recons: ``(N, P)`` float32 reconstructions.
        scale: float64 factor to the [0, 1] scale: 1/255 for uint8, 1.0 for
            float32 (exact).
        height: H, rows per image (int).
        width: W, pixels per row (int).
        weights: ``(SMOOTH_RADIUS + 1,)`` float64, the Gaussian weights of
            the smooth_* criteria for k = 0..radius (symmetric).
        write_map: whether to write ``|r|`` into ``amap``.
        out: ``(N, len(CRITERIA))`` float64, written in full.
        amap: ``(N, P)`` float32, written when ``write_map``; ``(N, 0)``
            otherwise.
    """
    # The per-image work is done by plain serial functions, so their loops compile as
    # they would outside a parfor (vectorised, with their own fast-math flags).
    for i in prange(images.shape[0]):
        _image_criteria(images[i], recons[i], scale, write_map, out[i], amap[i])
        _smooth_extremes(images[i], recons[i], scale, height, width, weights, out[i])


@njit(cache=True, fastmath=_FASTMATH)
def _image_criteria(image, recon, scale, write_map, out, amap):
    """The paper's eleven criteria of one residual ``r = float64(image) * scale - float64(recon)``.

    Args:
        image: ``(P,)`` uint8 or float32.
        recon: ``(P,)`` float32.
        scale: float64, 1/255 for uint8, 1.0 for float32.
        write_map: whether to write ``|r|`` into ``amap``.
        out: ``(len(CRITERIA),)`` float64: the eleven columns written (all
            columns NaN for a non-finite residual); the smooth_* columns are
            :func:`_smooth_extremes`' to write.
        amap: ``(P,)`` float32 when ``write_map``.

    Pass 1, one vectorised loop: sum, min and max; then, if asked, one loop
    writing the map. Both passes sum chunk by chunk (``_CHUNK`` pixels, each
    summed in the vector lanes) and then add the chunk sums: a shallow
    summation tree, whose rounding error grows with the chunk length rather
    than the image size. Pass 2 (the image is still in cache), in chunks of
    ``_CHUNK`` pixels: one vectorised loop for the central moments about the
    mean (accurate where raw power sums would cancel) and the histogram bin
    of each pixel, ``floor(128 r) + 128`` clamped to 0..255 (exact, 128 r
    being exact), into a byte buffer on the stack; then a scalar loop
    counting the bins into ``_LANES`` sub-histograms. MSE is m2 + mean^2
    (two non-negative terms: no cancellation).

    No loop both sums and stores to memory an argument could alias: LLVM
    would guard its vectorised sums with a run-time overlap check and a
    scalar fallback, and the last bits of the scores then depended on the
    thread and on whether the map was asked for (seen with numba 0.68). The
    bin buffer is on the stack for that reason, and the map has its own loop.

    All sums are float64. A NaN or infinity anywhere in the residual makes
    the row NaN, without pass 2. A constant residual (max == min) gets
    mean = that value exactly, std = variance = 0, kurtosis = skewness = 0.0
    and entropy = 0, without pass 2.
    """
    npix = image.shape[0]
    s = 0.0
    lo = np.inf
    hi = -np.inf
    for start in range(0, npix, _CHUNK):
        part = 0.0
        for j in range(start, min(start + _CHUNK, npix)):
            r = np.float64(image[j]) * scale - np.float64(recon[j])
            part += r
            lo = _minimum(lo, r)
            hi = _maximum(hi, r)
        s += part

    if write_map:
        for j in range(npix):
            amap[j] = np.float32(abs(np.float64(image[j]) * scale - np.float64(recon[j])))

    # A NaN in r makes s NaN, an infinity makes it infinite or NaN (finite
    # r cannot overflow it). Tested by comparison, not math.isfinite, which
    # LLVM may fold away under fast-math flags.
    if not abs(s) <= _FLOAT64_MAX:
        for c in range(_N_CRITERIA):
            out[c] = np.nan
        return
    if hi == lo:
        out[_MEAN] = lo
        out[_STD] = 0.0
        out[_VARIANCE] = 0.0
        out[_KURTOSIS] = 0.0
        out[_SKEWNESS] = 0.0
        out[_RANGE] = 0.0
        out[_MIN] = lo
        out[_MAX] = hi
        out[_CUMSUM] = s
        out[_MSE] = lo * lo
        out[_ENTROPY] = 0.0
        return

    mean = s / npix
    m2 = 0.0
    m3 = 0.0
    m4 = 0.0
    bins = carray(_stack_bytes(_CHUNK), (_CHUNK,))
    counts = np.zeros((_LANES, ENTROPY_BINS), dtype=np.int64)
    for start in range(0, npix, _CHUNK):
        stop = min(start + _CHUNK, npix)
        p2 = 0.0
        p3 = 0.0
        p4 = 0.0
        for j in range(start, stop):
            r = np.float64(image[j]) * scale - np.float64(recon[j])
            d = r - mean
            d2 = d * d
            p2 += d2
            p3 += d2 * d
            p4 += d2 * d2
            t = math.floor(r * 128.0) + 128.0
            t = t if t >= 0.0 else 0.0
            t = t if t <= 255.0 else 255.0  # r = 1 joins the last bin
            bins[j - start] = np.uint8(np.int32(t))
        m2 += p2
        m3 += p3
        m4 += p4
        k = 0
        while k + _LANES <= stop - start:
            for lane in range(_LANES):
                counts[lane, bins[k + lane]] += 1
            k += _LANES
        while k < stop - start:
            counts[0, bins[k]] += 1
            k += 1
    m2 /= npix
    m3 /= npix
    m4 /= npix
    entropy = 0.0
    for b in range(ENTROPY_BINS):
        c = 0
        for lane in range(_LANES):
            c += counts[lane, b]
        if c > 0:
            p = c / npix
            entropy -= p * math.log2(p)

    if m2 > 0.0:
        kurt = m4 / (m2 * m2) - 3.0
        skew = m3 / (m2 * math.sqrt(m2))
    else:
        kurt = 0.0
        skew = 0.0
    out[_MEAN] = mean
    out[_STD] = math.sqrt(m2)
    out[_VARIANCE] = m2
    out[_KURTOSIS] = kurt
    out[_SKEWNESS] = skew
    out[_RANGE] = hi - lo
    out[_MIN] = lo
    out[_MAX] = hi
    out[_CUMSUM] = s
    out[_MSE] = m2 + mean * mean
    out[_ENTROPY] = entropy


@njit(cache=True)
def _reflect(i, n):
    """Index ``i`` folded into 0..n-1 by half-sample symmetric reflection.

    ``... c b a | a b c ... c b a | a b c ...``: repeated as often as needed,
    so lines shorter than the filter radius reflect like ``scipy.ndimage``'s
    ``mode="reflect"``.
    """
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


@njit(cache=True)
def _smoothed_at(line, x, width, weights):
    """Row filter at pixel ``x`` near the border (reflected neighbours)."""
    v = line[x] * weights[0]
    for k in range(SMOOTH_RADIUS, 0, -1):
        v += (line[_reflect(x - k, width)] + line[_reflect(x + k, width)]) * weights[k]
    return v


@njit(cache=True)
def _smooth_extremes(image, recon, scale, height, width, weights, out):
    """smooth_min, smooth_max, smooth_range of one residual, into ``out``.

    Args:
        image: ``(P,)`` uint8 or float32, P = height * width, row by row.
        recon: ``(P,)`` float32.
        scale: float64, 1/255 for uint8, 1.0 for float32.
        height: H, rows (int).
        width: W, pixels per row (int).
        weights: ``(SMOOTH_RADIUS + 1,)`` float64, Gaussian weights for
            k = 0..radius, summing to 1 over -radius..radius.
        out: ``(len(CRITERIA),)`` float64 row, with the eleven criteria of
            :func:`_image_criteria` already in it; the three smooth_*
            columns are written.

    The residual ``r`` (computed as in :func:`_image_criteria`) is filtered
    down the columns, then along the rows, with the 'reflect' border, and
    the extremes of the result ``s`` are kept; ``s`` itself is never stored.
    ``r`` goes row by row into a ring of ``2 * radius + 1`` rows (for each
    output row, its neighbour rows, reflected at the top and bottom, are all
    in the ring), the column filter of one output row into one more row, and
    the row filter reads that row and takes the minimum and maximum. The
    working memory is that ``(2 * radius + 2, W)`` block: in L1 or L2 for
    any model input size, allocated once per image.

    Each filter adds its taps as ``scipy.ndimage.correlate1d`` does for
    symmetric weights: ``x_0 w_0``, then ``(x_-k + x_k) w_k`` for
    ``k = radius..1``. No fast-math flags: no long sums to vectorise (the
    ``llvm.minimum``/``llvm.maximum`` extremes are exact in any order), and
    without reassociation or contraction each ``s`` rounds exactly as the
    SciPy twin's does. The column filter and the row filter away from the
    border are written out for the 3 taps a side of ``SMOOTH_RADIUS``, one
    expression each: a loop over the taps, or one pass over the row per
    tap, made the pass about 20 % slower (numba 0.68). The residual is read
    through row slices: indexing the whole image from the row's start made
    that loop about twice as slow.

    A row already NaN (a non-finite residual) gets NaN; a constant residual
    (min == max) gets smooth_min = smooth_max = that value exactly and
    smooth_range = 0, without filtering (the weights sum to 1 only up to
    rounding, so the filter would return the value within an ulp or two).
    """
    if math.isnan(out[_MEAN]):
        out[_SMOOTH_MIN] = np.nan
        out[_SMOOTH_MAX] = np.nan
        out[_SMOOTH_RANGE] = np.nan
        return
    if out[_MIN] == out[_MAX]:
        out[_SMOOTH_MIN] = out[_MIN]
        out[_SMOOTH_MAX] = out[_MAX]
        out[_SMOOTH_RANGE] = 0.0
        return

    taps = 2 * SMOOTH_RADIUS + 1
    rows = np.empty((taps + 1, width), dtype=np.float64)
    line = rows[taps]
    w0 = weights[0]
    w1 = weights[1]
    w2 = weights[2]
    w3 = weights[3]
    lo = np.inf
    hi = -np.inf
    ready = 0  # residual rows in the ring so far
    for y in range(height):
        while ready <= min(y + SMOOTH_RADIUS, height - 1):
            ring = rows[ready % taps]
            start = ready * width
            pixels = image[start : start + width]
            recs = recon[start : start + width]
            for x in range(width):
                ring[x] = np.float64(pixels[x]) * scale - np.float64(recs[x])
            ready += 1

        # down the columns: the filtered row y into `line`
        c = rows[y % taps]
        u1 = rows[_reflect(y - 1, height) % taps]
        d1 = rows[_reflect(y + 1, height) % taps]
        u2 = rows[_reflect(y - 2, height) % taps]
        d2 = rows[_reflect(y + 2, height) % taps]
        u3 = rows[_reflect(y - 3, height) % taps]
        d3 = rows[_reflect(y + 3, height) % taps]
        for x in range(width):
            line[x] = c[x] * w0 + (u3[x] + d3[x]) * w3 + (u2[x] + d2[x]) * w2 + (u1[x] + d1[x]) * w1

        # along the row, keeping only the extremes
        for x in range(min(SMOOTH_RADIUS, width)):
            v = _smoothed_at(line, x, width, weights)
            lo = _minimum(lo, v)
            hi = _maximum(hi, v)
        for x in range(SMOOTH_RADIUS, width - SMOOTH_RADIUS):
            v = (
                line[x] * w0
                + (line[x - 3] + line[x + 3]) * w3
                + (line[x - 2] + line[x + 2]) * w2
                + (line[x - 1] + line[x + 1]) * w1
            )
            lo = _minimum(lo, v)
            hi = _maximum(hi, v)
        for x in range(max(SMOOTH_RADIUS, width - SMOOTH_RADIUS), width):
            v = _smoothed_at(line, x, width, weights)
            lo = _minimum(lo, v)
            hi = _maximum(hi, v)

    out[_SMOOTH_MIN] = lo
    out[_SMOOTH_MAX] = hi
    out[_SMOOTH_RANGE] = hi - lo


def criteria(
    images: np.ndarray,
    recons: np.ndarray,
    *,
    return_map: bool = False,
    sigma: float = 0.0,
    on_nan: str = "raise",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """All criteria of the residuals ``images - recons``, one row per image.

    Args:
        images: ``(N, H, W)`` uint8 (0..255, read as value * (1/255)) or
            float32 in [0, 1]; or one ``(H, W)`` image. Values are not range
            checked (residuals beyond [-1, 1] fall in the end bins of the
            entropy histogram).
        recons: ``(N, H, W)`` float32 reconstructions on the [0, 1] scale, the
            same shape as ``images``. Non-contiguous arrays are copied first.
        return_map: also return the anomaly map ``|r|``.
        sigma: when > 0 (and ``return_map``), smooth each map with a Gaussian
            of this standard deviation in pixels: ``cv2.GaussianBlur`` with
            ``ksize=(0, 0)`` (OpenCV picks the size from sigma) and the
            ``BORDER_REFLECT_101`` border; one OpenCV call per image, after
            the kernel. 0 leaves ``|r|`` as it is. It does not change the
            criteria: the smooth_* criteria have their own fixed filter
            (:data:`SMOOTH_SIGMA`), the others use the unsmoothed residual.
        on_nan: what a NaN or infinity in an image's residual does:
            ``"raise"`` (default) raises :class:`InputError` naming the image
            indices; ``"propagate"`` returns NaN in every column of those
            rows, so a batch caller can give those images an error verdict.

    Returns:
        ``(N, len(CRITERIA))`` float64 scores, columns in :data:`CRITERIA`
        order; with ``return_map``, also the ``(N, H, W)`` float32 map. A
        2-D input pair gives a ``(len(CRITERIA),)`` vector and an
        ``(H, W)`` map.

    Raises:
        InputError: wrong dtype, ndim or mismatched shapes; an empty image;
            a non-finite residual under ``on_nan="raise"``.
        ConfigError: unknown ``on_nan`` or a negative ``sigma``.
    """
    if on_nan not in _NAN_POLICIES:
        raise ConfigError(f"on_nan must be one of {_NAN_POLICIES}, got {on_nan!r}.")
    if not sigma >= 0.0:
        raise ConfigError(f"sigma must be >= 0 pixels (0 = no smoothing), got {sigma!r}.")
    images = np.asarray(images)
    recons = np.asarray(recons)
    single = images.ndim == 2 and recons.ndim == 2
    if single:
        images = images[np.newaxis]
        recons = recons[np.newaxis]
    _check(images, recons)
    images = np.ascontiguousarray(images)
    recons = np.ascontiguousarray(recons)

    n, h, w = images.shape
    scale = _UINT8_SCALE if images.dtype == np.uint8 else 1.0
    out = np.empty((n, _N_CRITERIA), dtype=np.float64)
    amap = np.empty((n, h * w if return_map else 0), dtype=np.float32)
    _criteria_kernel(
        images.reshape(n, h * w), recons.reshape(n, h * w), scale, h, w, _SMOOTH_WEIGHTS, return_map, out, amap
    )
    amap = amap.reshape(n, h, w) if return_map else amap

    if on_nan == "raise":
        bad = np.flatnonzero(np.isnan(out[:, _MEAN]))
        if bad.size:
            shown = ", ".join(str(k) for k in bad[:10]) + (", ..." if bad.size > 10 else "")
            raise InputError(
                f"The residual of image(s) {shown} (of {n}) contains NaN or infinity. "
                "Expected finite images and reconstructions; check the image source and "
                "the model output, or pass on_nan='propagate' to get NaN criteria for "
                "those images only."
            )
    if return_map and sigma > 0.0:
        for k in range(n):  # off the hot path: OpenCV blurs one 2-D image at a time
            amap[k] = _smooth(amap[k], sigma)
    if single:
        return (out[0], amap[0]) if return_map else out[0]
    return (out, amap) if return_map else out


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _check(images: np.ndarray, recons: np.ndarray) -> None:
    if images.dtype not in (np.uint8, np.float32):
        raise InputError(
            f"images must be uint8 (0..255) or float32 in [0, 1], found {images.dtype}. "
            "Convert with preprocess.to_unit_gray or .astype(np.float32)."
        )
    if recons.dtype != np.float32:
        raise InputError(
            f"recons must be float32 on the [0, 1] scale, found {recons.dtype}. "
            "Convert the model output with .astype(np.float32)."
        )
    if images.ndim != 3:
        raise InputError(
            f"images must be (N, H, W) or (H, W) with grayscale pixels, found ndim "
            f"{images.ndim} with shape {images.shape}. Drop a channel axis with "
            "image[..., 0] or x.squeeze(-1)."
        )
    if recons.shape != images.shape:
        raise InputError(
            f"recons must have the shape of images {images.shape}, found {recons.shape}. "
            "Both must be (N, H, W) at the model's input size."
        )
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise InputError(f"images must have at least one pixel, found shape {images.shape}.")
