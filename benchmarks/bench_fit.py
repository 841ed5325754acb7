"""Benchmark: the linear-ae's fit, peak memory and wall time against the number of images.

Runs ``edge-inspect train`` (the default model: fit, then calibration) in a
fresh process per measurement and reads its peak RSS from the kernel
(``wait4``). Each count takes the first N images of ``--data`` in the order
of a hash of their names; ``--shifted N`` adds copies of those images moved
by one to three pixels (written as PNG into a scratch folder) until there
are N, to measure a set larger than the data.

With ``--old REV``, every count is also fitted by the code at git revision
REV (checked out into a scratch worktree, run with the same interpreter),
the two in turn, so that load from other processes falls on both alike.
The old fit holds every augmented view in memory: counts whose estimate
(``8 * N * H * W * 4`` bytes, twice) exceeds ``--old-max-gb`` are not run.

    python benchmarks/bench_fit.py --data ../shared/data/casting/train/ok --counts 700 1400 2811 \\
        --shifted 11000 --old 6d8d8de
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_inspect.preprocess import is_image_name  # noqa: E402


def ordered_images(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name)]
    return sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())


def lay_out(images: list[Path], count: int, out: Path) -> Path:
    """``count`` images in ``out``: symbolic links to the originals, then shifted copies."""
    import cv2
    import numpy as np

    out.mkdir(parents=True)
    for p in images[:count]:
        (out / p.name).symlink_to(p.resolve())
    rng = np.random.default_rng(0)
    k = 0
    while len(images) + k < count:
        source = images[k % len(images)]
        image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
        dy, dx = rng.integers(1, 4, size=2) * rng.choice([-1, 1], size=2)
        shifted = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
        cv2.imwrite(str(out / f"shift{k:05d}-{source.stem}.png"), shifted)
        k += 1
    return out


def fit(code: Path, normal: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """Run ``edge-inspect train`` from ``code``; (wall seconds, peak RSS GB)."""
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "edge_inspect", "train", "--normal", str(normal), "--out", str(out),
                             *extra], cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train failed in {code}:\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="folder of normal images")
    parser.add_argument("--counts", type=int, nargs="+", default=[700, 1400, 2811])
    parser.add_argument("--shifted", type=int, nargs="*", default=[], help="counts beyond the data, with shifted copies")
    parser.add_argument("--old", help="git revision to compare against")
    parser.add_argument("--old-max-gb", type=float, default=16.0)
    parser.add_argument("--scratch", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("train_args", nargs="*", help="extra arguments for edge-inspect train (after --)")
    args = parser.parse_args()

    images = ordered_images(args.data)
    scratch = Path(tempfile.mkdtemp(prefix="bench-fit-", dir=args.scratch))
    old = None
    if args.old:
        old = scratch / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old],
                       check=True, capture_output=True)
    rows = []
    try:
        for count in [*args.counts, *args.shifted]:
            folder = lay_out(images, count, scratch / f"images-{count}")
            print(f"{count} images ...", file=sys.stderr, flush=True)
            new = fit(ROOT, folder, scratch / f"new-{count}", args.train_args)
            before = None
            if old is not None and 2 * 8 * count * 256 * 256 * 4 / 1e9 <= args.old_max_gb:
                before = fit(old, folder, scratch / f"old-{count}", args.train_args)
            rows.append((count, count > len(images), new, before))
            shutil.rmtree(folder)
    finally:
        if old is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"| images | fit + calibration, wall s | peak RSS GB |{' old wall s | old peak RSS GB | wall, new / old |' if old else ''}")
    print(f"|---|---|---|{'---|---|---|' if old else ''}")
    for count, shifted, (seconds, gb), before in rows:
        label = f"{count:,}" + (" (with shifted copies)" if shifted else "")
        line = f"| {label} | {seconds:.0f} | {gb:.2f} |"
        if old:
            line += (f" {before[0]:.0f} | {before[1]:.2f} | {seconds / before[0]:.2f} |" if before
                     else " not run (over --old-max-gb) | | |")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
