"""A tiny trained and calibrated run, shared by the training-side tests."""

import cv2
import numpy as np
import pytest

from tests.support import make_part


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, normal_dir):
    """conv-ae at 32 px, a few epochs on the synthetic normals, calibrated label-free."""
    from export.scoring import calibrate_run
    from export.train import TrainConfig, train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(run), size=32, epochs=4, batch_size=8), progress=False)
    calibrate_run(run)
    return run


@pytest.fixture(scope="session")
def big_defects(tmp_path_factory):
    """Unseen normal parts and parts with large dark blots, 32 px."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(7)
    for i in range(16):
        image, _ = make_part(rng, 32)
        (root / "ok").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "ok" / f"ok_{i}.png"), image)
        image, _ = make_part(rng, 32)
        y, x = rng.integers(8, 18, 2)
        image[y : y + 7, x : x + 7] = 0
        (root / "def").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "def" / f"def_{i}.png"), image)
    return root
