"""Sweep the linear-ae's size, component count and augmentation on a casting split.

    python benchmarks/linear_sweep.py --split runs/casting-grouped --size 256 --components 1024 --augment d4

Fits a PCA exactly as ``edge-inspect train`` does for the linear-ae (the
same preprocessing, the same training/validation images: those of
``SPLIT/linear-ae/split.json``, the same randomized SVD) and scores the
validation images and ``SPLIT/eval_ok`` + ``SPLIT/eval_def`` with the fused
kernel, without writing a run folder. Prints AUC-ROC, AUC-PR, and F1 and
the false-alarm rate at the label-free threshold (``edge_inspect.calibrate``
on the validation normals, its defaults: the 95th percentile) for the
leading criteria, and the balanced-view AUC
(the first ``len(eval_ok)`` defective images). ``--augment rotN`` fits N
evenly spaced rotations of each image and of its mirror image instead of
the quarter turns. Decoded images are cached in ``SPLIT/.cache``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_inspect.calibrate import calibrate, is_anomalous, oriented  # noqa: E402
from edge_inspect.errors import ConfigError  # noqa: E402
from edge_inspect.kernels import CRITERIA, criteria  # noqa: E402
from export.data import load_batch  # noqa: E402
from export.models.linear_ae import augment_d4  # noqa: E402

SHOWN = ("range", "min", "smooth_range", "smooth_min", "kurtosis")


def images(split: Path, name: str, paths: list[Path], size: int) -> np.ndarray:
    cache = split / ".cache" / f"{name}-{size}.npy"
    if cache.exists():
        return np.load(cache)
    cache.parent.mkdir(exist_ok=True)
    array = load_batch(paths, (size, size))[..., 0]
    np.save(cache, array)
    return array


def rotations(x: np.ndarray, n: int) -> np.ndarray:
    size = x.shape[1]
    views = []
    for mirrored in (x, x[:, :, ::-1]):
        for j in range(n):
            turn = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), 360.0 * j / n, 1.0)
            views.append(np.stack([cv2.warpAffine(np.ascontiguousarray(a), turn, (size, size), flags=cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_REFLECT) for a in mirrored]))
    return np.concatenate(views)


def principal_components(images: np.ndarray, components: int, *, seed: int = 0,
                         overwrite: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and leading principal axes of ``(n, H, W)`` images.

    Randomized SVD (scikit-learn's, four power iterations) when far fewer
    components than images and pixels are asked for, otherwise a full SVD;
    both give the same subspace to well within what the criteria can tell
    apart (``tests/export/test_models.py`` compares them).

    With ``overwrite``, float32 ``images`` are centred in place instead of
    copied (the augmented views of a large fit are gigabytes).

    Returns:
        ``(mean (P,), axes (K, P), explained)``: float32 mean and orthonormal
        axes, and the share of the variance the axes explain.

    Raises:
        ConfigError: more components than images or pixels.
    """
    n = images.shape[0]
    x = images.reshape(n, -1).astype(np.float32, copy=not overwrite)
    if components > min(x.shape):
        raise ConfigError(
            f"components ({components}) must not exceed the number of training images ({n}, after "
            f"augmentation) nor the pixel count ({x.shape[1]}). Choose --components {min(x.shape)} or fewer."
        )
    mean = x.mean(axis=0)
    x -= mean
    total = float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    if components < min(x.shape) // 2:
        from sklearn.utils.extmath import randomized_svd

        _, s, axes = randomized_svd(x, components, n_iter=4, random_state=seed)
    else:
        _, s, axes = np.linalg.svd(x, full_matrices=False)
        s, axes = s[:components], axes[:components]
    explained = float(np.sum(s.astype(np.float64) ** 2) / total) if total > 0 else 1.0
    return mean, np.ascontiguousarray(axes, dtype=np.float32), explained


def main() -> None:
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", type=Path, default=Path("runs/casting-grouped"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--components", type=int, default=1024)
    parser.add_argument("--augment", default="d4", help="none, d4 or rotN")
    args = parser.parse_args()

    run = json.loads((args.split / "linear-ae" / "split.json").read_text())
    root = Path(run["root"])
    train = images(args.split, "train", [root / p for p in run["train"]], args.size)
    val = images(args.split, "val", [root / p for p in run["val"]], args.size)
    ok = images(args.split, "eval_ok", sorted((args.split / "eval_ok").iterdir()), args.size)
    bad = images(args.split, "eval_def", sorted((args.split / "eval_def").iterdir()), args.size)

    if args.augment == "d4":
        views = augment_d4(train)
    elif args.augment.startswith("rot"):
        views = rotations(train, int(args.augment[3:]))
    else:
        views = train.copy()
    start = time.perf_counter()
    mean, axes, explained = principal_components(views, args.components, overwrite=True)
    seconds = time.perf_counter() - start
    del views

    def scores(x):
        flat = x.reshape(len(x), -1) - mean
        recon = ((flat @ axes.T) @ axes + mean).reshape(x.shape).astype(np.float32)
        return criteria(x.astype(np.float32), recon)

    cal, evals = scores(val), np.r_[scores(ok), scores(bad)]
    labels = np.r_[np.zeros(len(ok)), np.ones(len(bad))]
    balanced = np.r_[np.arange(len(ok)), len(ok) + np.arange(min(len(ok), len(bad)))]
    print(f"{args.split.name}: {args.size} px, {args.components} components, augment {args.augment}; "
          f"{len(train)} training images, fit {seconds:.0f} s, {100 * explained:.1f}% of variance; "
          f"{len(val)} calibration, {len(ok)} + {len(bad)} evaluation images")
    calibration = calibrate(cal, CRITERIA)
    for name in SHOWN:
        j = CRITERIA.index(name)
        entry = calibration["criteria"][name]
        s = oriented(evals[:, j], entry)
        flagged = is_anomalous(evals[:, j], entry)
        print(f"  {name:13s} AUC-ROC {roc_auc_score(labels, s):.4f}  AUC-PR {average_precision_score(labels, s):.4f}  "
              f"F1 {f1_score(labels, flagged):.4f}  false alarms {flagged[labels == 0].mean():.3f}  "
              f"balanced AUC-ROC {roc_auc_score(labels[balanced], s[balanced]):.4f}")


if __name__ == "__main__":
    main()
