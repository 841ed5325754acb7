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

``--compare MODEL RUN`` scores a second fit of the same calibration images
and applies every draw to both, so that the two fits' F1 are compared draw
by draw: the mean of the paired differences, with its 95% range, says
whether the fits differ in what they would score on average, apart from
which 257 images happened to set the threshold.

    python benchmarks/threshold_noise.py --model MODEL --run RUN \\
        --normal runs/casting-grouped/eval_ok --anomalous runs/casting-grouped/eval_def \\
        [--compare OTHER_MODEL OTHER_RUN]
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
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("MODEL", "RUN"),
                        help="a second fit on the same calibration images: the same draws applied to both")
    args = parser.parse_args()

    import numpy as np

    logging.disable(logging.WARNING)
    fits = [score_fit(args.model, args.run, args)]
    if args.compare:
        fits.append(score_fit(*args.compare, args))
        if fits[1]["calibration_images"] != fits[0]["calibration_images"]:
            raise SystemExit(f"{args.compare[1]} was calibrated on other images than {args.run}: "
                             "a paired comparison needs the same split (split.json's val)")
    quantile = fits[0]["quantile"]

    def harrell_davis(x: np.ndarray) -> float:
        from scipy import stats

        n = x.size
        weights = np.diff(stats.beta.cdf(np.arange(n + 1) / n, quantile * (n + 1), (1 - quantile) * (n + 1)))
        return float(weights @ np.sort(x))

    estimate = harrell_davis if args.estimator == "harrell-davis" else lambda x: float(np.quantile(x, quantile))
    size = fits[0]["held_out"].size
    rng = np.random.default_rng(args.seed)
    draws = [rng.integers(0, size, size) for _ in range(args.draws)]
    where = "the card's threshold" if args.estimator == "quantile" else f"the {args.estimator} threshold"
    drawn_f1 = []
    for fit in fits:
        thresholds = np.array([estimate(fit["held_out"][draw]) for draw in draws])
        drawn = np.array([fit["f1_accuracy"](t) for t in thresholds])
        drawn_f1.append(drawn[:, 0])
        whole = estimate(fit["held_out"]) if args.estimator != "quantile" else fit["threshold"]
        f1, accuracy = fit["f1_accuracy"](whole)
        low, high = np.quantile(drawn[:, 0], [0.025, 0.975])
        print(f"{fit['model']} ({fit['criterion']}, {args.precision}); {size} calibration images, "
              f"quantile {quantile:g}; evaluated on {fit['good'].size} normal + {fit['bad'].size} anomalous")
        print(f"  at {where} {whole:.6g}: F1 {f1:.4f}, accuracy {accuracy:.4f}")
        print(f"  {args.draws} draws of the calibration set: F1 {drawn[:, 0].mean():.4f} +- {drawn[:, 0].std():.4f} "
              f"(95%: {low:.4f} to {high:.4f}); accuracy {drawn[:, 1].mean():.4f} +- {drawn[:, 1].std():.4f}; "
              f"threshold +- {thresholds.std():.5f}\n")
    if len(fits) == 2:
        difference = drawn_f1[0] - drawn_f1[1]
        low, high = np.quantile(difference, [0.025, 0.975])
        print(f"paired over the same {args.draws} draws, F1 of {fits[0]['model']} minus {fits[1]['model']}: "
              f"mean {difference.mean():+.4f} (95% of draws {low:+.4f} to {high:+.4f}); "
              f"the first higher in {(difference > 0).mean():.1%} of draws, equal in {(difference == 0).mean():.1%}")
    return 0


def score_fit(model: Path, run: Path, args: argparse.Namespace) -> dict:
    """One fit's scores: its calibration images, the evaluation sets and its card's threshold."""
    import numpy as np

    from edge_inspect.inspector import Inspector
    from edge_inspect.sources.files import inspect_files

    inspector = Inspector.load(model, precision=args.precision, device="cpu")
    calibration = json.loads((run / "calibration.json").read_text())
    if calibration["rule"] != "quantile" or inspector.entry["polarity"] != "high":
        raise SystemExit(f"this takes a one-sided quantile rule; {run} has {calibration['rule']}, "
                         f"polarity {inspector.entry['polarity']}")
    split = json.loads((run / "split.json").read_text())

    def scores(paths) -> np.ndarray:
        return np.array([result.score for result, _ in inspect_files(inspector, paths)])

    good, bad = scores([args.normal]), scores([args.anomalous])

    def f1_accuracy(threshold: float) -> tuple[float, float]:
        caught, alarms = int((bad > threshold).sum()), int((good > threshold).sum())
        f1 = 2 * caught / (2 * caught + alarms + len(bad) - caught)
        return f1, (caught + len(good) - alarms) / (len(good) + len(bad))

    return {
        "model": model, "criterion": inspector.criterion, "quantile": 1.0 - calibration["false_alarm_rate"],
        "calibration_images": sorted(split["val"]), "threshold": float(inspector.entry["threshold"]),
        "held_out": scores([Path(split["root"]) / name for name in split["val"]]),
        "good": good, "bad": bad, "f1_accuracy": f1_accuracy,
    }


if __name__ == "__main__":
    raise SystemExit(main())
