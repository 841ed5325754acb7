"""The torture suite's fixtures: the seed and count of each scenario, the model, the run.

By default each scenario runs once, with seed 1 and its short count (the
slice CI runs). Environment variables widen it without editing anything:

- ``TORTURE_SEEDS=1,2,3``: run every scenario once per seed;
- ``TORTURE_COUNT=50``: the count of every scenario (files, writers, kills...);
- ``TORTURE_MODEL=DIR``: an exported model folder to use instead of training
  the tiny one (the ``model_dir`` fixture).
"""

import os
from pathlib import Path

import pytest

from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.torture.harness import Torture


def pytest_configure(config):
    config.addinivalue_line("markers", "torture: a fault-injection scenario of tests/torture (slow, real processes)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/torture/" in item.nodeid:
            item.add_marker(pytest.mark.torture)


def pytest_generate_tests(metafunc):
    if "seed" not in metafunc.fixturenames:
        return
    seeds = [int(s) for s in os.environ.get("TORTURE_SEEDS", "1").split(",") if s.strip()]
    short = getattr(metafunc.function, "torture_short", 3)
    n = int(os.environ.get("TORTURE_COUNT", short))
    metafunc.parametrize("seed", seeds, ids=[f"seed{s}" for s in seeds])
    metafunc.parametrize("count", [n], ids=[f"n{n}"])


@pytest.fixture(scope="session")
def torture_model(request) -> Path:
    given = os.environ.get("TORTURE_MODEL")
    return Path(given) if given else request.getfixturevalue("model_dir")


@pytest.fixture
def run(tmp_path, torture_model, seed, count) -> Torture:
    """The scenario's :class:`Torture`; the scenario's wrapper closes it and reports its violations."""
    return Torture(tmp_path, torture_model, seed, count)
