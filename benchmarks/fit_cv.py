"""Two fits of the default compared on folds that no evaluation split holds.

One evaluation split gives one label-free F1 per fit, and the difference
between two fits there mixes what the fits do with which good parts set the
threshold and which parts were evaluated. This lays out ``--folds`` grouped
folds of the normal images (whole near-duplicate groups, as
``casting_split.py --grouped`` does) and of the defective images, and for
each fold trains on the other folds' normals with the code here and with the
code at git revision ``--old``, evaluates both (``edge-inspect evaluate``,
each with its own code) on the fold's normals and defectives, and prints the
criterion's AUC-ROC, AUC-PR and label-free F1 side by side with their paired
differences.

Leave the evaluation split out of it: ``--exclude`` takes the split's
``split.json`` and drops every image it evaluates on.

    python benchmarks/fit_cv.py --normal runs/casting-grouped/train_ok \\
        --defective ../shared/data/casting/train/def --exclude runs/casting-grouped/split.json \\
        --old 6d8d8de --scratch runs/fit-cv
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fit import fit, ordered_images  # noqa: E402
from casting_split import _unit, near_duplicate_groups  # noqa: E402

METRICS = ("auc_roc", "auc_pr", "f1")


def folds_of(normal: list[Path], defective: list[Path], folds: int, link: float) -> list[tuple[list[Path], list[Path]]]:
    """(normals, defectives) of each fold: whole near-duplicate groups of normals, defectives by name."""
    labels = near_duplicate_groups(normal, link)
    first = {}
    for path, label in zip(normal, labels):
        first.setdefault(int(label), path.name)
    fold_of_group = {g: int(_unit(f"fit-cv:{name}") * folds) for g, name in first.items()}
    return [
        ([p for p, g in zip(normal, labels) if fold_of_group[int(g)] == k],
         [p for p in defective if int(_unit(f"fit-cv:{p.name}") * folds) == k])
        for k in range(folds)
    ]


def link_all(paths: list[Path], out: Path) -> Path:
    out.mkdir(parents=True)
    for p in paths:
        (out / p.name).symlink_to(p.resolve())
    return out


def evaluate(code: Path, run: Path, normal: Path, anomalous: Path, criterion: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "edge_inspect", "evaluate", str(run), "--normal", str(normal),
                           "--anomalous", str(anomalous)], cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"evaluate failed in {code}:\n{done.stderr[-2000:]}")
    return json.loads((run / "eval" / "metrics.json").read_text())["criteria"][criterion]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--normal", required=True, type=Path, help="folder of normal images")
    parser.add_argument("--defective", required=True, type=Path, help="folder of defective images")
    parser.add_argument("--exclude", type=Path, help="a split.json whose evaluation images are left out")
    parser.add_argument("--old", required=True, help="git revision of the other fit")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--link", type=float, default=0.99, help="near-duplicate correlation (as casting_split.py)")
    parser.add_argument("--criterion", default="smooth_range")
    parser.add_argument("--scratch", required=True, type=Path, help="folder for the folds' runs (kept)")
    args = parser.parse_args()

    excluded = set()
    if args.exclude:
        split = json.loads(args.exclude.read_text())
        excluded = {Path(name).name for side in ("eval_ok", "eval_def", "eval_def_balanced") for name in split.get(side, [])}
    normal = [p for p in ordered_images(args.normal) if p.name not in excluded]
    defective = [p for p in ordered_images(args.defective) if p.name not in excluded]
    print(f"{len(normal)} normal and {len(defective)} defective images ({len(excluded)} excluded); "
          f"{args.folds} folds", file=sys.stderr, flush=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    old = args.scratch / "old-code"
    if not old.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old],
                       check=True, capture_output=True)
    rows = []
    try:
        for k, (ok, bad) in enumerate(folds_of(normal, defective, args.folds, args.link)):
            fold = args.scratch / f"fold{k}"
            shutil.rmtree(fold, ignore_errors=True)
            held = {p.name for p in ok}
            train = link_all([p for p in normal if p.name not in held], fold / "train_ok")
            eval_ok, eval_def = link_all(ok, fold / "eval_ok"), link_all(bad, fold / "eval_def")
            row = {"fold": k, "train": len(normal) - len(ok), "normal": len(ok), "defective": len(bad)}
            for name, code in (("new", ROOT), ("old", old)):
                start = time.monotonic()
                seconds, gb = fit(code, train, fold / name, [])
                row[name] = {**evaluate(code, fold / name, eval_ok, eval_def, args.criterion), "fit_s": seconds, "fit_gb": gb}
                print(f"fold {k} {name}: fit {seconds:.0f} s, {gb:.2f} GB; with evaluation {time.monotonic() - start:.0f} s; "
                      + ", ".join(f"{m} {row[name][m]:.4f}" for m in METRICS), file=sys.stderr, flush=True)
            rows.append(row)
            (args.scratch / "folds.json").write_text(json.dumps(rows, indent=1))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)

    print(f"{args.criterion}; new: this code, old: {args.old}\n")
    print("| fold | trained on | normal + defective | " + " | ".join(f"{m} new | old | new - old" for m in METRICS) + " |")
    print("|---|---|---|" + "---|---|---|" * len(METRICS))
    for row in rows:
        cells = " | ".join(f"{row['new'][m]:.4f} | {row['old'][m]:.4f} | {row['new'][m] - row['old'][m]:+.4f}" for m in METRICS)
        print(f"| {row['fold']} | {row['train']} | {row['normal']} + {row['defective']} | {cells} |")
    import numpy as np

    for m in METRICS:
        difference = np.array([row["new"][m] - row["old"][m] for row in rows])
        spread = difference.std(ddof=1) / np.sqrt(difference.size) if difference.size > 1 else float("nan")
        print(f"{m}: new - old, mean over folds {difference.mean():+.4f} (standard error {spread:.4f}); "
              f"new {np.mean([r['new'][m] for r in rows]):.4f}, old {np.mean([r['old'][m] for r in rows]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
