"""Shared fixtures: small synthetic image folders, quiet TensorFlow."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Help and tables wrap at the terminal's width: the width of a pipe (what CI
# has), whatever terminal the tests run in, so that their text is the same.
os.environ["COLUMNS"] = "80"

import pytest  # noqa: E402

from tests.support import write_parts  # noqa: E402


@pytest.fixture(scope="session")
def normal_dir(tmp_path_factory):
    """80 normal synthetic parts, 32x32 PNG: enough that the held-out fifth calibrates."""
    folder = tmp_path_factory.mktemp("normal")
    write_parts(folder, 80, size=32, seed=1)
    return folder


@pytest.fixture(scope="session")
def defect_dir(tmp_path_factory):
    """12 defective synthetic parts, 32x32 PNG."""
    folder = tmp_path_factory.mktemp("defect")
    write_parts(folder, 12, size=32, seed=2, defective=True)
    return folder
