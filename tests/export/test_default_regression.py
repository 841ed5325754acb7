"""Regression: the default model and criterion separate injected defects at least as well as linear-ae with range.

The tool's defaults were chosen on the casting data (docs/results.md). This
test guards the choice on synthetic parts, where no file from ``../shared``
is needed: a run trained with every default but the size, scored on unseen
normal parts and parts with holes, scratches and edge chips.
"""

import numpy as np
import pytest

from edge_inspect.calibrate import DEFAULT_CRITERION, load_calibration, oriented
from edge_inspect.kernels import CRITERIA
from edge_inspect.synthetic import write_parts
from export.data import list_files
from export.scoring import calibrate_run, load_run, score_paths
from export.train import TrainConfig, train


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC-ROC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("default-regression")
    write_parts(base / "train", 120, size=48, seed=21)
    write_parts(base / "ok", 60, size=48, seed=22)
    write_parts(base / "def", 60, size=48, seed=23, defective=True)
    run = base / "run"
    # Every default but the size and the component count, which the 120 small images cannot support.
    train(TrainConfig(model="linear-ae", normal_dir=str(base / "train"), out_dir=str(run), size=48, components=48),
          progress=False)
    calibrate_run(run)
    return base, run


def test_the_default_is_at_least_as_good_as_range(default_run):
    base, run = default_run
    paths = list_files(base / "ok") + list_files(base / "def")
    labels = np.r_[np.zeros(60, int), np.ones(60, int)]
    raw = score_paths(load_run(run), paths)
    calibration = load_calibration(run / "calibration.json")
    assert calibration["default_criterion"] == DEFAULT_CRITERION

    def auc_of(name):
        return auc(labels, oriented(raw[:, CRITERIA.index(name)], calibration["criteria"][name]))

    default, range_ = auc_of(DEFAULT_CRITERION), auc_of("range")
    assert default >= range_, f"{DEFAULT_CRITERION} AUC {default:.4f} < range AUC {range_:.4f}"
    assert default >= 0.9
