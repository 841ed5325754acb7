"""How much of a model's ``mean`` criterion is the part's brightness.

The ``mean`` criterion is the mean of the residual, ``mean(x) - mean(reconstruction)``.
This prints, on labelled folders: the AUC-ROC of the image's own mean
brightness (no model), and for each run the correlation between the
brightness of the input and of its reconstruction, on normal and on
defective parts, and the AUC-ROC of the signed residual mean. A
reconstruction that follows the brightness of defective parts as well as
that of normal ones leaves the ``mean`` criterion nothing to see.

    python benchmarks/brightness.py --normal runs/casting-grouped/eval_ok \\
        --anomalous runs/casting-grouped/eval_def runs/casting-grouped/vae runs/casting-grouped/dilated-vae
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders of deep models (model.keras)")
    parser.add_argument("--normal", required=True)
    parser.add_argument("--anomalous", required=True)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    from export.data import list_files, load_batch

    size = (args.size, args.size)
    normal = load_batch(list_files(args.normal), size)
    anomalous = load_batch(list_files(args.anomalous), size)
    x = np.concatenate([normal, anomalous])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    brightness = x.mean(axis=(1, 2, 3))
    centre = np.median(brightness[labels == 0])
    print(f"{len(normal)} normal, {len(anomalous)} defective images at {args.size} px")
    print(f"mean brightness: normal {brightness[labels == 0].mean():.4f}, defective {brightness[labels == 1].mean():.4f}")
    print(f"AUC-ROC of the image's brightness alone: darker is abnormal {auc(labels, -brightness):.4f}, "
          f"two-sided (distance from the normals' median) {auc(labels, abs(brightness - centre)):.4f}")
    if not args.runs:
        return
    import keras

    import export.models  # noqa: F401  (registers the models' classes for loading)

    print("| run | corr(input, reconstruction brightness), normal | the same, defective | residual mean, normal | "
          "residual mean, defective | AUC-ROC, darker residual is abnormal |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        model = keras.models.load_model(os.path.join(run, "model.keras"))
        reconstruction = model.predict(x, batch_size=64, verbose=0).mean(axis=(1, 2, 3))
        residual = brightness - reconstruction
        corr = [np.corrcoef(brightness[labels == k], reconstruction[labels == k])[0, 1] for k in (0, 1)]
        print(f"| {run} | {corr[0]:.3f} | {corr[1]:.3f} | {residual[labels == 0].mean():+.4f} | "
              f"{residual[labels == 1].mean():+.4f} | {auc(labels, -residual):.4f} |", flush=True)


if __name__ == "__main__":
    main()
