"""Benchmark: files to verdicts, the paper's pipeline against edge-inspect's, side by side.

Every pipeline reads the same JPEG (or other) files and ends with a verdict
per file:

- ``paper``: what the paper describes: OpenCV decode, resize to 300 x 300,
  a Keras conv AE (untrained: its cost does not depend on its weights),
  ``model.predict`` on the batch, then its eleven criteria in NumPy/SciPy
  image by image (the twins of ``tests/runtime/naive.py``) and a threshold;
- ``predict PRECISION``: ``edge-inspect predict``'s code path
  (:func:`edge_inspect.sources.files.inspect_files`) on ``--model``, once
  for each precision the model folder holds, at predict's default batch
  size, or at each of ``--batch`` (``fp32@32``: fp32 in batches of 32);
- ``decode + resize``: decoding and resizing alone, on as many threads as
  the CPU has: the floor any pipeline from files stands on.

Each pipeline runs in its own worker process (so that its peak memory is
its own); in every round each worker processes all the files in turn, so
that load from other processes falls on all alike. The table gives the
median images/s over ``--rounds`` rounds, and each ratio is the median of
the per-round ratios. A lone part: after the rounds, ``--lone`` files one at
a time, each after ``--idle`` seconds of idle, file to verdict: p50 and p95.

    python benchmarks/bench_e2e.py --model runs/models/linear-ae --data ../shared/data/casting/train/ok --images 256
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAPER_SIZE = 300
PAPER_CRITERIA = ("mean", "std", "variance", "kurtosis", "skewness", "range", "min", "max", "cumsum", "mse", "entropy")


def _paper(files: list[Path], batch: int):
    import cv2
    import numpy as np

    from export.models import build_model
    from tests.runtime import naive

    model = build_model("conv-ae", (PAPER_SIZE, PAPER_SIZE), seed=0)
    twins = {name: naive.NUMPY_TWINS[name] for name in PAPER_CRITERIA}  # NumPy's sums, not the exact fsum

    def decode(path):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        image = cv2.resize(image, (PAPER_SIZE, PAPER_SIZE), interpolation=cv2.INTER_AREA)
        return image.astype(np.float32) / 255.0

    def run(paths):
        verdicts = []
        for start in range(0, len(paths), batch):
            images = np.stack([decode(p) for p in paths[start : start + batch]])
            recons = model.predict(images[..., None], batch_size=len(images), verbose=0)[..., 0]
            scores = naive.criteria(images, recons.astype(np.float32), names=PAPER_CRITERIA, twins=twins)
            verdicts += list(scores[:, PAPER_CRITERIA.index("range")] > 0.5)
        return verdicts

    run(files[:batch])  # warm-up: graph tracing
    return run


def _predict(files: list[Path], batch: int, model: Path, precision: str):
    from edge_inspect.inspector import Inspector
    from edge_inspect.sources.files import inspect_files

    inspector = Inspector.load(model, precision=precision, device="cpu", batch_size=batch)

    def run(paths):
        return [result.verdict for result, _ in inspect_files(inspector, paths)]

    run(files[:batch])
    return run


def _floor(files: list[Path], batch: int, size: tuple[int, int]):
    from concurrent.futures import ThreadPoolExecutor

    from edge_inspect.preprocess import load

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

    def run(paths):
        return list(pool.map(lambda p: load(p, size), paths))

    run(files[:batch])
    return run


def _worker(conn, kind: str, files: list[Path], args: dict) -> None:
    """Build one pipeline, then time it on request: ``round`` (all files) or ``lone`` (one file)."""
    import logging

    logging.disable(logging.WARNING)
    if kind == "paper":
        run = _paper(files, args["batch"])
    elif kind == "floor":
        run = _floor(files, args["batch"], args["size"])
    else:
        precision, batch = args["predict"][kind]
        run = _predict(files, batch, args["model"], precision)
    conn.send("ready")
    while True:
        what = conn.recv()
        if what == "stop":
            conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            return
        paths = files if what == "round" else [files[what]]
        start = time.perf_counter()
        run(paths)
        conn.send(time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a model folder written by edge-inspect export")
    parser.add_argument("--data", required=True, type=Path, help="a folder of image files (read recursively)")
    parser.add_argument("--images", type=int, default=256, help="files per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="images per session run; several: each predict precision at each "
                             "(default: predict's own; the paper's pipeline takes the first)")
    parser.add_argument("--lone", type=int, default=20, help="files timed one at a time after an idle spell")
    parser.add_argument("--idle", type=float, default=0.5, help="seconds of idle before each lone file")
    parser.add_argument("--no-paper", action="store_true", help="leave the paper's pipeline out (no TensorFlow)")
    args = parser.parse_args()

    import numpy as np

    from edge_inspect.card import load_card
    from edge_inspect.sources.files import iter_image_files

    from edge_inspect.inspector import default_batch_size

    card = load_card(args.model)
    files = list(iter_image_files([args.data]))[: args.images]
    batches = args.batch or [default_batch_size(card.model_kind)]
    predict = ({p: (p, batches[0]) for p in card.precisions} if len(batches) == 1 else
               {f"{p}@{b}": (p, b) for p in card.precisions for b in batches})
    kinds = ([] if args.no_paper else ["paper"]) + list(predict) + ["floor"]
    names = {"paper": "paper (Keras conv AE 300 px + NumPy/SciPy)", "floor": "decode + resize"}
    shared = {"batch": batches[0], "model": args.model, "size": card.size, "predict": predict}
    ctx = mp.get_context("spawn")
    workers = {}
    for kind in kinds:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, kind, files, shared), daemon=True)
        proc.start()
        workers[kind] = (parent, proc)
        print(f"starting {kind} ...", file=sys.stderr, flush=True)
        if parent.recv() != "ready":
            raise SystemExit(f"{kind} did not start")
    seconds = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            workers[kind][0].send("round")
            seconds[kind].append(workers[kind][0].recv())
        print(f"round {r + 1}: " + ", ".join(f"{k} {len(files) / seconds[k][-1]:.1f}/s" for k in kinds),
              file=sys.stderr, flush=True)
    lone = {kind: [] for kind in kinds if kind != "floor"}
    for i in range(args.lone):
        for kind in lone:
            time.sleep(args.idle)
            workers[kind][0].send(i % len(files))
            lone[kind].append(workers[kind][0].recv() * 1e3)
    peaks = {}
    for kind, (conn, proc) in workers.items():
        conn.send("stop")
        peaks[kind] = conn.recv()
        proc.join()

    rate = {k: [len(files) / s for s in seconds[k]] for k in kinds}
    base = "paper" if "paper" in kinds else None

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(rate[a], rate[b]))

    print(f"\n{len(files)} files from {args.data}, {args.rounds} rounds, batch {' '.join(map(str, batches))}, {os.cpu_count()} CPUs; "
          f"model {args.model} ({card.model_kind}, {card.size[0]}x{card.size[1]})\n")
    print("| pipeline | images/s | x paper | / decode + resize | lone file p50 / p95 ms | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        p = lone.get(kind, [])
        lone_ms = f"{np.percentile(p, 50):.1f} / {np.percentile(p, 95):.1f}" if p else "-"
        print(f"| {names.get(kind, 'predict ' + kind)} | {statistics.median(rate[kind]):.1f} | "
              f"{ratio(kind, base):.1f}x | {1 / ratio(kind, 'floor') if kind != 'floor' else 1:.2f} | "
              f"{lone_ms} | {peaks[kind]:.0f} |" if base else
              f"| {names.get(kind, 'predict ' + kind)} | {statistics.median(rate[kind]):.1f} | - | "
              f"{1 / ratio(kind, 'floor') if kind != 'floor' else 1:.2f} | {lone_ms} | {peaks[kind]:.0f} |")
    print("\n'/ decode + resize': how many times slower than decoding and resizing alone (the floor).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
