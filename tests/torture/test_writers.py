"""Writers: files that are not complete when they first appear.

Each writer is a process of its own (``writer.py``) writing straight into the
watched folder, the way cameras and copy tools do, at seeded speeds. The
promise: each file gets a verdict on its complete content only, once per
content (a rewritten file may get one per complete version), and none is
lost. Every scenario runs in event mode (inotify, the default) and poll mode
(``--poll``), with ``--settle`` 0.5 s.

``test_writer_across_the_rescan`` needs the event mode's safety rescan to
come within seconds; no flag sets it (60 s), so that scenario starts the CLI
through ``launch.py``, which changes the ``rescan`` default of the hot folder.
"""

from __future__ import annotations

import signal
import time

from tests.torture.harness import MODES, SETTLE_S, Torture, scenario

RESULTS = "verdicts.jsonl"


def chunked(run: Torture, version: int, size: int, chunks: int, pause: tuple[float, float]) -> list[list]:
    """Steps writing one version in ``chunks`` pieces, sleeping a seeded time in ``pause`` between them."""
    cuts = sorted(run.rng.sample(range(1, size), min(chunks - 1, size - 1)))
    steps = []
    for start, end in zip([0, *cuts], [*cuts, size]):
        if steps:
            steps.append(["sleep", run.rng.uniform(*pause)])
        steps.append(["write", version, start, end])
    return steps


def steady(run: Torture, data: bytes) -> list[list]:
    """Open, write in 4 to 10 chunks with pauses well under the settle time, close."""
    return [["open", "w"], *chunked(run, 0, len(data), run.rng.randint(4, 10), (0.02, SETTLE_S / 4)), ["close"]]


