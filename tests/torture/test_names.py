"""File names: any bytes a Linux file system allows, through the ledger, sort, heatmaps and JSONL.

A name is 1 to 255 bytes, any but NUL and ``/``: newlines, quotes,
backslashes, terminal escapes, rich markup, bytes that are not UTF-8,
leading dashes, names of exactly 255 bytes. The fixed list below comes first
in every run; seeded random names fill the count. ``deep`` puts the watched
folder so deep that a 255-byte name sorted into ``error/`` makes a path of
4095 bytes, the longest PATH_MAX (4096, with its NUL) allows.

Names the watcher ignores by design (hidden, ``*.part``, ``*.tmp``,
``*.crdownload``, ``*~``) and the sort folders' own names are not drawn.
"""

from __future__ import annotations

import fnmatch
import os

from edge_inspect.sources import DEFAULT_IGNORE
from tests.torture.harness import READY_S, Torture, describe_exit, scenario

PATH_MAX = 4096
NAME_MAX = 255

#: Always tried first: each is a way a name has broken a program before.
SPECIAL = [
    b"-leading-dash.png",
    b"--help",
    b"new\nline.png",
    b"quote'single\"double.png",
    b"back\\slash\\n.png",
    b"bad\xff\xfe.jpeg",
    b"overlong \xc0\xaf and lone \xed\xa0\x80 surrogate.png",
    b"tab\tcr\rbell\x07 esc\x1b[31mred.png",
    b"[bold red]markup[link=file:x] %s %d {} $HOME `x`.png",
    b"\xe6\x97\xa5\xe6\x9c\xac caf\xc3\xa9 \xf0\x9f\x94\xa9.PNG",
    b" spaces around .jpg ",
    b"*?[glob].png",
]


def _allowed(name: bytes) -> bool:
    text = os.fsdecode(name).lower()
    return (not name.startswith(b".") and name not in (b"ok", b"ng", b"error")
            and not any(fnmatch.fnmatchcase(text, p) for p in DEFAULT_IGNORE))


def names(run: Torture, n: int, longest: int = NAME_MAX) -> list[bytes]:
    """``n`` distinct names: the special ones, two of ``longest`` bytes, then seeded random bytes."""
    rng = run.rng
    alphabet = bytes(b for b in range(1, 256) if b != ord("/"))
    chosen = [s for s in SPECIAL if len(s) <= longest]
    filler = bytes(rng.choice(alphabet) for _ in range(longest - 1))
    chosen += [b"L" + filler[:longest - 5] + b".png", b"N" + filler]  # exactly `longest` bytes
    while len(chosen) < n:
        size = rng.choice([rng.randint(1, 16), rng.randint(1, longest), longest])
        name = bytes(rng.choice(alphabet) for _ in range(size))
        if rng.random() < 0.5:
            name = name[:longest - 4] + rng.choice([b".png", b".jpg", b".PNG", b".bmp"])
        if _allowed(name) and name not in chosen:
            chosen.append(name)
    return [c for c in chosen if _allowed(c)][:n]


def deep_folder(base: os.PathLike) -> bytes:
    """A folder under ``base`` whose path leaves exactly room for ``/error/`` and a 255-byte name below PATH_MAX."""
    top = os.fsencode(os.path.abspath(base))
    length = PATH_MAX - 1 - len(b"/error/") - NAME_MAX
    path = top
    while len(path) < length:
        room = length - len(path) - 1  # for the next component, after its "/"
        piece = min(200, room)
        if room - piece == 1:  # never leave room for a "/" alone
            piece -= 1
        path += b"/" + b"d" * piece
    os.makedirs(path)
    return path


@scenario(short=24, where=["flat", "deep"])
def test_file_names(run, where):
    """``count`` files with seeded names, half there at start, half dropped while running; then a restart.

    With ``deep``, the default ledger (under a folder path of ~3.8 KB) must
    either work or be refused with an ``Error:`` line, never a traceback;
    the run itself then uses ``--ledger`` elsewhere.
    """
    folder = deep_folder(run.dir / "deep") if where == "deep" else os.fsencode(run.folder())
    heat, results = run.dir / "heat", run.dir / "verdicts.jsonl"
    args = ["--settle", "0.5", "--sort", "--heatmaps", heat, "--results", results]
    ledger = run.ledger_of(os.fsdecode(folder))
    if where == "deep":
        probe = run.watch(os.fsdecode(folder), "--settle", "0.5", ready=False, name="default-ledger")
        if probe.ready(READY_S):
            run.stop(probe, context="default ledger under a deep folder")
        else:
            code = probe.exited(5)
            run.expect(code is not None and code != 0 and "Traceback" not in probe.output(),
                       f"with the default ledger under a folder path of {len(folder)} bytes, the watcher ended with "
                       f"{describe_exit(code)} and a traceback instead of an Error: line: {probe.tail(2)}")
        ledger = run.dir / "ledger.sqlite"
        args += ["--ledger", ledger]

    chosen = names(run, run.count)
    contents = {os.path.join(folder, name): run.part() for name in chosen}
    items = list(contents.items())
    half = len(items) // 2
    for path, data in items[:half]:
        run.drop(folder, os.path.basename(path), data)
    watch = run.watch(os.fsdecode(folder), *args)
    for path, data in items[half:]:
        run.drop(folder, os.path.basename(path), data)
    run.wait_verdicts(ledger, len(items), watch)
    run.stop(watch, context="while names were dropped")
    run.clean_run(os.fsdecode(folder), *args, expect_rows=len(items), ledger=ledger)
    run.promise(folder, ledger, results, contents, sort=True, heatmaps=heat, context="after a restart")
