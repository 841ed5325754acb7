"""Where Numba caches the compiled kernels: set up before Numba is first imported.

Import this module before ``numba`` in every module that compiles kernels
(:mod:`edge_inspect.kernels`, :mod:`edge_inspect.preprocess`).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def numba_cache_dir() -> str | None:
    """Where Numba may cache the compiled kernels for this user: None when its own choice works.

    Numba caches next to this file (``__pycache__``) or in the user's cache
    folder. A service user of an install owned by root, whose home does not
    exist, has neither, and Numba refuses to compile (``cannot cache function
    '_criteria_kernel'``). Then the first of these that is this user's alone
    and writable: ``NUMBA_CACHE_DIR`` (set by the systemd unit),
    ``$XDG_CACHE_HOME`` or ``~/.cache`` ``/edge-inspect/numba``,
    ``<tmp>/edge-inspect-numba-<uid>``, and last a new private temporary
    folder (the kernels then compile once per start).
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    in_tree = Path(__file__).parent / "__pycache__"  # the package's own, beside its kernels
    if os.access(in_tree if in_tree.exists() else in_tree.parent, os.W_OK):
        return None
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in (Path(home) / "edge-inspect" / "numba",
                   Path(tempfile.gettempdir()) / f"edge-inspect-numba-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.stat(folder, follow_symlinks=False)
        except OSError:
            continue
        # Numba's cache is unpickled: a folder another user can write to is never used.
        if (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
                and os.access(folder, os.W_OK)):
            return str(folder)
    return tempfile.mkdtemp(prefix="edge-inspect-numba-")


_CACHE_DIR = numba_cache_dir()
if _CACHE_DIR is not None:
    os.environ["NUMBA_CACHE_DIR"] = _CACHE_DIR  # read when Numba is first imported, just below


def configure() -> None:
    """Point Numba's cache at :func:`numba_cache_dir`, also when Numba was imported before this module."""
    if _CACHE_DIR is not None:
        from numba.core import config

        if not config.CACHE_DIR:
            config.CACHE_DIR = _CACHE_DIR
