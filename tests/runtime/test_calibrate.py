"""Label-free calibration: false-alarm rates, polarities, few-shot, files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.stats

from edge_inspect.calibrate import (
    DEFAULT_POLARITY,
    MIN_NORMAL,
    QUANTILES,
    auc,
    calibrate,
    is_anomalous,
    load_calibration,
    oriented,
    save_calibration,
)
from edge_inspect.errors import ConfigError, InputError, ModelCardError
from edge_inspect.kernels import CRITERIA

N_FIT = 2_000
N_TEST = 20_000


def _binomial_tol(p, n_fit=N_FIT, n_test=N_TEST, sigmas=4.0):
    """Tolerance on a measured false-alarm rate: the threshold's own scatter
    (fitted on n_fit draws) plus the counting noise of n_test fresh draws,
    both binomial, at `sigmas` standard deviations."""
    return sigmas * np.sqrt(p * (1 - p) * (1 / n_fit + 1 / n_test))


# (name, polarity, draw(rng, n)): one criterion per polarity, long tail included
POLAR_CASES = [
    ("range", "high", lambda rng, n: rng.lognormal(0.0, 0.5, n)),  # right-skewed, long tail
    ("min", "low", lambda rng, n: -rng.gamma(3.0, 0.1, n)),
    ("mean", "two-sided", lambda rng, n: rng.normal(0.02, 0.01, n)),
]


@pytest.mark.parametrize("name, polarity, draw", POLAR_CASES, ids=[c[1] for c in POLAR_CASES])
@pytest.mark.parametrize("far", [0.01, 0.05, 0.2])
def test_quantile_rule_gives_the_false_alarm_rate(name, polarity, draw, far):
    rng = np.random.default_rng(1)
    fit = draw(rng, N_FIT)[:, None]
    cal = calibrate(fit, [name], false_alarm_rate=far)
    entry = cal["criteria"][name]
    assert entry["polarity"] == polarity == DEFAULT_POLARITY[name]
    rate = np.mean(is_anomalous(draw(rng, N_TEST), entry))
    assert abs(rate - far) < _binomial_tol(far), (rate, far)
    assert entry["normal_alarm_rate"] == pytest.approx(far, abs=1.5 / N_FIT)


@pytest.mark.parametrize("polarity", ["high", "low", "two-sided"])
@pytest.mark.parametrize("k", [2.0, 3.0])
def test_mad_rule_gives_the_normal_tail_rate(polarity, k):
    # for normal scores the MAD rule is a k-sigma rule: P(Z > k), twice two-sided
    rng = np.random.default_rng(2)
    mu, sd = 5.0, 0.3
    name = {"high": "std", "low": "min", "two-sided": "skewness"}[polarity]
    cal = calibrate(rng.normal(mu, sd, (N_FIT, 1)), [name], rule="mad", k=k)
    entry = cal["criteria"][name]
    assert entry["polarity"] == polarity
    expected = scipy.stats.norm.sf(k) * (2 if polarity == "two-sided" else 1)
    rate = np.mean(is_anomalous(rng.normal(mu, sd, N_TEST), entry))
    # sigma-hat from a MAD of 2000 draws scatters ~3.7 %, which moves the tail rate by more
    # than binomial noise: allow 35 % relative at k = 3, 20 % at k = 2
    assert rate == pytest.approx(expected, rel=0.35 if k == 3 else 0.2), (rate, expected)
    assert cal["rule"] == "mad" and cal["k"] == k and cal["false_alarm_rate"] is None


def test_mad_rule_holds_up_with_a_long_tail_of_odd_normals():
    # 5 % of the "normal" set are odd parts far out: the mean-and-std of the set
    # balloons, the median and MAD hardly move
    rng = np.random.default_rng(3)
    clean = rng.normal(0.0, 1.0, (N_FIT, 1))
    dirty = clean.copy()
    dirty[: N_FIT // 20] = rng.normal(30.0, 5.0, (N_FIT // 20, 1))
    t_clean = calibrate(clean, ["std"], rule="mad", k=3.0)["criteria"]["std"]["threshold"]
    t_dirty = calibrate(dirty, ["std"], rule="mad", k=3.0)["criteria"]["std"]["threshold"]
    assert abs(t_dirty - t_clean) < 0.5
    assert 2.5 < t_clean < 3.5
    std_rule = dirty.mean() + 3 * dirty.std()
    assert std_rule > 10  # what a mean + 3 std rule would have done


def test_mad_rule_when_most_normal_scores_are_equal():
    # 60 % exact zeros (MAD = 0): sigma falls back to 1.2533 x mean |x - median|
    x = np.r_[np.zeros(60), np.linspace(0.1, 1.0, 40)][:, None]
    entry = calibrate(x, ["max"], rule="mad", k=3.0)["criteria"]["max"]
    assert entry["threshold"] == pytest.approx(3.0 * 1.2533 * np.mean(np.abs(x)))
    # all equal: nothing to scale by; the threshold is the normal value itself
    flat = calibrate(np.full((20, 1), 0.25), ["max"], rule="mad")["criteria"]["max"]
    assert flat["threshold"] == 0.25 and flat["normal_alarm_rate"] == 0.0
    assert is_anomalous(np.array([0.25, 0.2500001]), flat).tolist() == [False, True]


def test_two_sided_flags_both_directions():
    rng = np.random.default_rng(4)
    cal = calibrate(rng.normal(0.0, 1.0, (N_FIT, 1)), ["cumsum"], false_alarm_rate=0.05)
    entry = cal["criteria"]["cumsum"]
    assert entry["polarity"] == "two-sided"
    assert entry["center"] == pytest.approx(0.0, abs=0.1)
    assert entry["threshold"] == pytest.approx(1.96, abs=0.15)  # |Z| 95 % quantile
    assert is_anomalous(np.array([-4.0, 4.0, 0.0]), entry).tolist() == [True, True, False]
    assert oriented(-3.0, entry) == pytest.approx(3.0 + entry["center"])


def test_oriented_and_verdict_per_polarity():
    high = {"polarity": "high", "center": 1.0, "threshold": 2.0}
    low = {"polarity": "low", "center": 1.0, "threshold": -0.5}
    two = {"polarity": "two-sided", "center": 1.0, "threshold": 0.5}
    x = np.array([0.0, 1.0, 2.5])
    assert oriented(x, high).tolist() == [0.0, 1.0, 2.5]
    assert oriented(x, low).tolist() == [-0.0, -1.0, -2.5]
    assert oriented(x, two).tolist() == [1.0, 0.0, 1.5]
    assert is_anomalous(x, high).tolist() == [False, False, True]
    assert is_anomalous(x, low).tolist() == [True, False, False]
    assert is_anomalous(x, two).tolist() == [True, False, True]
    assert is_anomalous(2.5, high) is True and isinstance(oriented(2.5, high), float)
    assert is_anomalous(np.nan, high) is False


def test_label_free_defaults_over_all_criteria():
    rng = np.random.default_rng(5)
    cal = calibrate(rng.normal(size=(200, len(CRITERIA))), CRITERIA)
    assert cal["mode"] == "label-free" and cal["n_anomalous"] == 0
    assert cal["default_criterion"] == "smooth_range"
    assert {n: e["polarity"] for n, e in cal["criteria"].items()} == DEFAULT_POLARITY
    assert list(DEFAULT_POLARITY) == list(CRITERIA)  # every criterion has a label-free polarity
    # the smoothed extremes are abnormal in the direction of the raw ones
    for name in ("min", "max", "range"):
        assert DEFAULT_POLARITY[f"smooth_{name}"] == DEFAULT_POLARITY[name]
    entry = cal["criteria"]["range"]
    assert entry["auc"] is None
    assert list(entry["quantiles"]) == [repr(q) for q in QUANTILES] + ["min", "max"]
    assert entry["quantiles"]["min"] <= entry["quantiles"]["0.5"] <= entry["quantiles"]["max"]
    json.dumps(cal, allow_nan=False)  # serialisable as it is
    assert calibrate(rng.normal(size=(50, 2)), ["new_a", "new_b"])["default_criterion"] == "new_a"
    assert calibrate(rng.normal(size=(50, 1)), ["new_a"])["criteria"]["new_a"]["polarity"] == "two-sided"
    over = calibrate(rng.normal(size=(50, 2)), ["mean", "max"], polarities={"mean": "low"}, default_criterion="max")
    assert over["criteria"]["mean"]["polarity"] == "low" and over["default_criterion"] == "max"


def test_few_shot_learns_polarity_and_picks_the_separating_criterion():
    rng = np.random.default_rng(6)
    names = ["range", "min", "mean", "entropy"]
    normal = rng.normal(0.0, 1.0, (500, 4))
    anomalous = rng.normal(0.0, 1.0, (12, 4))
    anomalous[:, 1] = rng.normal(-6.0, 0.5, 12)  # min: clearly lower, separates
    anomalous[:, 2] = np.r_[rng.normal(-2.5, 0.3, 6), rng.normal(2.5, 0.3, 6)]  # mean: both ways
    anomalous[:, 3] = rng.normal(1.5, 0.2, 12)  # entropy: higher, overlapping
    cal = calibrate(normal, names, anomalous_scores=anomalous)
    assert cal["mode"] == "few-shot" and cal["n_anomalous"] == 12
    pol = {n: e["polarity"] for n, e in cal["criteria"].items()}
    assert pol["min"] == "low" and pol["mean"] == "two-sided" and pol["entropy"] == "high"
    assert cal["default_criterion"] == "min"
    assert cal["criteria"]["min"]["auc"] == 1.0
    assert 0.9 < cal["criteria"]["mean"]["auc"] < 1.0
    assert 0.3 < cal["criteria"]["range"]["auc"] < 0.8  # no signal: near chance
    # thresholds still come from the normals alone, by the rule
    alone = calibrate(normal, names, polarities=pol)
    for n in names:
        assert cal["criteria"][n]["threshold"] == alone["criteria"][n]["threshold"]
    # an explicit default criterion wins over the AUC choice
    chosen = calibrate(normal, names, anomalous_scores=anomalous, default_criterion="range")
    assert chosen["default_criterion"] == "range"


def test_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(7)
    a = np.round(rng.normal(0, 1, 40), 1)  # ties on purpose
    b = np.round(rng.normal(0.7, 1, 15), 1)
    pairs = (b[:, None] > a[None, :]).mean() + 0.5 * (b[:, None] == a[None, :]).mean()
    assert auc(a, b) == pytest.approx(pairs, rel=1e-12)
    assert auc([0, 1], [2, 3]) == 1.0 and auc([2, 3], [0, 1]) == 0.0 and auc([1, 1], [1]) == 0.5
    with pytest.raises(InputError, match="needs both groups"):
        auc([], [1.0])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(normal_scores=np.zeros((MIN_NORMAL - 1, 1))), InputError, r"has 9 rows; calibration needs at least 10"),
        (dict(normal_scores=np.r_[np.zeros(20), np.nan][:, None]), InputError,
         r"1 NaN or infinite value\(s\) in range"),
        (dict(normal_scores=np.zeros((20, 2))), InputError, r"must be \(rows, 1\).*found shape \(20, 2\)"),
        (dict(normal_scores=np.zeros(20)), InputError, r"found shape \(20,\)"),
        (dict(anomalous_scores=np.zeros((3, 2))), InputError, r"anomalous_scores must be \(rows, 1\)"),
        (dict(anomalous_scores=np.full((3, 1), np.inf)), InputError, "anomalous_scores has 3 NaN or infinite"),
        (dict(names="range"), InputError, "sequence of criterion names"),
        (dict(names=["range", "range"], normal_scores=np.zeros((20, 2))), InputError, "repeated: range"),
        (dict(rule="zscore"), ConfigError, r"Unknown threshold rule 'zscore'. Expected one of: quantile, mad"),
        (dict(false_alarm_rate=0.0), ConfigError, r"false_alarm_rate must be in \(0, 0.5\), found 0.0"),
        (dict(false_alarm_rate=0.5), ConfigError, r"false_alarm_rate must be in \(0, 0.5\)"),
        (dict(false_alarm_rate=-0.1), ConfigError, r"false_alarm_rate must be in \(0, 0.5\)"),
        (dict(rule="mad", k=0.0), ConfigError, r"k must be a finite number > 0"),
        (dict(default_criterion="rnage"), ConfigError, r"Unknown default criterion 'rnage'"),
        (dict(polarities={"range": "up"}), ConfigError, r"At 'polarities.range': unknown polarity 'up'"),
        (dict(polarities={"max": "high"}), ConfigError, r"At 'polarities.max': unknown criterion"),
    ],
)
def test_calibrate_errors(kwargs, error, message):
    args = dict(normal_scores=np.linspace(0, 1, 20)[:, None], names=["range"])
    args.update(kwargs)
    with pytest.raises(error, match=message):
        calibrate(args.pop("normal_scores"), args.pop("names"), **args)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    k = len(CRITERIA)
    cal = calibrate(rng.normal(size=(100, k)), CRITERIA, anomalous_scores=rng.normal(2, 1, (5, k)))
    path = tmp_path / "calibration.json"
    save_calibration(cal, path)
    assert load_calibration(path) == cal
    # replacing an existing file leaves no temporary file behind
    cal2 = calibrate(rng.normal(size=(100, 1)), ["range"], rule="mad")
    save_calibration(cal2, path)
    assert load_calibration(path) == cal2
    assert os.listdir(tmp_path) == ["calibration.json"]


def test_save_refuses_an_invalid_calibration_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "calibration.json"
    cal = calibrate(np.linspace(0, 1, 20)[:, None], ["range"])
    save_calibration(cal, path)
    broken = json.loads(json.dumps(cal))
    broken["criteria"]["range"]["threshold"] = float("nan")
    with pytest.raises(ModelCardError, match=r"at 'criteria.range.threshold': expected a finite number"):
        save_calibration(broken, path)
    assert load_calibration(path) == cal
    with pytest.raises(ModelCardError, match="Cannot write calibration"):
        save_calibration(cal, tmp_path / "no" / "such" / "dir.json")


def test_load_errors(tmp_path):
    with pytest.raises(ModelCardError, match=r"not found. Calibrate on normal images first"):
        load_calibration(tmp_path / "missing.json")
    cut = tmp_path / "cut.json"
    cut.write_text('{"schema": 1, "mode": "label-fr')
    with pytest.raises(ModelCardError, match=r"is not valid JSON \(line 1, column \d+"):
        load_calibration(cut)
    good = calibrate(np.linspace(0, 1, 20)[:, None], ["range"])
    for mutate, message in [
        (lambda c: c.update(schema=2), r"at 'schema': expected 1"),
        (lambda c: c.update(rule="zscore"), r"at 'rule': expected quantile or mad"),
        (lambda c: c.update(default_criterion="max"), r"at 'default_criterion': expected one of range"),
        (lambda c: c["criteria"]["range"].pop("threshold"), r"at 'criteria.range.threshold'.*found None"),
        (lambda c: c["criteria"]["range"].update(polarity="up"), r"at 'criteria.range.polarity'"),
        (lambda c: c.update(criteria={}), r"at 'criteria': expected an object"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ModelCardError, match=message):
            load_calibration(path)
    path.write_text("[1, 2]")
    with pytest.raises(ModelCardError, match=r"expected a JSON object"):
        load_calibration(path)


def test_weak_auc_warning_says_what_it_means_and_what_to_try():
    from edge_inspect.calibrate import WEAK_AUC, weak_auc_warning

    assert WEAK_AUC == 0.6
    assert weak_auc_warning(0.6, "mse") is None and weak_auc_warning(0.93, "mse") is None
    assert weak_auc_warning(None, "mse") is None and weak_auc_warning(float("nan"), "mse") is None
    worse = weak_auc_warning(0.268, "smooth_range", "16 normal, 16 defective images")
    assert "0.268 on 16 normal, 16 defective images, below 0.6" in worse and "worse than chance" in worse
    near = weak_auc_warning(0.55, "mse")
    assert "near chance" in near and "worse" not in near
    for hint in ("--epochs", "linear-ae", "--size", "--criterion", "swapped"):
        assert hint in worse and hint in near


def test_few_shot_says_why_its_default_criterion_won():
    """Two criteria equally best: the first in the table's order wins, and the text says so."""
    from edge_inspect.calibrate import default_choice

    rng = np.random.default_rng(5)
    names = ("a", "b", "c")
    normal = rng.normal(size=(40, 3))
    anomalous = rng.normal(size=(6, 3))
    anomalous[:, :2] += 10.0  # a and b separate perfectly, c not at all
    cal = calibrate(normal, names, anomalous_scores=anomalous)
    assert cal["default_criterion"] == "a" and cal["criteria"]["a"]["auc"] == cal["criteria"]["b"]["auc"] == 1.0
    text = default_choice(cal)
    assert "Default criterion a: the highest AUC-ROC (1.000)" in text and "tied with b" in text
    assert "6 defective against 40 held-out normal images" in text
    anomalous[0, 1] = np.median(normal[:, 1])  # one of b's defects looks normal: a wins outright, b is next
    cal = calibrate(normal, names, anomalous_scores=anomalous)
    text = default_choice(cal)
    assert "tied" not in text and f"next is b ({cal['criteria']['b']['auc']:.3f})" in text
    asked = default_choice(calibrate(normal, names, anomalous_scores=anomalous, default_criterion="c"), asked=True)
    assert "Default criterion c" in asked and "as asked with --criterion" in asked and "is a's (1.000)" in asked
    assert default_choice(calibrate(normal, names)) is None  # label-free: nothing was chosen by the defects
