"""Pictures of a run: ROC and PR curves, score histograms, worst misses, the loss per epoch.

Each criterion keeps one colour (:func:`criterion_colours`) in every curve,
and the HTML report's table shows the same colour beside its name.

    >>> curves(labels, {"range": s1, "mse": s2}, "range", Path("eval"))
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def criterion_colours(names) -> dict[str, str]:
    """A distinct colour (``#rrggbb``) for each criterion, in order: the 10 strong tab20 colours, then the pale ones."""
    from matplotlib.colors import to_hex

    palette = plt.get_cmap("tab20").colors
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {name: to_hex(palette[order[i % 20]]) for i, name in enumerate(names)}


def curves(labels: np.ndarray, scores: dict[str, np.ndarray], highlight: str, out: Path) -> None:
    """``roc.png`` and ``pr.png``: one curve per criterion, the default in bold.

    The legend gives each criterion's AUC-ROC and AUC-PR (average
    precision) as the metrics table does, in the colour of
    :func:`criterion_colours`.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    prevalence = labels.mean()
    colours = criterion_colours(scores)
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(6, 5))
        for name, s in scores.items():
            if kind == "roc":
                x, y, _ = roc_curve(labels, s)
                area = roc_auc_score(labels, s)
            else:
                y, x, _ = precision_recall_curve(labels, s)
                area = average_precision_score(labels, s)
            bold = name == highlight
            ax.plot(x, y, lw=2.5 if bold else 1.2, alpha=1.0 if bold else 0.8, color=colours[name],
                    label=f"{name}{' (default)' if bold else ''} {area:.3f}", zorder=3 if bold else 2)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance")
            ax.set(xlabel="false-alarm rate (normal flagged)", ylabel="recall (defects caught)",
                   title="ROC (legend: AUC-ROC)")
        else:
            ax.axhline(prevalence, color="k", ls=":", lw=0.8, label=f"chance {prevalence:.3f}")
            ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (legend: AUC-PR)")
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


def loss(history: list[dict], path: Path, title: str) -> Path:
    """Write ``loss.png``: training and validation loss per epoch, on whole-number epoch ticks.

    Args:
        history: one row per epoch: ``epoch`` and the Keras logs (``loss``,
            ``val_loss``, and the VAE's ``reconstruction_loss`` and ``kl_loss``).
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``.
    """
    fig = loss_figure(history, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_figure(history: list[dict], title: str):
    """The figure of :func:`loss`, one panel per loss term, not yet saved."""
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    terms = [k for k in ("loss", "reconstruction_loss", "kl_loss") if any(k in row for row in history)]
    fig, axes = plt.subplots(1, len(terms), figsize=(4.5 * len(terms), 3.5), squeeze=False)
    for ax, key in zip(axes[0], terms):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [row.get(prefix + key, np.nan) for row in history]
            ax.plot(epochs, values, style, marker=".", label=("validation " if prefix else "training ") + key)
        ax.set_xlabel("epoch")
        # Half an epoch of room on each side: without it one or two epochs get ticks such as 0.95 and 1.05.
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
