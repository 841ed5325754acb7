"""Benchmark: preprocessing of decoded images, the compiled pass against OpenCV's calls, side by side.

On the same decoded images (uint8, as the files give them), one after
another on one thread, rounds taking turns:

- ``opencv``: what :func:`edge_inspect.preprocess.preprocess` did before the
  compiled pass: ``to_unit_gray`` (float32, then ``cvtColor``), then
  ``cv2.resize`` with ``INTER_AREA``; and the colour test on NumPy planes;
- ``compiled``: :func:`~edge_inspect.preprocess.preprocess` and
  :func:`~edge_inspect.preprocess.input_note` as they are now.

Prints ms an image (median over rounds), the ratio, and the largest
difference between the two inputs the model would get.

    python benchmarks/bench_preprocess.py --data runs/casting-grouped/eval_ok --images 256 --size 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a folder of image files (read recursively)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="the model's input size (square)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import cv2
    import numpy as np

    from edge_inspect import preprocess as pre
    from edge_inspect.sources.files import iter_image_files

    cv2.setNumThreads(1)
    size = (args.size, args.size)
    images = [pre.read_image(path) for path in iter_image_files([args.data])[: args.images]]

    def opencv(image):
        gray = pre.to_unit_gray(image)
        resized = cv2.resize(gray, size[::-1], interpolation=cv2.INTER_AREA) if gray.shape != size else gray
        if image.ndim == 3:
            step_y, step_x = max(1, image.shape[0] // 128), max(1, image.shape[1] // 128)
            b, g, r = (image[::step_y, ::step_x, c].astype(np.float32) for c in range(3))
            np.nanmax(np.fmax(np.fmax(b, g), r) - np.fmin(np.fmin(b, g), r))
        return resized

    def compiled(image):
        pre.input_note(image, size)
        return pre.preprocess(image, size)

    pipelines = {"opencv": opencv, "compiled": compiled}
    for run in pipelines.values():
        run(images[0])  # compiles, or loads from the cache
    seconds = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, run in pipelines.items():
            start = time.perf_counter()
            for image in images:
                run(image)
            seconds[name].append((time.perf_counter() - start) / len(images))
    worst = max(float(np.abs(opencv(image) - compiled(image)).max()) for image in images)
    shape = images[0].shape
    print(f"{len(images)} images from {args.data} ({shape[1]}x{shape[0]}, {shape[2] if len(shape) == 3 else 1} "
          f"channel(s), uint8) to {args.size}x{args.size}, {args.rounds} rounds, one thread\n")
    print("| preprocessing | ms an image | x faster than opencv |")
    print("|---|---|---|")
    for name in pipelines:
        ratio = statistics.median(o / c for o, c in zip(seconds["opencv"], seconds[name]))
        print(f"| {name} | {statistics.median(seconds[name]) * 1e3:.3f} | {ratio:.2f} |")
    print(f"\nlargest difference between the two inputs: {worst:.2e} (on the [0, 1] scale)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
