"""The folder and the ledger: taken away, damaged, locked or starved while the watcher needs them.

- The watched folder removed, renamed or replaced (renamed away and a new
  one made in its place) while watched: the watcher must exit non-zero
  within GONE_S seconds, with a message naming the folder.
- The ledger deleted while running: the watcher must stop, loudly (non-zero,
  naming the ledger), within GONE_S seconds; verdicts committed to the
  deleted file are lost with it, so afterwards every file still in the
  folder must have one verdict in the new ledger.
- The ledger corrupted while stopped (seeded: garbage over a page, a page
  zeroed, two pages swapped, the file cut short, the header overwritten):
  start must refuse, non-zero, before READY, naming ``edge-inspect ledger
  recover``.
- The ledger read-only (mode 0444, the watcher without CAP_DAC_OVERRIDE so
  that root obeys the mode too; or on a file system mounted read-only):
  start must refuse, naming the ledger and saying it is not writable,
  rather than fail when the first part commits.
- The disk full (a real tmpfs holding the folder, ledger, heatmaps and
  JSONL, filled to a seeded few KB): no verdict lost, and once space returns
  the sinks complete without a restart.
- The watcher as an unprivileged user (uid 65534, no home), as a
  service's dedicated user runs it.

After each, a clean run and the promise check.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.mounts import tmpfs
from tests.support.users import traversable
from tests.torture.harness import (GONE_S, READY_S, Torture, describe_exit, judged, pending, scenario,
                                   sinks_pending)
from tests.torture.promise import fs

RESULTS = "verdicts.jsonl"
#: Root obeys file modes without these capabilities (``setpriv`` drops them from the bounding set).
NO_DAC_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
NOBODY = 65534
#: Once space returns, the verdicts and their sinks must be complete within this many seconds.
SPACE_BACK_S = 10.0


def drop_parts(run: Torture, folder, prefix: str, n: int, ng: bool | None = None) -> dict[bytes, bytes]:
    """``n`` parts renamed into ``folder``; path -> content."""
    dropped = {}
    for k in range(n):
        data = run.part(ng)
        dropped[run.drop(folder, f"{prefix}-{k}.png", data)] = data
    return dropped


def expect_exit(run: Torture, watch, what: str, names: str, offset: int, started: float) -> None:
    """The watcher must exit non-zero within GONE_S of ``what``, naming ``names`` after ``offset`` of its output."""
    code = watch.exited(max(0.0, GONE_S - (time.monotonic() - started)))
    took = time.monotonic() - started
    said = watch.output()[offset:]
    if code is None:
        run.violations.append(f"{what}: the watcher was still running {GONE_S:.0f} s later; it must exit non-zero "
                              f"naming {names}")
    elif code == 0:
        run.violations.append(f"{what}: the watcher exited 0 after {took:.1f} s; expected a non-zero exit code")
    elif names not in said:
        run.violations.append(f"{what}: the watcher exited ({describe_exit(code)}, {took:.1f} s) without naming "
                              f"{names}: {watch.tail(2)}")
    watch.close()


# ------------------------------------------------------------------ the folder


@scenario(short=3, how=["removed", "renamed", "replaced"])
def test_folder_lost_while_running(run, how):
    """``count`` parts inspected, then the folder goes; afterwards ``count`` more in the folder restored."""
    folder, ledger, results = run.folder(), run.dir / "ledger.sqlite", run.dir / RESULTS
    args = ["--settle", "0.5", "--ledger", ledger, "--results", results]
    watch = run.watch(folder, *args)
    expected = drop_parts(run, folder, "before", run.count)
    run.wait_verdicts(ledger, process=watch, expected=expected)
    aside, offset, started = run.dir / "in.aside", len(watch.output()), time.monotonic()
    if how == "removed":
        shutil.rmtree(folder)
    else:
        os.rename(folder, aside)
        if how == "replaced":
            folder.mkdir()
            expected |= drop_parts(run, folder, "into-the-new-folder", run.count)
    expect_exit(run, watch, f"the watched folder was {how}", str(folder), offset, started)
    if how == "removed":
        folder.mkdir()
    elif how == "renamed":
        os.rename(aside, folder)
    expected |= drop_parts(run, folder, "after", run.count)
    run.clean_run(folder, *args, expect_rows=len(expected), ledger=ledger)
    run.promise(folder, ledger, results, expected)


# ------------------------------------------------------------------ the ledger


@scenario(short=3)
def test_ledger_deleted_while_running(run):
    """``count`` parts inspected, the ledger (and its -wal, -shm) deleted, ``count`` more dropped."""
    folder = run.folder()
    ledger = run.ledger_of(folder)
    watch = run.watch(folder, "--settle", "0.5")
    expected = drop_parts(run, folder, "before", run.count)
    run.wait_verdicts(ledger, process=watch, expected=expected)
    offset, started = len(watch.output()), time.monotonic()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    expected |= drop_parts(run, folder, "after", run.count)
    expect_exit(run, watch, "the ledger was deleted while running", str(ledger), offset, started)
    # The verdicts went with the deleted file: the new ledger must judge every file in the folder once.
    run.clean_run(folder, "--settle", "0.5", expect_rows=len(expected))
    run.promise(folder, ledger, None, expected)


PAGE = 4096


def corrupt(data: bytes, kind: str, rng) -> tuple[bytes, str]:
    """``data`` damaged in a seeded way; the damaged bytes and what was done."""
    pages = len(data) // PAGE
    buf = bytearray(data)
    if kind == "garbage":
        page = rng.randint(2, pages)
        start = (page - 1) * PAGE + rng.randint(0, PAGE - 512)
        size = rng.randint(64, 512)
        buf[start:start + size] = rng.randbytes(size)
        return bytes(buf), f"{size} random bytes over page {page} of {pages}"
    if kind == "zeroed":
        page = rng.randint(2, pages)
        buf[(page - 1) * PAGE:page * PAGE] = bytes(PAGE)
        return bytes(buf), f"page {page} of {pages} zeroed"
    if kind == "swapped":
        a, b = rng.sample(range(2, pages + 1), 2)
        pa, pb = buf[(a - 1) * PAGE:a * PAGE], buf[(b - 1) * PAGE:b * PAGE]
        buf[(a - 1) * PAGE:a * PAGE], buf[(b - 1) * PAGE:b * PAGE] = pb, pa
        return bytes(buf), f"pages {a} and {b} of {pages} swapped"
    if kind == "truncated":
        size = rng.randint(PAGE + 1, len(data) - 1)
        return bytes(buf[:size]), f"cut to {size} of {len(data)} bytes"
    start = rng.randint(16, 90)
    buf[start:start + 10] = rng.randbytes(10)
    return bytes(buf), f"header bytes {start}..{start + 10} overwritten"


def fails_integrity(data: bytes, scratch: Path) -> bool:
    """Whether SQLite finds ``data`` damaged (checked on a copy)."""
    copy = scratch / "integrity-probe.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{copy}{suffix}").unlink(missing_ok=True)
    copy.write_bytes(data)
    try:
        conn = sqlite3.connect(copy)
        try:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            conn.execute("SELECT count(*) FROM parts").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return True
    return result != ["ok"]


@scenario(short=3)
def test_corrupt_ledger_refused_at_start(run):
    """A ledger of 40 verdicts, stopped cleanly, then ``count`` seeded corruptions, one start each."""
    folder = run.folder()
    ledger = run.ledger_of(folder)
    expected = drop_parts(run, folder, "part", 40)
    run.clean_run(folder, "--settle", "0.5", expect_rows=len(expected), context="building the ledger")
    pristine = ledger.read_bytes()
    kinds = ["garbage", "zeroed", "swapped", "truncated", "header"]
    run.rng.shuffle(kinds)
    for i in range(run.count):
        for _ in range(20):
            damaged, how = corrupt(pristine, kinds[i % len(kinds)], run.rng)
            if fails_integrity(damaged, run.scratch):
                break
        else:
            raise AssertionError(f"20 draws of {kinds[i % len(kinds)]} all left the ledger intact")
        for suffix in ("-wal", "-shm"):
            Path(f"{ledger}{suffix}").unlink(missing_ok=True)
        ledger.write_bytes(damaged)
        what = f"corruption {i + 1} ({how})"
        watch = run.watch(folder, "--settle", "0.5", ready=False, name=f"corrupt-{i}")
        if watch.ready(READY_S):
            run.violations.append(f"{what}: the watcher started (READY=1) on a ledger that fails "
                                  f"PRAGMA integrity_check")
            watch.close()
            continue
        code = watch.exited(5.0)
        if code is None or code == 0 or "edge-inspect ledger recover" not in watch.output():
            run.violations.append(f"{what}: the watcher ended with {describe_exit(code)} without naming "
                                  f"`edge-inspect ledger recover`: {watch.tail(2)}")
        watch.close()
    ledger.write_bytes(pristine)
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    run.promise(folder, ledger, None, expected)


@scenario(short=3, how=["mode", "mount"])
def test_read_only_ledger(run, how):
    """A ledger of ``count`` verdicts made read-only, one more part dropped, then a start; then the ledger
    writable again and a clean run. ``mode``: the file's mode 0444, the watcher without CAP_DAC_OVERRIDE (root
    obeys the mode too); ``mount``: the ledger (``--ledger``) on a tmpfs remounted read-only, as a file system
    the kernel remounted after an error."""
    folder = run.folder()
    args, prefix = ["--settle", "0.5"], []
    if how == "mode":
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is missing: root cannot be made to obey a file's mode without it")
        ledger, prefix = run.ledger_of(folder), NO_DAC_OVERRIDE
    else:
        card, make_read_only = run.enter(tmpfs(run.dir / "card", "4m"))
        ledger = card / "ledger.sqlite"
        args += ["--ledger", ledger]
    expected = drop_parts(run, folder, "part", run.count)
    run.clean_run(folder, *args, expect_rows=len(expected), ledger=ledger, context="building the ledger")
    if how == "mode":
        ledger.chmod(0o444)
    else:
        make_read_only()
    expected |= drop_parts(run, folder, "waiting", 1)
    watch = run.watch(folder, *args, ready=False, prefix=prefix, name="read-only")
    what = f"with its ledger read-only ({'mode 0444' if how == 'mode' else 'a read-only mount'})"
    started = time.monotonic()
    if watch.ready(GONE_S):
        code = watch.exited(GONE_S)
        run.violations.append(f"{what} the watcher started (READY=1) instead of refusing; then "
                              f"{describe_exit(code)} ({time.monotonic() - started:.1f} s after start): "
                              f"{watch.tail(1)}")
    else:
        code, said = watch.exited(1.0), watch.output()
        run.expect(code not in (None, 0) and str(ledger) in said and ("writable" in said or "read-only" in said),
                   f"{what} the watcher ended with {describe_exit(code)} without naming the ledger {ledger} as "
                   f"not writable: {watch.tail(2)}")
    watch.close()
    if how == "mode":
        ledger.chmod(0o644)
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(card)], check=True, capture_output=True)
    run.clean_run(folder, *args, expect_rows=len(expected), ledger=ledger)
    run.promise(folder, ledger, None, expected)


# ------------------------------------------------------------------ the disk


def fill(path: Path, leave: int) -> None:
    """Fill the file system of ``path`` with one file, then free ``leave`` bytes of it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for block in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, bytes(block))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


