"""Benchmark of the fused criteria kernel (a script, not a test).

Times, in one run and on the same seeded batch of 300x300 residuals (uint8
images, float32 reconstructions):

- kernel: ``edge_inspect.kernels.criteria`` (after a warm-up call for the
  JIT), without and with the anomaly map, on numba's threads (one image per
  thread), and again on one thread;
- smooth_* part: the kernel's third pass alone (``_smooth_extremes``, the
  Gaussian-smoothed extremes), in a parallel loop like the kernel's, so
  that its share of the kernel time is measured in the same run;
- reference: the plain NumPy/SciPy twins of ``tests/runtime/naive.py``, all
  criteria, image by image (``naive.NUMPY_TWINS``: with NumPy's sums
  for mean and cumsum, not the exact but slow ``math.fsum`` the tests use);
- the paper's eleven alone, the set the targets were first set for: the
  kernel less its smooth_* pass (both timed above) against the reference
  without the smoothed twins;
- floor: one NumPy pass over the same input bytes,
  ``np.subtract(images, recons, out=buf)``: reads the uint8 image and the
  float32 reconstruction (5 bytes a pixel) and writes the float32 residual
  (4 bytes), single-threaded. No criteria kernel can read its input faster
  than the memory it has to read; this is the honest one-pass cost of that.

Each figure is the best of ``--repeats`` timed calls over the whole batch,
divided by the batch size; kernel, map and floor take turns in each round,
so that load from other processes falls on them alike. The machine may be
shared: compare the ratios rather than the absolute times.

    python benchmarks/bench_kernels.py --batch 32 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from edge_inspect.kernels import _SMOOTH_WEIGHTS, CRITERIA, _smooth_extremes, criteria  # noqa: E402
from tests.runtime import naive  # noqa: E402


@numba.njit(parallel=True)
def smooth_part(images, recons, scale, height, width, weights, out):
    """The smooth_* pass of the kernel alone, one image per thread, on rows
    ``out`` that already hold the other criteria (as in the kernel)."""
    for i in numba.prange(images.shape[0]):
        _smooth_extremes(images[i], recons[i], scale, height, width, weights, out[i])


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function over ``repeats`` rounds, in seconds.

    The functions take turns within each round, so that load from other
    processes falls on all of them alike and their ratios stay meaningful.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def make_batch(n: int, size: int, residual: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded uint8 images and float32 reconstructions, ``(n, size, size)``.

    ``uniform``: independent uniform images and reconstructions (residuals
    spread over [-1, 1]). ``small``: reconstructions within a few grey levels
    of the image, as from a trained model (residuals crowd a few bins).
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    if residual == "uniform":
        recons = rng.random((n, size, size), dtype=np.float32)
    else:
        recons = np.clip(images / 255.0 + rng.normal(0.0, 0.02, images.shape), 0, 1).astype(np.float32)
    return images, recons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--size", type=int, default=300, help="image side in pixels (default 300)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of the kernel and floor (default 10)")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed calls of the slow reference (default 2)")
    parser.add_argument("--residual", choices=("uniform", "small"), default="uniform", help="residual kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images, recons = make_batch(args.batch, args.size, args.residual, args.seed)
    n = len(images)
    buf = np.empty(images.shape, dtype=np.float32)

    start = time.perf_counter()
    got = criteria(images, recons)  # warm-up: JIT compile or cache load
    warmup = time.perf_counter() - start
    criteria(images, recons, return_map=True)

    threads = numba.get_num_threads()
    flat_images = images.reshape(n, -1)
    flat_recons = recons.reshape(n, -1)
    smooth_out = got.copy()
    smooth = lambda: smooth_part(  # noqa: E731
        flat_images, flat_recons, 1.0 / 255.0, args.size, args.size, _SMOOTH_WEIGHTS, smooth_out
    )
    smooth()  # JIT compile

    def one_thread():
        numba.set_num_threads(1)
        try:
            criteria(images, recons)
        finally:
            numba.set_num_threads(threads)

    fast = best_times(
        {
            "kernel": lambda: criteria(images, recons),
            "map": lambda: criteria(images, recons, return_map=True),
            "kernel1": one_thread,
            "smooth": smooth,
            "floor": lambda: np.subtract(images, recons, out=buf),
        },
        args.repeats,
    )
    t_kernel, t_map, t_one, t_smooth, t_floor = (
        fast[k] / n for k in ("kernel", "map", "kernel1", "smooth", "floor")
    )
    same = np.array_equal(smooth_out, got, equal_nan=True)
    reference = lambda: naive.criteria(images, recons, twins=naive.NUMPY_TWINS)  # noqa: E731
    paper = tuple(c for c in CRITERIA if not c.startswith("smooth_"))
    reference11 = lambda: naive.criteria(images, recons, names=paper, twins=naive.NUMPY_TWINS)  # noqa: E731
    refs = best_times({"ref": reference, "ref11": reference11}, args.ref_repeats)
    t_ref, t_ref11 = refs["ref"] / n, refs["ref11"] / n
    t_kernel11 = max(t_kernel - t_smooth, 1e-12)  # the kernel less its third pass, timed alone above

    want = naive.criteria(images, recons)
    worst = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12))

    pixels = args.size * args.size
    print(f"criteria kernels: {n} images of {args.size}x{args.size}, uint8 image + float32 recon, "
          f"'{args.residual}' residuals, seed {args.seed}")
    print(f"numba {numba.__version__}, numpy {np.__version__}, threads {threads} "
          f"(layer {numba.threading_layer()}), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"warm-up call (JIT compile or cache load): {warmup:.2f} s")
    print(f"{'':28s}{'ms/image':>10s}{'ns/pixel':>10s}")
    for label, t in [
        (f"kernel, {threads} threads", t_kernel),
        (f"kernel + map, {threads} thr.", t_map),
        ("kernel, 1 thread", t_one),
        (f"smooth_* pass, {threads} thr.", t_smooth),
        ("reference (twins)", t_ref),
        ("floor (np.subtract)", t_floor),
    ]:
        print(f"{label:28s}{t * 1e3:10.4f}{t / pixels * 1e9:10.3f}")
    print(f"reference / kernel: {t_ref / t_kernel:8.1f}x   (target >= 30x)")
    print(f"kernel / floor:     {t_kernel / t_floor:8.2f}x   (target <= 3x)")
    print(f"kernel+map / floor: {t_map / t_floor:8.2f}x")
    print(f"kernel, 1 thread / floor: {t_one / t_floor:5.2f}x   (both single-threaded)")
    print(f"smooth_* pass / kernel: {t_smooth / t_kernel:7.2f}   (kernel with / without it: "
          f"{t_kernel / t_kernel11:.2f}x; same scores alone: {same})")
    print(f"the paper's {len(paper)} alone (kernel less the smooth_* pass; reference without their twins): "
          f"reference / kernel {t_ref11 / t_kernel11:.1f}x, kernel / floor {t_kernel11 / t_floor:.2f}x")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other processes; above the CPU count, expect the parallel kernel to suffer most)")
    print(f"kernel vs twins, worst relative difference over {len(CRITERIA)} criteria: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
