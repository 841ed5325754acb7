"""Pictures of an evaluation: ROC and PR curves, score histograms, worst misses.

    >>> curves(labels, {"range": s1, "mse": s2}, "range", Path("eval"))
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(labels: np.ndarray, scores: dict[str, np.ndarray], highlight: str, out: Path) -> None:
    """``roc.png`` and ``pr.png``: one curve per criterion, the default in bold."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    prevalence = labels.mean()
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(6, 5))
        for name, s in scores.items():
            if kind == "roc":
                x, y, _ = roc_curve(labels, s)
                area = auc(x, y)
            else:
                y, x, _ = precision_recall_curve(labels, s)
                area = auc(x, y)
            bold = name == highlight
            ax.plot(x, y, lw=2.5 if bold else 1.0, alpha=1.0 if bold else 0.7, label=f"{name} ({area:.3f})", zorder=3 if bold else 2)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance")
            ax.set(xlabel="false-alarm rate (normal flagged)", ylabel="recall (defects caught)", title="ROC")
        else:
            ax.axhline(prevalence, color="k", ls=":", lw=0.8, label=f"chance ({prevalence:.3f})")
            ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=110)
        plt.close(fig)


def histograms(labels: np.ndarray, scores: dict[str, np.ndarray], thresholds: dict[str, float], path: Path) -> None:
    """Per-criterion histograms of normal and defective scores, threshold marked."""
    names = list(scores)
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        s = scores[name]
        bins = np.histogram_bin_edges(s[np.isfinite(s)], bins=40)
        ax.hist(s[labels == 0], bins=bins, alpha=0.6, label="normal", color="tab:green")
        ax.hist(s[labels == 1], bins=bins, alpha=0.6, label="defective", color="tab:red")
        ax.axvline(thresholds[name], color="k", ls="--", lw=1, label="threshold")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Scores per class (higher = more anomalous)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gallery(run, paths, labels, scores, threshold, criterion, path: Path, *, count: int = 6) -> None:
    """The highest-scoring normals and lowest-scoring defects, with heatmaps.

    Each column: the image, its reconstruction, and |input - reconstruction|
    over the image. Titles say whether the part was misjudged.
    """
    from edge_inspect.kernels import criteria
    from export.data import load_batch
    from export.scoring import reconstruct

    normal = np.flatnonzero(labels == 0)
    defect = np.flatnonzero(labels == 1)
    picks = [(i, "normal") for i in normal[np.argsort(-scores[normal])][:count]]
    picks += [(i, "defective") for i in defect[np.argsort(scores[defect])][:count]]
    if not picks:
        return
    images = load_batch([paths[i] for i, _ in picks], run.size)[..., 0]
    recons = reconstruct(run.model, images)
    _, maps = criteria(images, recons, return_map=True, sigma=1.0)
    fig, axes = plt.subplots(3, len(picks), figsize=(1.7 * len(picks), 5.6), squeeze=False)
    top = max(float(maps.max()), 1e-6)
    for col, ((i, label), image, recon, amap) in enumerate(zip(picks, images, recons, maps)):
        wrong = (scores[i] > threshold) != (label == "defective")
        verdict = ("false alarm" if label == "normal" else "missed") if wrong else "correct"
        axes[0, col].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(f"{label}: {verdict}\n{Path(paths[i]).name}", fontsize=6, color="red" if wrong else "black")
        axes[1, col].imshow(recon, cmap="gray", vmin=0, vmax=1)
        axes[2, col].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[2, col].imshow(amap, cmap="inferno", alpha=0.6, vmin=0, vmax=top)
        axes[2, col].set_title(f"{scores[i]:.4g}", fontsize=6)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, text in enumerate(("image", "reconstruction", "|residual|")):
        axes[row, 0].set_ylabel(text, fontsize=7)
    fig.suptitle(
        f"Highest-scoring normal parts (left) and lowest-scoring defective parts (right) by {criterion}; "
        f"threshold {threshold:.4g}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