@scenario(short=2, full=["everything", "sinks"])
def test_disk_full(run, full):
    """A tmpfs holds the folder, ledger, heatmaps and JSONL (``everything``), or the heatmaps and JSONL
    only (``sinks``: a separate data partition); ``count`` times: fill it to a seeded few KB of free space,
    drop 1 to 4 parts, wait, give the space back, and expect every verdict and its sinks within SPACE_BACK_S (a
    watcher that exits is restarted once, and its exit must be non-zero and say why). The watcher is started
    with paths relative to the work folder; the final clean run, with absolute ones from elsewhere."""
    # Room for every overlay the run writes (up to 4 parts a trial; a small part's overlay, enlarged to be read,
    # is about 0.3 MB) besides the filler: the space given back must be free, not taken by earlier overlays.
    disk, _ = run.enter(tmpfs(run.dir / "disk", f"{4 + 2 * run.count}m"))
    heat, results = disk / "heat", disk / RESULTS
    place = disk if full == "everything" else run.dir
    folder, staging = place / "in", place / "staging"  # same file system: renames
    folder.mkdir()
    staging.mkdir()
    ledger = run.ledger_of(folder)
    args = ["--settle", "0.3", "--sort", "--heatmaps", heat, "--results", results]
    # As an operator would start it, from the work folder; the final clean run as a service would, absolute.
    relative = [os.path.relpath(p, run.dir) if isinstance(p, Path) else p for p in [folder, *args]]
    staged = []
    for k in range(4 * run.count + 2):
        path = staging / f"part-{k}.png"
        path.write_bytes(run.part(ng=k % 2 == 0))
        staged.append(path)
    expected: dict[bytes, bytes] = {}

    def bring(n: int) -> None:
        for _ in range(n):
            source = staged.pop(0)
            data = source.read_bytes()
            os.rename(source, folder / source.name)
            expected[fs(folder / source.name)] = data

    watch = run.watch(*relative, cwd=run.dir)
    bring(2)
    run.wait_verdicts(ledger, process=watch, expected=expected, done=lambda: pending(ledger) == 0)
    filler = disk / "filler"
    for i in range(run.count):
        leave = run.rng.choice([0, 512, 4096, run.rng.randint(1, 48) * 1024])
        what = f"full disk {i + 1} ({leave} bytes free)"
        fill(filler, leave)
        offset = len(watch.output())
        bring(run.rng.randint(1, 4))
        run.wait_verdicts(ledger, process=watch, expected=expected, quiet=2.0, limit=10.0)
        filler.unlink()
        restarts = 0
        for _ in range(2):  # a watcher that exits is restarted, once
            if not watch.alive:
                code, said = watch.exited(0), watch.output()[offset:].lower()
                run.expect(code != 0, f"{what}: the watcher exited 0 on a full disk")
                run.expect(code == 0 or "space" in said or "full" in said,
                           f"{what}: the watcher ended ({describe_exit(code)}) without saying the disk is full: "
                           f"{watch.tail(2)}")
                watch, restarts = run.watch(*relative, cwd=run.dir, name="after-full"), restarts + 1
                offset = 0
            run.wait_verdicts(ledger, process=watch, expected=expected, done=lambda: pending(ledger) == 0,
                              quiet=SPACE_BACK_S, limit=SPACE_BACK_S)
            if watch.alive:
                break
        missing = sum(1 for p, d in expected.items() if (p, hashlib.sha256(d).hexdigest()) not in judged(ledger))
        waiting = sinks_pending(ledger)
        run.expect(not missing and not waiting,
                   f"{what}: {SPACE_BACK_S:.0f} s after the space returned, {missing} file(s) without a verdict and "
                   f"{len(waiting)} row(s) still waiting for sinks {sorted(set(waiting.values()))} "
                   f"({'the watcher ran throughout' if not restarts else 'after a restart of the watcher'})")
    run.stop(watch, context="after the full disks")
    run.clean_run(folder, *args, expect_rows=len(expected))
    run.promise(folder, ledger, results, expected, sort=True, heatmaps=heat, cwd=run.dir)


