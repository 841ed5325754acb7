"""Print the markdown tables of docs/results.md from evaluated run folders.

    python benchmarks/results_table.py runs/casting-dev/conv-ae runs/casting-dev/vae runs/casting-dev/dilated-vae
    python benchmarks/results_table.py --eval eval-balanced runs/casting-grouped/linear-ae

Each run folder must hold ``EVAL/metrics.json`` (from ``edge-inspect
evaluate``; ``EVAL`` is ``eval`` unless ``--eval`` names another), ``config.json``
and ``checkpoints/state.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# What the paper reports for its best criterion per model (AUC-ROC), and the
# full row of its overall best (conv AE, range).
PAPER_BEST = {"conv-ae": ("range", 0.9548), "vae": ("mean", 0.8965), "dilated-vae": ("mean", 0.8901)}
#: The paper's row of each model's best criterion: AUC-ROC, AUC-PR (None: not given here), F1, accuracy.
PAPER_ROWS = {
    "conv-ae": ("range", 0.9548, 0.9570, 0.8812, 0.876),
    "vae": ("mean", 0.8965, None, 0.8390, 0.823),
    "dilated-vae": ("mean", 0.8901, None, 0.8354, 0.821),
}
#: The linear AE is not in the paper; its bar is the paper's overall best.
PAPER_BEST["linear-ae"] = ("range on the conv AE", 0.9548)
PAPER_CONV_AE_RANGE = {"auc_roc": 0.9548, "auc_pr": 0.9570, "f1_oracle": 0.8812, "accuracy_oracle": 0.876}


def budget(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    train = config["train"]
    if train["model"] == "linear-ae":
        fit = state.get("fit", {})
        return (
            f"{train['size']} px, {train['components']} components, augment {train['augment']} "
            f"({fit.get('fitted_on', '?')} images fitted), {config['data']['n_train']} training images, "
            f"fitted in {state['seconds']:.0f} s on {', '.join(config['devices'])}"
        )
    stop = " (stopped by its time budget)" if state.get("stopped_budget") else " (early stopping)" if state.get("stopped_early") else ""
    return (
        f"preset {train.get('preset', '?')}, {train['size']} px, {state['epoch']} epochs run{stop}, best at {state['best_epoch']}, "
        f"batch {train['batch_size']}, {train['optimizer']} lr {train['lr']}, "
        + (f"latent {train.get('latent_dim')}, " if train["model"] in ("vae", "dilated-vae") else "")
        + f"{state.get('compute', 'float32')} maths, augment {train.get('augment') or 'none'}, "
        f"{config['data']['n_train']} training images, "
        + (f"{state['seconds'] / 60:.0f} min of training" if state.get("seconds") else "wall time not recorded")
        + f" on {', '.join(config['devices'])}"
    )


def table(run: Path, eval_dir: str = "eval") -> str:
    metrics = json.loads((run / eval_dir / "metrics.json").read_text())
    kind = json.loads((run / "config.json").read_text())["train"]["model"]
    lines = [
        f"### {kind}",
        "",
        f"Budget: {budget(run)}. Evaluated on {metrics['n_normal']} normal + {metrics['n_anomalous']} defective images "
        f"(chance AUC-PR {metrics['prevalence']:.3f}); thresholds {metrics['calibration_mode']}, rule from calibration.json.",
        "",
        "| criterion | AUC-ROC | AUC-PR | F1 | accuracy | false alarms | F1 (oracle) | accuracy (oracle) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if kind in PAPER_ROWS:
        name, auc, ap, f1, acc = PAPER_ROWS[kind]
        lines.append(f"| *paper: {name}* | *{auc:.4f}* | *{ap:.4f}* | *{f1:.4f}* | *{acc:.4f}* | | | |"
                     if ap is not None else f"| *paper: {name}* | *{auc:.4f}* | | *{f1:.4f}* | *{acc:.4f}* | | | |")
    for name, m in metrics["criteria"].items():
        lines.append(
            f"| {name} | {m['auc_roc']:.4f} | {m['auc_pr']:.4f} | {m['f1']:.4f} | {m['accuracy']:.4f} | "
            f"{m['false_alarm_rate']:.4f} | {m['f1_oracle']:.4f} | {m['accuracy_oracle']:.4f} |"
        )
    best = max(metrics["criteria"], key=lambda n: metrics["criteria"][n]["auc_roc"])
    paper_criterion, paper_auc = PAPER_BEST[kind]
    lines += [
        "",
        f"Best criterion here: **{best}** (AUC-ROC {metrics['criteria'][best]['auc_roc']:.4f}); "
        f"the paper's best for this model: {paper_criterion or 'its best criterion'} at AUC-ROC {paper_auc}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    eval_dir = "eval"
    if args[:1] == ["--eval"]:
        eval_dir, args = args[1], args[2:]
    print("\n".join(table(Path(arg), eval_dir) for arg in args))
