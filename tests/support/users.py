"""Run a Python snippet as another user (``nobody``), for the faults only a non-root user meets.

The interpreter may live under a folder only root can enter (``/root/.pyenv``):
:func:`traversable` lets every user pass through the folders on the way to the
interpreter and the repository (``o+x``, not ``o+r``) for the test's duration,
and puts their modes back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def traversable(*paths: str | os.PathLike):
    """Make every folder above ``paths`` enterable by other users, then restore the modes."""
    changed: dict[Path, int] = {}
    try:
        for path in paths:
            for folder in Path(os.path.realpath(path)).parents:
                mode = folder.stat().st_mode
                if folder not in changed and not mode & stat.S_IXOTH:
                    changed[folder] = mode
                    folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        yield
    finally:
        for folder, mode in changed.items():
            folder.chmod(stat.S_IMODE(mode))


def run_as_nobody(code: str, *, env: dict | None = None, timeout: float = 120, cwd=ROOT,
                  reach: tuple = ()) -> subprocess.CompletedProcess:
    """``python -c code`` as the user ``nobody``, from the repository root; ``reach``: more paths it must get to."""
    with traversable(sys.executable, ROOT / "edge_inspect", *reach):
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **(env or {})},
                              user="nobody", group="nogroup", extra_groups=[], capture_output=True, text=True,
                              timeout=timeout)
