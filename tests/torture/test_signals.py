"""Signals: stops asked for at any moment, stops that cannot be refused, and a second watcher.

- SIGTERM, SIGINT and SIGHUP at seeded times, half of them during start-up
  (before READY), half while a burst arrives: each must drain and exit 0,
  and every part committed by then must have its sinks done. Start-up
  begins once the interpreter itself has started (twice the time
  ``python -c pass`` takes here): no program can catch a signal before its
  interpreter runs any of its code.
- kill -9 at seeded times during bursts, ``count`` times over the same
  folder, invoked alternately with relative paths (from the work folder) and
  absolute ones, as a service and an operator would: after a final clean
  run the promise holds (replayed sinks included; stored paths absolute).
- Two watchers on one folder with the same ledger and results file (a
  service started twice): either the second refuses to start, or the two
  together keep the promise.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.runtime.test_watch_crash import feed
from tests.torture.harness import READY_S, ROOT, STOP_S, Torture, describe_exit, scenario, sinks_pending
from tests.torture.promise import fs

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


def interpreter_start() -> float:
    """Twice the longest of three starts of a bare interpreter here, in seconds: before that, a signal
    finds no code of the program to catch it."""
    times = []
    for _ in range(3):
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - start)
    return 2 * max(times)


def stage(run: Torture, tag: str, n: int, ng_share: float = 0.4) -> tuple:
    """``n`` parts written to ``scratch/<tag>/``, ready for :func:`feed`; (folder, name -> content)."""
    staging = run.scratch / tag
    staging.mkdir()
    contents = {}
    for k in range(n):
        data = run.part(run.rng.random() < ng_share)
        (staging / f"{tag}-{k:03d}.png").write_bytes(data)
        contents[f"{tag}-{k:03d}.png"] = data
    return staging, contents


@scenario(short=6)
def test_signals_at_random_times(run):
    """``count`` trials on one folder, each a new watcher stopped by a seeded signal at a seeded time while
    5 to 15 parts arrive; trials alternate between start-up (0 to 0.8 s after the process starts, but not
    before the interpreter has started: see :func:`interpreter_start`) and
    running (0 to 1.5 s after READY)."""
    earliest = interpreter_start()
    folder, heat, results = run.folder(), run.dir / "heat", run.dir / "verdicts.jsonl"
    ledger = run.ledger_of(folder)
    args = ["--settle", "0.3", "--sort", "--heatmaps", heat, "--results", results]
    order = list(SIGNALS)
    run.rng.shuffle(order)
    expected = {}
    for i in range(run.count):
        signum = order[i % len(order)]
        staging, contents = stage(run, f"t{i}", run.rng.randint(5, 15))
        expected |= {fs(folder / name): data for name, data in contents.items()}
        watch = run.watch(folder, *args, ready=False, name=f"trial-{i}")
        if i % 2 == 0:
            writer = feed(staging, folder, pause=0.02)
            time.sleep(max(earliest, run.rng.uniform(0.0, 0.8)))
        else:
            if not watch.ready(READY_S):
                run.violations.append(f"trial {i + 1}: the watcher never reported READY "
                                      f"({describe_exit(watch.exited(0.5))}): {watch.tail()}")
                continue
            writer = feed(staging, folder, pause=0.02)
            time.sleep(run.rng.uniform(0.0, 1.5))
        when = time.monotonic() - watch.started
        phase = "after READY" if watch.heard("READY=1") else "before READY"
        watch.signal(signum)
        code = watch.exited(STOP_S)
        writer.join(60)
        what = f"trial {i + 1}: {signum.name} {when:.2f} s after start ({phase})"
        if code is None:
            run.violations.append(f"{what}: still running {STOP_S:.0f} s later")
            watch.close()
        elif code != 0:
            run.violations.append(f"{what}: {describe_exit(code)}, expected exit code 0 after draining: "
                                  f"{watch.tail(1)}")
        waiting = sinks_pending(ledger)
        run.expect(not waiting, f"{what}: {len(waiting)} committed row(s) left with sinks pending at exit "
                                f"({', '.join(sorted(set(waiting.values())))})")
    run.clean_run(folder, *args, expect_rows=len(expected))
    run.promise(folder, ledger, results, expected, sort=True, heatmaps=heat)


@scenario(short=4)
def test_kill_9_during_bursts(run):
    """``count`` watchers on one folder, each killed (SIGKILL) at a seeded 0.05 to 1.5 s into a burst of 10
    to 30 parts, each started with relative or absolute paths (a seeded choice); then a clean run."""
    folder, heat, results = run.folder(), run.dir / "heat", run.dir / "verdicts.jsonl"
    relative = ["in", "--settle", "0.3", "--sort", "--heatmaps", "heat", "--results", "verdicts.jsonl"]
    absolute = [folder, "--settle", "0.3", "--sort", "--heatmaps", heat, "--results", results]
    expected = {}
    for i in range(run.count):
        staging, contents = stage(run, f"k{i}", run.rng.randint(10, 30))
        expected |= {fs(folder / name): data for name, data in contents.items()}
        if run.rng.random() < 0.5:
            watch = run.watch(*relative, cwd=run.dir, name=f"kill-{i}-relative")
        else:
            watch = run.watch(*absolute, cwd=ROOT, name=f"kill-{i}-absolute")
        writer = feed(staging, folder, pause=0.005)
        time.sleep(run.rng.uniform(0.05, 1.5))
        watch.proc.kill()
        watch.exited(STOP_S)
        writer.join(60)
    run.clean_run(*absolute, expect_rows=len(expected), ledger=run.ledger_of(folder))
    run.promise(folder, run.ledger_of(folder), results, expected, sort=True, heatmaps=heat, cwd=run.dir)


@scenario(short=30)
def test_two_watchers_on_one_folder(run):
    """Two watchers started on one folder, same ledger and results file; ``count`` parts arrive."""
    folder, results = run.folder(), run.dir / "verdicts.jsonl"
    args = ["--settle", "0.3", "--sort", "--results", results]
    first = run.watch(folder, *args, name="first")
    second = run.watch(folder, *args, ready=False, name="second")
    if not second.ready(READY_S):
        code = second.exited(1.0)
        run.expect(code not in (None, 0), f"the second watcher neither started nor refused: {describe_exit(code)}")
    staging, contents = stage(run, "both", run.count)
    expected = {fs(folder / name): data for name, data in contents.items()}
    feed(staging, folder, pause=0.01).join(60)
    run.wait_verdicts(run.ledger_of(folder), process=first, expected=expected)
    time.sleep(1.0)  # the other watcher's late verdicts
    run.stop(first, context="the first watcher")
    if second.alive:
        run.stop(second, context="the second watcher")
    run.clean_run(folder, *args, expect_rows=len(expected))
    run.promise(folder, run.ledger_of(folder), results, expected, sort=True)
