"""Seconds per training epoch, per model and image size, on real casting images.

Times a number of training steps after a warm-up and scales to an epoch of
``--images`` images (2,500 by default, the paper's training set size). Each
configuration runs in the same process, one after another, so the figures
are comparable within one run.

    python benchmarks/bench_epoch.py --data ../shared/data/casting/train/ok --sizes 300 128
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/casting/train/ok")
    parser.add_argument("--models", nargs="+", default=["conv-ae", "vae", "dilated-vae"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[300, 128])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (paper 64 at 300, fast 32 otherwise)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--images", type=int, default=2500)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from export.data import list_files, load_batch
    from export.models import build_model
    from export.train import _make_optimizer, devices

    files = list_files(args.data)
    print(f"devices: {', '.join(devices())}; TF intra-op threads: {tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}")
    print(f"| model | size | batch | s/step | s/epoch ({args.images} images) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        batch = args.batch_size or (64 if size == 300 else 32)
        x = load_batch(files[:batch], (size, size))
        for kind in args.models:
            keras.utils.set_random_seed(0)
            model = build_model(kind, (size, size))
            model.compile(optimizer=_make_optimizer("adamax", 1e-3))  # each model's train_step has its loss
            fit_args = (x,)
            model.fit(*fit_args, batch_size=batch, epochs=1, verbose=0)  # warm-up, builds the graph
            start = time.perf_counter()
            model.fit(*fit_args, batch_size=batch, epochs=args.steps, verbose=0)
            per_step = (time.perf_counter() - start) / args.steps
            epoch = per_step * -(-args.images // batch)
            print(f"| {kind} | {size} | {batch} | {per_step:.2f} | {epoch:.0f} |", flush=True)


if __name__ == "__main__":
    main()
