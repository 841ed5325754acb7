"""Seconds per training epoch, per model and preset, on real casting images.

Times a number of training steps after a warm-up and scales to an epoch of
``--images`` images (2,500 by default, the paper's training set size). Each
configuration takes its preset's size, batch and maths (``cpu``: bfloat16
where the CPU has it). All run in the same process, one after another and
``--rounds`` times in turn, so the figures are comparable within one run;
the table gives each configuration's median over the rounds. ``--xla both``
times each configuration also compiled by XLA (``jit_compile=True``).

    python benchmarks/bench_epoch.py --presets paper cpu fast
    python benchmarks/bench_epoch.py --models conv-ae --presets fast cpu --xla both
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/casting/train/ok")
    parser.add_argument("--models", nargs="+", default=["conv-ae", "vae", "dilated-vae"])
    parser.add_argument("--presets", nargs="+", default=["paper", "cpu"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--images", type=int, default=2500)
    parser.add_argument("--xla", choices=["off", "on", "both"], default="off",
                        help="compile the training step with XLA (jit_compile): off, on, or each configuration both ways")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from export.data import list_files, load_batch
    from export.models import build_model
    from export.train import PRESETS, _make_optimizer, devices, resolve_compute

    files = list_files(args.data)
    on_gpu = devices() != ["CPU"]
    print(f"devices: {', '.join(devices())}; TF intra-op threads: {tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}")
    configs = []
    for name in args.presets:
        preset = PRESETS[name]
        compute = resolve_compute(preset.compute, on_gpu)
        x = load_batch(files[: preset.batch_size], (preset.size, preset.size))
        xla = {"off": [False], "on": [True], "both": [False, True]}[args.xla]
        configs += [(kind, name, preset, compute, jit, x) for kind in args.models for jit in xla]
    seconds = {i: [] for i in range(len(configs))}
    for _ in range(args.rounds):
        for i, (kind, name, preset, compute, jit, x) in enumerate(configs):
            keras.config.set_dtype_policy("mixed_bfloat16" if compute == "bfloat16" else "float32")
            keras.utils.set_random_seed(0)
            model = build_model(kind, (preset.size, preset.size))
            # each model's train_step has its loss
            model.compile(optimizer=_make_optimizer(preset.optimizer, preset.lr), jit_compile=jit)
            model.fit(x, batch_size=preset.batch_size, epochs=1, verbose=0)  # warm-up, builds the graph
            start = time.perf_counter()
            model.fit(x, batch_size=preset.batch_size, epochs=args.steps, verbose=0)
            seconds[i].append((time.perf_counter() - start) / args.steps)
            keras.config.set_dtype_policy("float32")
    print(f"| model | preset | size | batch | maths | s/step | s/epoch ({args.images} images) |")
    print("|---|---|---|---|---|---|---|")
    for i, (kind, name, preset, compute, jit, _) in enumerate(configs):
        per_step = statistics.median(seconds[i])
        epoch = per_step * -(-args.images // preset.batch_size)
        maths = f"{compute}, XLA" if jit else compute
        print(f"| {kind} | {name} | {preset.size} | {preset.batch_size} | {maths} | {per_step:.2f} | {epoch:.0f} |", flush=True)


if __name__ == "__main__":
    main()
