"""How much a label-free threshold's F1 moves with the calibration images alone.

The label-free threshold is a quantile of the calibration set's scores (257
good parts for the default on the leak-bounded split). This scores the
run's calibration images and an evaluation set with the exported model,
then draws the calibration set again with replacement ``--draws`` times,
sets the threshold by the same quantile each time, and reports the spread
of F1 and accuracy on the evaluation set. A difference between two fits
smaller than that spread is not one the threshold can tell apart.

``--estimator harrell-davis`` sets each draw's threshold (and the one
reported for the whole set) with the Harrell-Davis quantile, a weighted sum
of all order statistics, instead of ``np.quantile``'s two neighbours: is a
smoother quantile less noisy here?

    python benchmarks/threshold_noise.py --model MODEL --run RUN \\
        --normal runs/casting-grouped/eval_ok --anomalous runs/casting-grouped/eval_def
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="the run's exported model folder")
    parser.add_argument("--run", required=True, type=Path, help="the run folder (its split.json names the calibration images)")
    parser.add_argument("--normal", required=True, type=Path)
    parser.add_argument("--anomalous", required=True, type=Path)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimator", choices=("quantile", "harrell-davis"), default="quantile",
                        help="how each draw's threshold is set (default: the calibration's own np.quantile)")
    args = parser.parse_args()

    import numpy as np

    from edge_inspect.inspector import Inspector
    from edge_inspect.sources.files import inspect_files

    logging.disable(logging.WARNING)
    inspector = Inspector.load(args.model, precision=args.precision, device="cpu")
    calibration = json.loads((args.run / "calibration.json").read_text())
    quantile = 1.0 - calibration["false_alarm_rate"]
    if calibration["rule"] != "quantile" or inspector.entry["polarity"] != "high":
        raise SystemExit(f"this takes a one-sided quantile rule; {args.run} has {calibration['rule']}, "
                         f"polarity {inspector.entry['polarity']}")
    split = json.loads((args.run / "split.json").read_text())

    def scores(paths) -> np.ndarray:
        return np.array([result.score for result, _ in inspect_files(inspector, paths)])

    held_out = scores([Path(split["root"]) / name for name in split["val"]])
    good, bad = scores([args.normal]), scores([args.anomalous])

    def f1_accuracy(threshold: float) -> tuple[float, float]:
        caught, alarms = int((bad > threshold).sum()), int((good > threshold).sum())
        f1 = 2 * caught / (2 * caught + alarms + len(bad) - caught)
        return f1, (caught + len(good) - alarms) / (len(good) + len(bad))

    def harrell_davis(x: np.ndarray) -> float:
        from scipy import stats

        n = x.size
        weights = np.diff(stats.beta.cdf(np.arange(n + 1) / n, quantile * (n + 1), (1 - quantile) * (n + 1)))
        return float(weights @ np.sort(x))

    estimate = harrell_davis if args.estimator == "harrell-davis" else lambda x: float(np.quantile(x, quantile))
    rng = np.random.default_rng(args.seed)
    thresholds = np.array([estimate(rng.choice(held_out, held_out.size)) for _ in range(args.draws)])
    drawn = np.array([f1_accuracy(t) for t in thresholds])
    whole = estimate(held_out) if args.estimator != "quantile" else float(inspector.entry["threshold"])
    f1, accuracy = f1_accuracy(whole)
    low, high = np.quantile(drawn[:, 0], [0.025, 0.975])
    print(f"{args.model} ({inspector.criterion}, {args.precision}); {held_out.size} calibration images, "
          f"quantile {quantile:g}; evaluated on {good.size} normal + {bad.size} anomalous\n")
    where = "the card's threshold" if args.estimator == "quantile" else f"the {args.estimator} threshold"
    print(f"at {where} {whole:.6g}: F1 {f1:.4f}, accuracy {accuracy:.4f}")
    print(f"{args.draws} draws of the calibration set: F1 {drawn[:, 0].mean():.4f} +- {drawn[:, 0].std():.4f} "
          f"(95%: {low:.4f} to {high:.4f}); accuracy {drawn[:, 1].mean():.4f} +- {drawn[:, 1].std():.4f}; "
          f"threshold +- {thresholds.std():.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
