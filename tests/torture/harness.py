"""What every torture scenario uses: the watcher as a real process, writers as real processes, seeded parts.

A scenario is a function ``scenario(run, **params)`` registered with
:func:`scenario`; ``run`` is a :class:`Torture`: a work folder, the model,
the seed and the count, and the list of violations the scenario finds. The
same function runs as a pytest test (``tests/torture/test_*.py``, a short
seeded slice) and from ``benchmarks/torture.py`` (the long variants).

    @scenario(short=3, mode=["events", "poll"])
    def test_something(run, mode):
        folder = run.folder()
        watch = run.watch(folder, *MODES[mode])
        ...
        run.stop(watch)
        run.promise(folder, run.ledger_of(folder), expected_files=...)

A scenario records what broke (:meth:`Torture.expect`, :meth:`Torture.promise`)
and goes on, so that one failure lists every broken promise; it raises
:class:`Broken` only when it cannot go on (a watcher that never starts).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.runtime.test_watch_crash import NotifySocket
from tests.support import make_part
from tests.torture.launch import console_script
from tests.torture.promise import check_promise, fs

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("writer.py")

#: A watcher must report READY within this (seconds; a loaded CI machine is slow, today's start takes ~1 s).
READY_S = 60.0
#: A verdict is in well before this many seconds without a new one, once the files are complete.
QUIET_S = 4.0
#: The longest wait for verdicts, whatever happens.
LIMIT_S = 90.0
#: A watcher that lost its folder or ledger must exit within this many seconds.
GONE_S = 10.0
#: A signalled watcher must have exited within this many seconds.
STOP_S = 30.0

#: The hot folder's settle time in these scenarios, and the watch flags of each mode.
SETTLE_S = 0.5
MODES = {"events": ["--settle", str(SETTLE_S)], "poll": ["--poll", "0.2", "--settle", str(SETTLE_S)]}


class Broken(Exception):
    """The scenario cannot go on; the message says why (it counts as a violation)."""


# ------------------------------------------------------------------ registry


@dataclass
class Registered:
    """A scenario as the long runner sees it: the function, its short count, its parameter grid."""

    name: str
    function: Callable
    short: int
    grid: dict[str, list] = field(default_factory=dict)

    def variants(self) -> list[dict]:
        combos = [{}]
        for key, values in self.grid.items():
            combos = [{**c, key: v} for c in combos for v in values]
        return combos


#: Every scenario, by test name.
SCENARIOS: dict[str, Registered] = {}


def scenario(short: int, **grid: list):
    """Register a torture test: ``short`` is its count in the default slice, ``grid`` its parameters.

    The test runs once per combination of the grid's values (pytest
    parametrisation) and per seed; it ends by raising ``AssertionError``
    with every violation its :class:`Torture` collected.
    """
    def wrap(function):
        @functools.wraps(function)
        def test(run: Torture, **params):
            try:
                function(run, **params)
            except Broken as exc:
                run.violations.append(f"scenario stopped: {exc}")
            except BaseException as exc:
                if run.violations:
                    exc.add_note("Violations found before this error:\n" + run.summary())
                raise
            finally:
                run.close()
            if run.violations:
                raise AssertionError(run.summary())

        test.torture_short = short
        for key, values in grid.items():
            test = pytest.mark.parametrize(key, values)(test)
        SCENARIOS[function.__name__] = Registered(function.__name__, function, short, dict(grid))
        return test
    return wrap


# ------------------------------------------------------------------ processes


class WatchProcess:
    """``edge-inspect watch ARGS`` as a child process, heard through its own sd_notify socket.

    It runs the console script's entry point (``launch.console_script``);
    ``rescan`` runs it through ``launch.py`` as a script, which sets the hot folder's
    safety rescan interval (set through the environment: no flag sets it). ``prefix`` comes before the
    interpreter (``setpriv ...``). The output goes to ``log`` (a file: a
    full pipe would block the watcher).
    """

    def __init__(self, args, *, log: Path, cwd=ROOT, env: dict | None = None, prefix=(), rescan: float | None = None):
        self.notify = NotifySocket()
        self.log = log
        self.started = time.monotonic()
        entry = ["-c", console_script()]
        environment = {**os.environ, "NOTIFY_SOCKET": self.notify.address, "COLUMNS": "200",
                       "PYTHONPATH": str(ROOT), **(env or {})}
        if rescan is not None:
            # The safety rescan is a configuration key of watch's one source (sources.watch.rescan).
            environment["EDGE_INSPECT_SOURCES__WATCH__RESCAN"] = str(rescan)
        self.command = [*prefix, sys.executable, *entry, "watch", *args]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.command, cwd=cwd, env=environment, stdout=out, stderr=out)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def heard(self, text: str) -> bool:
        return any(text in m for m in list(self.notify.messages))

    def ready(self, timeout: float = READY_S) -> bool:
        """Wait for READY=1; False when the process exits or the time is up first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.heard("READY=1"):
                return True
            if not self.alive:
                time.sleep(0.1)  # a datagram sent just before the exit
                return self.heard("READY=1")
            time.sleep(0.02)
        return False

    def exited(self, timeout: float) -> int | None:
        """The exit code, or None if it still runs after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, signum: int) -> None:
        if self.alive:
            self.proc.send_signal(signum)

    def output(self) -> str:
        try:
            return self.log.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = 3) -> str:
        """The last lines of its output, for a message."""
        text = [t for t in self.output().splitlines() if t.strip()]
        return " | ".join(t.strip()[:300] for t in text[-lines:]) or "(no output)"

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(timeout=STOP_S)
        try:
            self.notify.close()
        except OSError:
            pass


def unignore_signals() -> None:
    """Stop ignoring SIGHUP, SIGINT and SIGTERM, if this process inherited that (``nohup``, a background job):
    the watchers would inherit it too, and the signal scenarios would test the shell, not the watcher."""
    defaults = {signal.SIGHUP: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler,
                signal.SIGTERM: signal.SIG_DFL}
    for signum, handler in defaults.items():
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, handler)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Writer:
    """A writer process following a plan (see ``writer.py``); ``versions`` are the complete contents it writes."""

    def __init__(self, run: Torture, target: bytes, versions: list[bytes], steps: list[list]):
        self.target, self.versions = target, versions
        sources = []
        for k, data in enumerate(versions):
            source = run.scratch / f"writer-{run.next_id()}-{k}"
            source.write_bytes(data)
            sources.append(os.fsdecode(source))
        plan = run.scratch / f"plan-{run.next_id()}.json"
        plan.write_text(json.dumps({"target": os.fsdecode(target), "versions": sources, "steps": steps}))
        self.proc = subprocess.Popen([sys.executable, "-S", str(WRITER), str(plan)], stderr=subprocess.PIPE)
        run.writers.append(self)

    def join(self, timeout: float = LIMIT_S) -> str | None:
        """Wait for the plan to be done; what went wrong, or None."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return f"writer of {self.target!r} did not finish in {timeout:.0f} s"
        if self.proc.returncode != 0:
            return f"writer of {self.target!r} failed: {err.decode(errors='replace').strip()[-300:]}"
        return None


