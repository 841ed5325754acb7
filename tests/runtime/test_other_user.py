"""The runtime as a user other than root, with no home: how a service account meets it."""

from __future__ import annotations

import os
import textwrap

import pytest

from tests.support.users import run_as_nobody

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")


def test_the_kernels_compile_and_cache_for_a_user_without_a_home_or_numba_cache_dir():
    code = textwrap.dedent("""
        import os, numpy as np
        assert "NUMBA_CACHE_DIR" not in os.environ
        from edge_inspect import kernels, numba_cache, preprocess
        x = np.random.default_rng(0).random((2, 16, 16), dtype=np.float32)
        values = kernels.criteria(x, x * 0.5)
        image = preprocess.preprocess(np.zeros((32, 32, 3), np.uint8), (16, 16))
        print(numba_cache._CACHE_DIR)
        print(os.stat(numba_cache._CACHE_DIR).st_uid, oct(os.stat(numba_cache._CACHE_DIR).st_mode & 0o777))
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["HOME"] = "/nonexistent"
    env.pop("XDG_CACHE_HOME", None)
    out = run_as_nobody(code, env=env)
    assert out.returncode == 0, out.stderr
    folder, owner = out.stdout.split("\n")[:2]
    uid, mode = owner.split()
    assert int(uid) == 65534 and mode == "0o700", out.stdout
    cached = [name for _, _, names in os.walk(folder) for name in names if name.endswith(".nbi")]
    assert any("kernels" in name for name in cached) and any("preprocess" in name for name in cached), cached
