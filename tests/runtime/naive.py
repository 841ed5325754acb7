"""Plain NumPy/SciPy twins of the criteria kernels (test support).

Each function takes the float64 residual ``r`` of one image (2-D for the
smooth_* criteria, any shape for the others) and returns one float, written
as directly as the definition in ``docs/criteria.md`` allows, for the kernel
tests to compare against.

    >>> r = residual(image, recon)
    >>> kurtosis(r), entropy(r)
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import scipy.stats

BINS = 256
RANGE = (-1.0, 1.0)


def residual(image: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Signed residual on the [0, 1] scale, float64: image - recon."""
    x = image.astype(np.float64)
    if image.dtype == np.uint8:
        x = x / 255.0
    return x - recon.astype(np.float64)


def _constant(r: np.ndarray) -> bool:
    return r.max() == r.min()


# mean and cumsum use math.fsum, the exactly rounded sum: a residual can sum
# to nearly zero from values of both signs, and a plain float64 sum then
# keeps few correct digits; the twin should be the truth, not one more guess.
def mean(r):
    return float(r.flat[0] if _constant(r) else math.fsum(r.ravel()) / r.size)


def std(r):
    return float(np.std(r, ddof=0))


def variance(r):
    return float(np.var(r, ddof=0))


def kurtosis(r):
    # SciPy answers NaN for a constant sample; the criterion defines 0.0.
    if _constant(r):
        return 0.0
    return float(scipy.stats.kurtosis(r.ravel(), fisher=True, bias=True))


def skewness(r):
    if _constant(r):
        return 0.0
    return float(scipy.stats.skew(r.ravel(), bias=True))


def range_(r):
    return float(np.ptp(r))


def min_(r):
    return float(np.min(r))


def max_(r):
    return float(np.max(r))


def cumsum(r):
    return math.fsum(r.ravel())


def mse(r):
    return float(np.mean(r**2))


def entropy(r):
    counts, _ = np.histogram(np.clip(r, *RANGE), bins=BINS, range=RANGE)
    p = counts[counts > 0] / r.size
    return float(-np.sum(p * np.log2(p)))


def smoothed(r):
    """The residual smoothed as the smooth_* criteria define it: a Gaussian of
    sigma 1 pixel, truncated at 3 sigma (3 taps each side), 'reflect' border."""
    return scipy.ndimage.gaussian_filter(r, sigma=1.0, mode="reflect", truncate=3.0)


def smooth_min(r):
    return float(np.min(smoothed(r)))


def smooth_max(r):
    return float(np.max(smoothed(r)))


def smooth_range(r):
    return float(np.ptp(smoothed(r)))


#: Twin of each criterion, by name.
TWINS = {
    "mean": mean,
    "std": std,
    "variance": variance,
    "kurtosis": kurtosis,
    "skewness": skewness,
    "range": range_,
    "min": min_,
    "max": max_,
    "cumsum": cumsum,
    "mse": mse,
    "entropy": entropy,
    "smooth_min": smooth_min,
    "smooth_max": smooth_max,
    "smooth_range": smooth_range,
}


class _SmoothedOnce:
    """``smoothed(r)``, filtering each residual once for the three smooth_*
    twins (it holds the last ``r``, so ``is`` cannot match a new array)."""

    def __init__(self):
        self._r = None
        self._s = None

    def __call__(self, r):
        if r is not self._r:
            self._r, self._s = r, smoothed(r)
        return self._s


_smoothed_once = _SmoothedOnce()

#: The twins with NumPy's pairwise sums for mean and cumsum instead of the
#: exactly rounded (and 40x slower) math.fsum, and one Gaussian filter per
#: image for the three smooth_* criteria: the reference a benchmark should
#: race, so as not to flatter the kernel.
NUMPY_TWINS = {
    **TWINS,
    "mean": lambda r: float(np.mean(r)),
    "cumsum": lambda r: float(np.sum(r)),
    "smooth_min": lambda r: float(np.min(_smoothed_once(r))),
    "smooth_max": lambda r: float(np.max(_smoothed_once(r))),
    "smooth_range": lambda r: float(np.ptp(_smoothed_once(r))),
}


def criteria(images: np.ndarray, recons: np.ndarray, names=tuple(TWINS), twins=TWINS) -> np.ndarray:
    """All named criteria of a batch, ``(N, len(names))`` float64, image by image.

    A residual with a NaN or an infinity gives NaN in every column.
    """
    out = np.empty((len(images), len(names)))
    for i, (image, recon) in enumerate(zip(images, recons)):
        r = residual(image, recon)
        if not np.isfinite(r).all():
            out[i] = np.nan
            continue
        out[i] = [twins[name](r) for name in names]
    return out