# ------------------------------------------------------------------ the run


class Torture:
    """One scenario's run: work folder, model, seed, count, and the violations found.

    Args:
        workdir: an empty folder of its own.
        model: the exported model folder (not modified).
        seed: seeds every random choice of the scenario.
        count: how many of its units the scenario runs (files, writers, kills...).
    """

    def __init__(self, workdir: Path, model: Path, seed: int, count: int):
        self.dir = Path(workdir)
        self.model = Path(model)
        self.seed, self.count = seed, count
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.violations: list[str] = []
        self.watchers: list[WatchProcess] = []
        self.writers: list[Writer] = []
        self.cleanups: list[Callable] = []
        self._contexts = contextlib.ExitStack()
        self.scratch = self.dir / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        unignore_signals()
        (self.dir / "logs").mkdir(exist_ok=True)
        self._ids = 0

    def enter(self, context):
        """Enter a context manager (a mounted tmpfs...) until the run closes; what it yields."""
        return self._contexts.enter_context(context)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # ---------------------------------------------------------- verdicts

    def expect(self, condition, message: str) -> bool:
        """Record ``message`` as a violation unless ``condition`` holds."""
        if not condition:
            self.violations.append(message)
        return bool(condition)

    def promise(self, folder, ledger, jsonl=None, expected_files=None, *, context: str = "", **kwargs) -> list[str]:
        """Run :func:`check_promise` and record what it finds."""
        found = check_promise(folder, ledger, jsonl, expected_files, **kwargs)
        self.violations += [f"{context}: {v}" if context else v for v in found]
        return found

    def summary(self, limit: int = 40) -> str:
        lines = self.violations
        head = f"{len(lines)} broken promise(s), seed {self.seed}, count {self.count}"
        shown = [f"  - {v}" for v in lines[:limit]]
        if len(lines) > limit:
            shown.append(f"  ... and {len(lines) - limit} more")
        return "\n".join([head, *shown])

    # ---------------------------------------------------------- files

    def folder(self, name: str = "in") -> Path:
        path = self.dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def ledger_of(folder) -> Path:
        return Path(folder) / ".edge-inspect" / "ledger.sqlite"

    def part(self, ng: bool | None = None, size: int = 32) -> bytes:
        """PNG bytes of a seeded synthetic part; NG (a scratch, which the tiny model flags) when ``ng``,
        by a 30 % draw when None."""
        if ng is None:
            ng = self.rng.random() < 0.3
        image, _ = make_part(self.np_rng, size, "scratch" if ng else None)
        ok, encoded = cv2.imencode(".png", image)
        assert ok
        return encoded.tobytes()

    def drop(self, folder, name, data: bytes) -> bytes:
        """Write ``data`` under a hidden name in ``folder`` and rename it to ``name``: complete on arrival."""
        top = os.fsencode(os.path.abspath(folder))
        temporary = os.path.join(top, b".drop-%d" % self.next_id())
        with open(temporary, "wb") as handle:
            handle.write(data)
        target = os.path.join(top, os.fsencode(name))
        os.rename(temporary, target)
        return target

    def write(self, target, versions: list[bytes], steps: list[list]) -> Writer:
        """Start a writer process (see ``writer.py``)."""
        return Writer(self, os.fsencode(os.path.abspath(target)), versions, steps)

    def join_writers(self) -> None:
        for writer in self.writers:
            problem = writer.join()
            if problem:
                raise Broken(problem)
        self.writers.clear()

    # ---------------------------------------------------------- watchers

    def watch(self, folder, *args, ready: bool = True, name: str = "watch", **kwargs) -> WatchProcess:
        """Start ``edge-inspect watch FOLDER --model M ARGS``; with ``ready``, wait for READY=1 or raise Broken."""
        process = WatchProcess([os.fspath(folder), "--model", str(self.model), *map(os.fspath, args)],
                               log=self.dir / "logs" / f"{name}-{self.next_id()}.log", **kwargs)
        self.watchers.append(process)
        if ready and not process.ready():
            code = process.exited(0.5)
            raise Broken(f"the watcher ({name}) never reported READY ({describe_exit(code)}): {process.tail()}")
        return process

    def stop(self, process: WatchProcess, signum: int = signal.SIGTERM, context: str = "") -> int | None:
        """Signal a watcher and expect exit code 0 within STOP_S; returns the code."""
        where = f"{context}: " if context else ""
        if not process.alive:
            code = process.exited(0)
            self.violations.append(f"{where}the watcher had already ended ({describe_exit(code)}) before "
                                   f"{signal.Signals(signum).name}: {process.tail()}")
            return code
        process.signal(signum)
        code = process.exited(STOP_S)
        if code is None:
            self.violations.append(f"{where}the watcher did not exit within {STOP_S:.0f} s of "
                                   f"{signal.Signals(signum).name}")
            process.close()
        elif code != 0:
            self.violations.append(f"{where}{signal.Signals(signum).name} ended the watcher with "
                                   f"{describe_exit(code)}, expected exit code 0: {process.tail()}")
        return code

    def wait_verdicts(self, ledger, n: int = 0, process: WatchProcess | None = None, quiet: float = QUIET_S,
                      limit: float = LIMIT_S, done: Callable[[], bool] | None = None, expected=None) -> int:
        """Wait until the ledger holds ``n`` rows, a verdict for the last content of each of ``expected``
        (path -> content or contents) and ``done()``; or until the watcher exits, or nothing moves for
        ``quiet`` seconds. Returns the row count reached."""
        start = last_change = time.monotonic()
        seen = -1
        wanted = set()
        for path, contents in (expected or {}).items():
            last = contents if isinstance(contents, (bytes, bytearray)) else contents[-1]
            wanted.add((fs(path), hashlib.sha256(last).hexdigest()))
        while True:
            now_count = count(ledger)
            if now_count != seen:
                seen, last_change = now_count, time.monotonic()
            if (seen >= n and (not wanted or wanted <= judged(ledger)) and (done is None or done())):
                return seen
            if process is not None and not process.alive:
                return seen
            now = time.monotonic()
            if now - last_change > quiet or now - start > limit:
                return seen
            time.sleep(0.05)

    def clean_run(self, folder, *args, expect_rows: int, context: str = "final clean run", ledger=None,
                  **kwargs) -> None:
        """Start a watcher, let it finish its backlog and replays, stop it with SIGTERM (exit 0 expected)."""
        process = self.watch(folder, *args, name="clean", **kwargs)
        ledger = ledger or self.ledger_of(folder)
        self.wait_verdicts(ledger, expect_rows, process, done=lambda: pending(ledger) == 0)
        time.sleep(0.3)  # a late duplicate event would be committed by now
        self.stop(process, context=context)

    # ---------------------------------------------------------- teardown

    def close(self) -> None:
        for process in self.watchers:
            process.close()
        for writer in self.writers:
            if writer.proc.poll() is None:
                writer.proc.kill()
                writer.proc.wait()
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception as exc:  # noqa: BLE001 - teardown goes on; the failure is still shown
                self.violations.append(f"teardown: {exc}")
        self._contexts.close()


def query(ledger, sql: str, default):
    """The rows of ``sql`` on a running watcher's ledger, read-only (a plain connect would create a ledger
    deleted under the watcher); ``default`` when it is missing or cannot be read."""
    uri = "file:" + urllib.parse.quote(os.fsdecode(os.path.abspath(ledger))) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error:
        return default
    conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return default
    finally:
        conn.close()


def count(ledger) -> int:
    """Rows in the ledger (0 when it is missing or cannot be read)."""
    return query(ledger, "SELECT count(*) FROM parts", [(0,)])[0][0]


def judged(ledger) -> set[tuple[bytes, str]]:
    """(path, sha256) of every file row in the ledger."""
    found = query(ledger, "SELECT source, sha256 FROM parts WHERE kind = 'file'", [])
    return {(s if isinstance(s, bytes) else os.fsencode(s), h) for s, h in found}


def sinks_pending(ledger) -> dict[int, str]:
    """Row id -> the sinks it still waits for."""
    return dict(query(ledger, "SELECT id, sinks_pending FROM parts WHERE sinks_pending != ''", []))


def pending(ledger) -> int:
    """Rows whose sinks have not all run."""
    return len(sinks_pending(ledger))
