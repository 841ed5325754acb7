"""The fused criteria kernel against its plain NumPy/SciPy twins."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_inspect.errors import ConfigError, InputError
from edge_inspect.kernels import (
    CRITERIA,
    DEFINITIONS,
    ENTROPY_BINS,
    SMOOTH_RADIUS,
    SMOOTH_SIGMA,
    criteria,
    criterion_index,
)
from tests.runtime import naive

RTOL = 1e-9
# Only bites on values that are 0 or within rounding of it (np.std of a
# constant is 1.4e-17 where the kernel says 0).
ATOL = 1e-12


def _sum_atol(name, r):
    """Absolute tolerance of a criterion that is a sum of signed terms.

    A sum can cancel to far below its terms, and then no float64 sum (nor
    the kernel's k * fl(1/255) in place of k / 255, 1e-16 a pixel) keeps 9
    correct digits of it. The bound that holds is the standard one for
    summation: a few ulps of the sum of the terms' magnitudes. It matters
    only for the deliberately cancelling histogram-edge cases. Each smoothed
    value is a weighted sum of residuals (weights summing to 1), so the
    smooth_* criteria get a few ulps of the largest |r|.
    """
    r = r.ravel()
    d = r - r.mean()
    m2 = np.mean(d**2)
    magnitude = {
        "mean": np.mean(np.abs(r)),
        "cumsum": np.sum(np.abs(r)),
        "skewness": np.mean(np.abs(d) ** 3) / m2**1.5 if m2 > 0 else 0.0,
        "smooth_min": np.max(np.abs(r)),
        "smooth_max": np.max(np.abs(r)),
        "smooth_range": np.max(np.abs(r)),
    }.get(name, 0.0)
    return ATOL + 1e-15 * magnitude


def _rng(seed):
    return np.random.default_rng(seed)


def _edges_batch():
    """Residuals on and next to the histogram edges, where binning goes wrong."""
    k = np.arange(-128, 129, dtype=np.float64) / 128  # the 257 edges, exact
    # float32 image k/128 (k >= 0) minus recon 0, or 0 minus recon |k|/128
    img_on = np.where(k >= 0, k, 0).astype(np.float32).reshape(1, 1, -1)
    rec_on = np.where(k < 0, -k, 0).astype(np.float32).reshape(1, 1, -1)
    # just below each edge: k/128 - 2**-30 for k >= 0, and 0 minus the next
    # float32 above |k|/128 for k < 0 (both exact in float64, neither on an edge)
    img_below = np.clip(k, 0, 1).astype(np.float32).reshape(1, 1, -1)
    rec_below = np.where(
        k < 0, np.nextafter((-k).astype(np.float32), np.float32(2)), np.float32(2.0**-30)
    ).astype(np.float32).reshape(1, 1, -1)
    # uint8 0 or 255 against recons on the edges: r = 1 - j/128 or -j/128
    j = np.arange(129, dtype=np.float32) / 128
    u8 = np.concatenate([np.full(129, 255, np.uint8), np.zeros(129, np.uint8)]).reshape(1, 1, -1)
    rec_u8 = np.concatenate([j, j]).astype(np.float32).reshape(1, 1, -1)
    # tiny negative residuals, as a black pixel minus a sigmoid's 1e-22: r + 1
    # rounds to 1.0 (an edge) in float64, yet r belongs to the bin below 0
    tiny = np.array([1e-22, 2.0**-60, 1e-40, 0.0, 0.0, 0.0], np.float32).reshape(1, 1, -1)
    # every grey level against float32 recons putting r on or next to every
    # edge: k * fl(1/255) and k / 255 must never fall in different bins
    kk, jj = np.meshgrid(np.arange(256), np.arange(-128, 129), indexing="ij")
    near = (kk / 255.0 - jj / 128.0).astype(np.float32)
    recs = np.stack([np.nextafter(near, np.float32(-2)), near, np.nextafter(near, np.float32(2))], -1)
    img_k = np.broadcast_to(kk[..., None], recs.shape).astype(np.uint8)
    return [
        (img_k.reshape(1, 256, -1), recs.reshape(1, 256, -1)),
        (img_on, rec_on),
        (img_below, rec_below),
        (u8, rec_u8),
        (np.zeros(tiny.shape, np.uint8), tiny),
    ]


def _cases():
    """name -> (images, recons): tiny fixed, seeded random and edge cases."""
    rng = _rng(20240611)
    cases = {
        # r = [-1, 1] pairs and a hand-checkable 2x3 residual
        "fixed_pm1": (np.array([[[0, 255]]], np.uint8), np.array([[[1.0, 0.0]]], np.float32)),
        "fixed_2x3": (
            np.array([[[0.5, 0.25, 1.0], [0.0, 0.75, 0.5]]], np.float32),
            np.array([[[0.25, 0.25, 0.5], [0.125, 0.0, 1.0]]], np.float32),
        ),
        # odd sizes exercise the lane and chunk tails (4096-pixel chunks)
        "random_u8": (
            rng.integers(0, 256, (3, 17, 23), dtype=np.uint8),
            rng.random((3, 17, 23), dtype=np.float32),
        ),
        "random_u8_chunks": (
            rng.integers(0, 256, (2, 70, 71), dtype=np.uint8),
            rng.random((2, 70, 71), dtype=np.float32),
        ),
        "random_f32": (
            rng.random((3, 31, 29), dtype=np.float32),
            rng.random((3, 31, 29), dtype=np.float32),
        ),
        "concentrated_u8": _concentrated(rng, (2, 64, 65)),
        "skewed_f32": (
            (rng.random((2, 40, 40)) ** 4).astype(np.float32),
            np.full((2, 40, 40), 0.05, np.float32),
        ),
        "constant_u8": (np.full((2, 5, 7), 77, np.uint8), np.full((2, 5, 7), 0.2, np.float32)),
        "constant_f32": (np.full((1, 9, 9), 0.3, np.float32), np.full((1, 9, 9), 0.7, np.float32)),
        "zeros": (np.zeros((2, 6, 6), np.uint8), np.zeros((2, 6, 6), np.float32)),
        "single_pixel": (np.array([[[200]]], np.uint8), np.array([[[0.1]]], np.float32)),
        "extreme_minus1": (np.zeros((1, 4, 4), np.uint8), np.ones((1, 4, 4), np.float32)),
        "extreme_plus1": (np.full((1, 4, 4), 255, np.uint8), np.zeros((1, 4, 4), np.float32)),
        "extreme_mixed": (
            np.array([[[0, 255, 0, 255, 128]]], np.uint8),
            np.array([[[1.0, 0.0, 0.0, 1.0, 0.5]]], np.float32),
        ),
        "extreme_checker": (
            (np.indices((1, 6, 6)).sum(0) % 2 * 255).astype(np.uint8),
            (1 - np.indices((1, 6, 6)).sum(0) % 2).astype(np.float32),
        ),
        # reconstructions beyond [0, 1]: residuals clipped into the end bins
        "out_of_range": (
            np.array([[[0.0, 1.0, 0.5, 0.5]]], np.float32),
            np.array([[[1.5, -0.75, 0.5, 0.25]]], np.float32),
        ),
        # strips and images smaller than the smoothing radius (3): the
        # 'reflect' border folds the filter back more than once
        "strip_1xW_u8": (rng.integers(0, 256, (2, 1, 40), dtype=np.uint8), rng.random((2, 1, 40), dtype=np.float32)),
        "strip_Hx1_f32": (rng.random((2, 40, 1), dtype=np.float32), rng.random((2, 40, 1), dtype=np.float32)),
        "small_2x2_u8": (rng.integers(0, 256, (2, 2, 2), dtype=np.uint8), rng.random((2, 2, 2), dtype=np.float32)),
        "small_3x5_f32": (rng.random((2, 3, 5), dtype=np.float32), rng.random((2, 3, 5), dtype=np.float32)),
        "small_5x2_u8": (rng.integers(0, 256, (1, 5, 2), dtype=np.uint8), rng.random((1, 5, 2), dtype=np.float32)),
        "small_7x6_f32": (rng.random((1, 7, 6), dtype=np.float32), rng.random((1, 7, 6), dtype=np.float32)),
    }
    for n, (img, rec) in enumerate(_edges_batch()):
        cases[f"histogram_edges_{n}"] = (img, rec)
    return cases


def _concentrated(rng, shape):
    """Residuals like a good reconstruction's: a few grey levels, small errors."""
    img = rng.integers(90, 110, shape, dtype=np.uint8)
    rec = (img / 255.0 + rng.normal(0.0, 0.01, shape)).astype(np.float32)
    return img, rec


CASES = _cases()
_SCORES = {}


def _scores(case):
    if case not in _SCORES:
        img, rec = CASES[case]
        _SCORES[case] = (criteria(img, rec), naive.criteria(img, rec))
    return _SCORES[case]


@pytest.mark.parametrize("name", CRITERIA)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_agrees_with_twin(case, name):
    got, want = _scores(case)
    col = criterion_index(name)
    for k, (img, rec) in enumerate(zip(*CASES[case])):
        atol = _sum_atol(name, naive.residual(img, rec))
        np.testing.assert_allclose(got[k, col], want[k, col], rtol=RTOL, atol=atol, err_msg=f"{case}[{k}]: {name}")


def test_fixed_values_by_hand():
    # r = [-1, +1]: the textbook symmetric two-point distribution
    got = dict(zip(CRITERIA, criteria(*CASES["fixed_pm1"])[0]))
    assert got["mean"] == 0.0 and got["cumsum"] == 0.0
    assert got["std"] == 1.0 and got["variance"] == 1.0 and got["mse"] == 1.0
    assert got["kurtosis"] == -2.0 and got["skewness"] == 0.0
    assert (got["min"], got["max"], got["range"]) == (-1.0, 1.0, 2.0)
    assert got["entropy"] == 1.0  # two equally filled bins: one bit


@pytest.mark.parametrize("case", ["constant_u8", "constant_f32", "zeros", "single_pixel", "extreme_plus1"])
def test_constant_residual_is_defined(case):
    img, rec = CASES[case]
    got = criteria(img, rec)
    r = naive.residual(img[0], rec[0]).ravel()[0]
    assert np.isfinite(got).all()
    for name, value in [("kurtosis", 0.0), ("skewness", 0.0), ("std", 0.0), ("variance", 0.0),
                        ("range", 0.0), ("entropy", 0.0), ("mean", r), ("min", r), ("max", r),
                        ("smooth_min", r), ("smooth_max", r), ("smooth_range", 0.0)]:
        assert (got[:, criterion_index(name)] == value).all(), name


def test_tiny_negative_residuals_fall_below_zero():
    img, rec = CASES["histogram_edges_4"]
    assert criteria(img, rec)[0, criterion_index("entropy")] == 1.0  # 3 in bin 127, 3 in 128


def test_extremes_land_in_the_end_bins():
    # -1 in the first bin, +1 in the last (the right edge is closed): 1 bit
    img = np.array([[[0, 255]]], np.uint8)
    rec = np.array([[[1.0, 0.0]]], np.float32)
    assert criteria(img, rec)[0, criterion_index("entropy")] == 1.0
    # 256 residuals, one per bin (left edges), fill the histogram: 8 bits
    left = (np.arange(ENTROPY_BINS) / 128.0 - 1.0).astype(np.float32).reshape(1, 1, -1)
    img = np.where(left >= 0, left, 0).astype(np.float32)
    rec = np.where(left < 0, -left, 0).astype(np.float32)
    assert criteria(img, rec)[0, criterion_index("entropy")] == 8.0


def _weights():
    """The smoothing weights from their definition: exp(-k^2 / 2 sigma^2), summing to 1."""
    k = np.arange(-SMOOTH_RADIUS, SMOOTH_RADIUS + 1)
    w = np.exp(-(k**2) / (2 * SMOOTH_SIGMA**2))
    return dict(zip(k.tolist(), w / w.sum()))


def test_smoothing_by_hand():
    assert SMOOTH_SIGMA == 1.0 and SMOOTH_RADIUS == 3
    w = _weights()
    # a unit spike in the middle of a 9x9 zero residual: the filter's peak is
    # w0^2, and the corners, 4 pixels away (beyond the radius), stay 0
    img = np.zeros((1, 9, 9), np.float32)
    img[0, 4, 4] = 1.0
    got = dict(zip(CRITERIA, criteria(img, np.zeros_like(img))[0]))
    assert got["smooth_max"] == pytest.approx(w[0] * w[0], rel=1e-15)
    assert got["smooth_min"] == 0.0
    assert got["smooth_range"] == got["smooth_max"]
    # the same spike in a corner: the 'reflect' border (a | a b c) folds the
    # tap at -1 back onto the spike, in both directions
    img = np.zeros((1, 9, 9), np.float32)
    img[0, 0, 0] = 1.0
    got = dict(zip(CRITERIA, criteria(img, np.zeros_like(img))[0]))
    assert got["smooth_max"] == pytest.approx((w[0] + w[1]) ** 2, rel=1e-15)
    # a negative spike: the minimum goes down by as much
    got = dict(zip(CRITERIA, criteria(np.zeros_like(img), img)[0]))
    assert got["smooth_min"] == pytest.approx(-((w[0] + w[1]) ** 2), rel=1e-15)
    assert got["smooth_max"] == 0.0


def test_a_blob_raises_smooth_range_more_than_salt_noise_of_the_same_peak():
    """Why the smooth_* criteria exist: on a textured part, single-pixel
    noise dominates the raw extremes, while a defect of a few pixels
    dominates the smoothed ones."""
    rng = _rng(21)
    texture = rng.normal(0.0, 0.02, (64, 64))
    peak = 0.4
    salt = texture.copy()
    spots = rng.choice(64 * 64, size=40, replace=False)
    salt.flat[spots] = peak * rng.choice([-1.0, 1.0], size=40)  # bright and dark specks
    blob = texture.copy()
    blob[30:33, 20:23] = peak  # a 3x3 defect of the same amplitude
    rec = np.full((2, 64, 64), 0.5, np.float32)
    img = (0.5 + np.stack([salt, blob])).astype(np.float32)
    got = criteria(img, rec)
    rng_col, smooth_col = criterion_index("range"), criterion_index("smooth_range")
    assert got[0, rng_col] > got[1, rng_col]  # raw: the speckled good part looks worse
    assert got[1, smooth_col] > 1.5 * got[0, smooth_col]  # smoothed: the defect stands out
    np.testing.assert_allclose(got, naive.criteria(img, rec), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["recon", "image"])
def test_non_finite_input_raises_naming_the_image(bad, where):
    rng = _rng(7)
    img = rng.random((3, 8, 8), dtype=np.float32)
    rec = rng.random((3, 8, 8), dtype=np.float32)
    (rec if where == "recon" else img)[1, 4, 5] = bad
    with pytest.raises(InputError, match=r"image\(s\) 1 \(of 3\).*NaN or infinity"):
        criteria(img, rec)


def test_non_finite_input_propagates_to_its_row_only():
    rng = _rng(8)
    img = rng.integers(0, 256, (4, 9, 10), dtype=np.uint8)
    rec = rng.random((4, 9, 10), dtype=np.float32)
    rec[2, 0, 0] = np.nan
    got = criteria(img, rec, on_nan="propagate")
    want = naive.criteria(img, rec)
    assert np.isnan(got[2]).all() and np.isnan(want[2]).all()
    keep = [0, 1, 3]
    np.testing.assert_allclose(got[keep], want[keep], rtol=RTOL, atol=ATOL)
    _, amap = criteria(img, rec, on_nan="propagate", return_map=True)
    assert np.isnan(amap[2, 0, 0]) and np.isfinite(np.delete(amap[2].ravel(), 0)).all()


@pytest.mark.parametrize("case", ["random_u8", "random_f32", "extreme_mixed", "single_pixel"])
def test_map_is_abs_residual(case):
    img, rec = CASES[case]
    scores, amap = criteria(img, rec, return_map=True)
    want = np.abs(np.stack([naive.residual(i, r) for i, r in zip(img, rec)]))
    assert amap.dtype == np.float32 and amap.shape == img.shape
    # float32 of |r|; uint8 scaling may differ from k / 255 in the last float64 bit
    np.testing.assert_allclose(amap, want.astype(np.float32), rtol=1e-7, atol=0)
    np.testing.assert_array_equal(scores, criteria(img, rec))


def test_map_smoothing_is_a_gaussian_blur_of_the_map():
    img, rec = CASES["random_u8_chunks"]
    _, raw = criteria(img, rec, return_map=True)
    scores, smooth = criteria(img, rec, return_map=True, sigma=2.0)
    for k in range(len(img)):
        want = cv2.GaussianBlur(raw[k], (0, 0), sigmaX=2.0, sigmaY=2.0, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_array_equal(smooth[k], want)
    assert smooth.std() < 0.5 * raw.std()  # it really smoothed
    np.testing.assert_array_equal(scores, criteria(img, rec))


def test_single_image_pair():
    img, rec = CASES["random_u8"]
    vec, amap = criteria(img[1], rec[1], return_map=True)
    assert vec.shape == (len(CRITERIA),) and amap.shape == img[1].shape
    np.testing.assert_array_equal(vec, criteria(img, rec)[1])


def test_batch_rows_equal_single_images_and_layout_does_not_matter():
    rng = _rng(11)
    img = rng.integers(0, 256, (5, 40, 30), dtype=np.uint8)
    rec = rng.random((5, 40, 30), dtype=np.float32)
    batch = criteria(img, rec)
    for k in range(5):
        np.testing.assert_array_equal(batch[k], criteria(img[k], rec[k]))
    # a transposed, strided view is read as the array it shows
    img_t = np.ascontiguousarray(img.transpose(0, 2, 1)).transpose(0, 2, 1)
    rec_s = np.zeros((5, 40, 60), np.float32)[:, :, ::2]
    rec_s[...] = rec
    np.testing.assert_array_equal(criteria(img_t, rec_s), batch)


def test_scores_do_not_depend_on_memory_placement():
    """Bit for bit: the same residual at 16 byte offsets, in one batch (so on
    both threads) and one at a time. Vectorised sums guarded by run-time
    overlap checks once made the last bits depend on where data lay."""
    rng = _rng(12)
    img = rng.integers(0, 256, (37, 41), dtype=np.uint8)
    rec = rng.random((37, 41), dtype=np.float32)
    size = img.size
    raw_i = np.empty(16 * (size + 16), np.uint8)
    raw_r = np.empty(16 * (size + 16), np.float32)
    imgs, recs = [], []
    for off in range(16):
        start = off * (size + 16) + off
        imgs.append(raw_i[start : start + size].reshape(img.shape))
        recs.append(raw_r[start : start + size].reshape(img.shape))
        imgs[-1][...] = img
        recs[-1][...] = rec
    ref = criteria(img, rec)
    for i, r in zip(imgs, recs):
        np.testing.assert_array_equal(criteria(i, r), ref)
        np.testing.assert_array_equal(criteria(i, r, return_map=True)[0], ref)
    np.testing.assert_array_equal(criteria(np.stack(imgs), np.stack(recs)), np.tile(ref, (16, 1)))


def test_registry():
    assert CRITERIA == ("mean", "std", "variance", "kurtosis", "skewness", "range",
                        "min", "max", "cumsum", "mse", "entropy",
                        "smooth_min", "smooth_max", "smooth_range")
    assert tuple(DEFINITIONS) == CRITERIA
    assert tuple(naive.TWINS) == CRITERIA
    assert [criterion_index(n) for n in CRITERIA] == list(range(len(CRITERIA)))
    with pytest.raises(ConfigError, match="Unknown criterion 'rnage'.*range"):
        criterion_index("rnage")
    img, rec = CASES["random_u8"]
    assert criteria(img, rec).shape == (len(img), len(CRITERIA))


@pytest.mark.parametrize(
    "images, recons, message",
    [
        (np.zeros((1, 4, 4), np.float64), np.zeros((1, 4, 4), np.float32),
         r"images must be uint8 \(0\.\.255\) or float32 in \[0, 1\], found float64"),
        (np.zeros((1, 4, 4), np.uint16), np.zeros((1, 4, 4), np.float32), r"found uint16"),
        (np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4), np.float64),
         r"recons must be float32 on the \[0, 1\] scale, found float64"),
        (np.zeros((1, 4, 4, 1), np.uint8), np.zeros((1, 4, 4, 1), np.float32),
         r"images must be \(N, H, W\) or \(H, W\).*found ndim 4 with shape \(1, 4, 4, 1\)"),
        (np.zeros(4, np.uint8), np.zeros(4, np.float32), r"found ndim 1"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 5), np.float32),
         r"recons must have the shape of images \(2, 4, 4\), found \(2, 4, 5\)"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros((4, 4), np.float32), r"found \(4, 4\)"),
        (np.zeros((1, 0, 4), np.uint8), np.zeros((1, 0, 4), np.float32), r"at least one pixel"),
    ],
)
def test_wrapper_rejects_bad_input(images, recons, message):
    with pytest.raises(InputError, match=message):
        criteria(images, recons)