# ------------------------------------------------------------------ the user


@scenario(short=3)
def test_as_an_unprivileged_user(run):
    """The watcher as uid 65534 with no home (HOME=/nonexistent), as a service's dedicated user: ``count``
    parts, then a stop."""
    base = Path(tempfile.mkdtemp(prefix="torture-user-", dir="/tmp"))
    run.cleanups.append(lambda: shutil.rmtree(base, ignore_errors=True))
    base.chmod(0o755)
    model = base / "model"
    shutil.copytree(run.model, model)
    folder = base / "in"
    folder.mkdir()
    for path in [base, *base.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    run.model = model
    with traversable(os.path.realpath(sys.executable), Path(__file__).resolve().parents[2] / "edge_inspect"):
        watch = run.watch(folder, "--settle", "0.5", ready=False, prefix=prefix, cwd="/",
                          env={"HOME": "/nonexistent"}, name="nobody")
        if not watch.ready(READY_S):
            run.violations.append(f"as uid {NOBODY} with no home, the watcher did not start "
                                  f"({describe_exit(watch.exited(1.0))}): {watch.tail(1)}")
            return
        expected = {}
        for k in range(run.count):
            data = run.part()
            path = run.drop(folder, f"part-{k}.png", data)
            os.chown(path, NOBODY, NOBODY)
            expected[path] = data
        run.wait_verdicts(run.ledger_of(folder), process=watch, expected=expected)
        run.stop(watch, context=f"as uid {NOBODY}")
    run.promise(folder, run.ledger_of(folder), None, expected)
