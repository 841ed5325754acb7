"""Entries named like images that are not files: a folder, a FIFO, broken, looping and device symlinks.

None is a part: none may get a verdict, crash the watcher or hang it (a
FIFO opened for reading blocks until a writer comes; ``/dev/zero`` never
ends), and each must be named in the log once per run (so that an operator
learns why a "part" was never inspected). One set is there at start (the
backlog scan meets it), one is made while the watcher runs, with a real
part dropped after each set; then a restart meets both sets again.
"""

from __future__ import annotations

import hashlib
import os

from tests.torture.harness import QUIET_S, Torture, judged, scenario

RESULTS = "verdicts.jsonl"


def make_entries(folder, tag: str) -> dict[str, str]:
    """Create one set of entries; name -> what it is."""
    made = {}

    def entry(name, what, create):
        create(os.path.join(folder, name))
        made[name] = what

    entry(f"dir-{tag}.png", "a folder", os.mkdir)
    entry(f"fifo-{tag}.jpg", "a FIFO", os.mkfifo)
    entry(f"broken-{tag}.png", "a broken symlink", lambda p: os.symlink(f"missing-{tag}.png", p))
    entry(f"loop-{tag}.png", "a symlink to itself", lambda p: os.symlink(os.path.basename(p), p))
    entry(f"zero-{tag}.png", "a symlink to /dev/zero", lambda p: os.symlink("/dev/zero", p))
    entry(f"dirlink-{tag}.tif", "a symlink to a folder", lambda p: os.symlink(".", p))
    return made


@scenario(short=2)
def test_non_regular_entries_named_like_images(run: Torture):
    """``count`` rounds; each makes a set of entries while the watcher runs and drops a real part after it."""
    folder = run.folder()
    ledger = run.ledger_of(folder)
    args = ["--settle", "0.5", "--sort", "--results", run.dir / RESULTS]
    entries = make_entries(folder, "start")
    expected = {}

    def part_after(tag: str, watch) -> None:
        """A real part after the entries: its verdict shows that the watcher neither died nor hangs."""
        data = run.part()
        path = run.drop(folder, f"good-{tag}.png", data)
        expected[path] = data
        run.wait_verdicts(ledger, process=watch, expected={path: data}, quiet=2 * QUIET_S)
        if not watch.alive:
            run.violations.append(f"the watcher died after the entries of round {tag!r}: {watch.tail()}")
        elif (path, hashlib.sha256(data).hexdigest()) not in judged(ledger):
            run.violations.append(f"no verdict for good-{tag}.png {2 * QUIET_S:.0f} s after it was dropped behind "
                                  f"the entries of round {tag!r}: the watcher hangs")

    first = run.watch(folder, *args, name="first")
    part_after("start", first)
    for r in range(run.count):
        entries |= make_entries(folder, f"r{r}")
        part_after(f"r{r}", first)
    run.stop(first, context="first run")
    second = run.watch(folder, *args, name="restart")
    part_after("restart", second)
    run.stop(second, context="restart")

    logs = {"first run": first.output(), "restart": second.output()}
    for name, what in entries.items():
        per_run = {label: sum(name in line for line in text.splitlines()) for label, text in logs.items()}
        run.expect(any(per_run.values()), f"{name} ({what}) was never named in the log")
        for label, times in per_run.items():
            run.expect(times <= 1, f"{name} ({what}) was named {times} times in the log of the {label}; "
                                   "expected once")
    run.promise(folder, ledger, run.dir / RESULTS, expected, sort=True)
