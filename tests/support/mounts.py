"""Real small file systems for the tests: a tmpfs to fill up (a full disk), or to remount read-only.

As root, file modes do not stop a write (root ignores them); a read-only mount
does, for every user, as it would for a ledger on a write-protected card or a
file system the kernel remounted read-only after an error. Mounting needs root
(CAP_SYS_ADMIN); elsewhere the test is skipped and says why.

    >>> with tmpfs(tmp_path / "card") as (folder, make_read_only):
    ...     (folder / "x").write_text("...")
    ...     make_read_only()
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "16m"):
    """Mount a tmpfs on ``folder`` (created); yield ``(folder, make_read_only)``; unmount at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")

    def make_read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        probe = folder / ".write-probe"
        with pytest.raises(OSError):
            probe.write_text("")  # the mount really refuses writes, even to root

    try:
        yield folder, make_read_only
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