def pausing(run: Torture, data: bytes, pause: float, wait_for: str | None = None) -> list[list]:
    """Open, write a seeded part, pause ``pause`` seconds (or until ``wait_for`` exists), write the rest, close."""
    cut = run.rng.randint(len(data) // 5, 4 * len(data) // 5)
    hold = ["wait", wait_for, 60] if wait_for else ["sleep", pause]
    return [["open", "w"], ["write", 0, 0, cut], hold, ["write", 0, cut, len(data)], ["close"]]


#: Writers at once: the long runs go in waves of this many.
WAVE = 8


def waves(run: Torture) -> list[range]:
    """The writer indices ``0..count-1``, in waves of at most WAVE."""
    return [range(k, min(k + WAVE, run.count)) for k in range(0, run.count, WAVE)]


def start(run: Torture, mode: str, name: str = "watch", **kwargs):
    folder = run.folder()
    return folder, run.watch(folder, *MODES[mode], "--results", run.dir / RESULTS, name=name, **kwargs)


def finish(run: Torture, folder, watch, expected: dict) -> None:
    """Wait for the writers and the verdicts, stop the watcher (exit 0), check the promise."""
    run.join_writers()
    run.wait_verdicts(run.ledger_of(folder), process=watch, expected=expected)
    run.stop(watch)
    run.promise(folder, run.ledger_of(folder), run.dir / RESULTS, expected)


@scenario(short=4, mode=list(MODES))
def test_slow_writers(run, mode):
    """``count`` writers, up to 8 at once, each writing in chunks with pauses shorter than the settle time."""
    folder, watch = start(run, mode)
    expected = {}
    for wave in waves(run):
        for k in wave:
            data, path = run.part(size=64), folder / f"slow-{k}.png"
            run.write(path, [data], [["sleep", run.rng.uniform(0, 0.5)], *steady(run, data)])
            expected[path] = data
        run.join_writers()
    finish(run, folder, watch, expected)


@scenario(short=4, mode=list(MODES))
def test_writers_pausing_longer_than_settle(run, mode):
    """``count`` writers, up to 8 at once, each pausing once mid-file for 2 to 3 times the settle time (a
    stalled network copy)."""
    folder, watch = start(run, mode)
    expected = {}
    for wave in waves(run):
        for k in wave:
            data, path = run.part(size=64), folder / f"pause-{k}.png"
            run.write(path, [data], pausing(run, data, run.rng.uniform(2, 3) * SETTLE_S))
            expected[path] = data
        run.join_writers()
    finish(run, folder, watch, expected)


@scenario(short=4, mode=list(MODES))
def test_writers_busy_at_start(run, mode):
    """``count`` writers already writing when a watcher starts (one start per wave of up to 8): even ones
    paused across the start (until a second after READY), odd ones writing steadily through it."""
    folder = run.folder()
    expected = {}
    watch = None
    for w, wave in enumerate(waves(run)):
        if watch is not None:
            run.stop(watch, context=f"before wave {w + 1}")
        go = run.scratch / f"go-{w}"
        for k in wave:
            data, path = run.part(size=64), folder / f"busy-{k}.png"
            if k % 2 == 0:
                steps = pausing(run, data, 0, wait_for=str(go))
            else:
                steps = [["open", "w"], *chunked(run, 0, len(data), 30, (0.05, SETTLE_S / 4)), ["close"]]
            run.write(path, [data], steps)
            expected[path] = data
        time.sleep(0.3)  # the first chunks are written
        watch = run.watch(folder, *MODES[mode], "--results", run.dir / RESULTS, name=f"wave-{w}")
        time.sleep(1.0 + SETTLE_S)
        go.touch()
        run.join_writers()
    finish(run, folder, watch, expected)


@scenario(short=4, mode=list(MODES))
def test_temp_name_then_rename(run, mode):
    """``count`` writers, up to 8 at once, writing under an ignored name (``x.png.part``, ``.x.png``,
    ``x.tmp``), slowly and with long pauses, then renaming into place: the documented way."""
    folder, watch = start(run, mode)
    expected = {}
    for wave in waves(run):
        for k in wave:
            data, path = run.part(size=64), folder / f"renamed-{k}.png"
            temporary = run.rng.choice([f"renamed-{k}.png.part", f".renamed-{k}.png", f"renamed-{k}.tmp"])
            steps = pausing(run, data, run.rng.uniform(1, 2) * SETTLE_S) + [["rename", str(path)]]
            run.write(folder / temporary, [data], steps)
            expected[path] = data
        run.join_writers()
    finish(run, folder, watch, expected)


@scenario(short=4, mode=list(MODES))
def test_truncate_and_rewrite(run, mode):
    """``count`` files (up to 8 at once) written whole, then, after a seeded 0 to 1.2 s, truncated and
    rewritten in chunks with new content: both contents are complete; the second must get a verdict, the
    first may."""
    folder, watch = start(run, mode)
    expected = {}
    for wave in waves(run):
        for k in wave:
            first, second, path = run.part(size=64), run.part(size=64), folder / f"rewritten-{k}.png"
            steps = [["open", "w"], ["write", 0, 0, len(first)], ["close"], ["sleep", run.rng.uniform(0, 1.2)],
                     ["open", "w"], *chunked(run, 1, len(second), run.rng.randint(3, 8), (0.02, SETTLE_S / 4)),
                     ["close"]]
            run.write(path, [first, second], steps)
            expected[path] = [first, second]
        run.join_writers()
    finish(run, folder, watch, expected)


@scenario(short=4, mode=list(MODES))
def test_writer_across_a_restart(run, mode):
    """``count`` writers (one restart per wave of up to 8) writing steadily for ~3 s while the watcher is
    stopped (SIGTERM, exit 0) and started again in the middle."""
    folder, watch = start(run, mode)
    expected = {}
    for w, wave in enumerate(waves(run)):
        for k in wave:
            data, path = run.part(size=64), folder / f"restart-{k}.png"
            steps = [["open", "w"], *chunked(run, 0, len(data), 30, (0.05, SETTLE_S / 4)), ["close"]]
            run.write(path, [data], steps)
            expected[path] = data
        time.sleep(run.rng.uniform(0.3, 1.0))
        run.stop(watch, signal.SIGTERM, context=f"restart {w + 1}")
        watch = run.watch(folder, *MODES[mode], "--results", run.dir / RESULTS, name=f"restart-{w}")
        run.join_writers()
    finish(run, folder, watch, expected)


@scenario(short=4)
def test_writer_across_the_rescan(run):
    """Event mode with the safety rescan every second: ``count`` writers (up to 8 at once) each pausing 2.5 s
    mid-file (longer than the settle time, across two rescans), as a writer whose close event the kernel
    dropped would."""
    folder, watch = start(run, "events", rescan=1.0)
    expected = {}
    for wave in waves(run):
        for k in wave:
            data, path = run.part(size=64), folder / f"rescan-{k}.png"
            run.write(path, [data], [["sleep", run.rng.uniform(0, 0.5)], *pausing(run, data, 2.5)])
            expected[path] = data
        run.join_writers()
    finish(run, folder, watch, expected)