def test_wrapper_rejects_bad_options():
    img, rec = CASES["zeros"]
    with pytest.raises(ConfigError, match="on_nan must be one of"):
        criteria(img, rec, on_nan="ignore")
    with pytest.raises(ConfigError, match="sigma must be >= 0"):
        criteria(img, rec, return_map=True, sigma=-1.0)


def test_twins_are_what_they_claim():
    """Guard the guards: the twins on a residual small enough to do by hand."""
    r = np.array([-0.5, 0.0, 0.25, 0.25])
    assert naive.mean(r) == 0.0 and naive.cumsum(r) == 0.0
    assert naive.variance(r) == pytest.approx((0.25 + 0 + 0.0625 * 2) / 4)
    assert naive.range_(r) == 0.75 and naive.min_(r) == -0.5 and naive.max_(r) == 0.25
    assert naive.entropy(r) == pytest.approx(1.5)  # bins: 1/4, 1/4, 2/4
    assert naive.kurtosis(np.full(5, 0.3)) == 0.0 and naive.skewness(np.full(5, 0.3)) == 0.0
    # the smoothing twin: a spike spreads into the outer product of the weights
    w = np.array(list(_weights().values()))
    spike = np.zeros((9, 9))
    spike[4, 4] = 1.0
    np.testing.assert_allclose(naive.smoothed(spike)[1:8, 1:8], np.outer(w, w), rtol=1e-15, atol=0)
    centre = w[SMOOTH_RADIUS]
    assert naive.smoothed(spike)[0].max() == 0.0 and naive.smooth_range(spike) == pytest.approx(centre**2)
    # 'reflect' on a line shorter than the radius: [a, b] extends as
    # ... a b b a | a b | b a a b ..., so at pixel 0 of [1, 0] the filter adds
    # the weights of every tap that folds back onto pixel 0
    line = np.array([[1.0, 0.0]])
    folded = {0: 0.0, 1: 0.0}
    for k, wk in _weights().items():
        i = k
        while i < 0 or i >= 2:
            i = -i - 1 if i < 0 else 3 - i
        folded[i] += wk
    assert naive.smoothed(line)[0, 0] == pytest.approx(folded[0], rel=1e-15)
