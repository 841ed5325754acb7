"""The watcher's promise, checked from the outside once a torture scenario is over.

``edge-inspect watch`` promises (README, "Watch a hot folder") that every
part dropped in the folder gets exactly one durable verdict, committed before
anything else happens to it, and that the sinks agree with the ledger. This
module checks that promise on what a run left on disk: the ledger file, the
watched folder and its sort folders, the heatmap folder and the JSONL file.
It reads them only, and knows nothing of how the watcher works inside.

    >>> check_promise("in/", "in/.edge-inspect/ledger.sqlite", "verdicts.jsonl",
    ...               expected_files={"in/part.png": png_bytes}, sort=True, heatmaps="heat/")
    []                                   # or one line of plain text per broken promise

Paths in the ledger are read back to the bytes they name: the part's path
from ``source_raw`` (its exact bytes) when the ledger has that column and the
row a value in it, else from ``source``; a ``BLOB`` as it is, ``TEXT``
through ``os.fsencode``. The JSONL is compared with the columns as stored
(a JSON line cannot hold bytes). A stored path must be absolute: a relative
one names another file from another working directory.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from edge_inspect.sources import DEFAULT_IGNORE

#: The sort folders, one per verdict, inside the watched folder.
SORT_FOLDERS = ("ok", "ng", "error")
_PNG = b"\x89PNG\r\n\x1a\n"

PathLike = str | bytes | os.PathLike


@dataclass(frozen=True)
class Version:
    """A complete content a file held: what a verdict must describe."""

    size: int
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> Version:
        return cls(len(data), hashlib.sha256(data).hexdigest())


def fs(path: PathLike) -> bytes:
    """A path as the bytes the file system sees, absolute."""
    return os.path.abspath(os.fsencode(path))


def show(path: bytes, folder: bytes | None = None) -> str:
    """A path for a message: relative to ``folder`` when under it, as a bytes literal, long ones shortened."""
    if folder is not None and path.startswith(folder + b"/"):
        path = path[len(folder) + 1:]
    text = repr(path)[1:]
    if len(text) > 90:
        text = f"{text[:50]}...{text[-30:]} ({len(path)} bytes)"
    return text


def _stored(value) -> bytes | None:
    """A path column read back to bytes (see the module docstring)."""
    if value is None:
        return None
    return value if isinstance(value, bytes) else os.fsencode(value)


def _surrogates(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _ignored(name: bytes) -> bool:
    text = os.fsdecode(name).lower()
    return any(fnmatch.fnmatchcase(text, p) for p in DEFAULT_IGNORE)


def _sha256(path: bytes) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


def read_ledger(ledger: PathLike) -> tuple[list[dict], list[str]]:
    """The ledger's rows (paths as bytes) and what is wrong with the file itself."""
    path = fs(ledger)
    if not os.path.exists(path):
        return [], [f"the ledger {show(path)} does not exist"]
    problems = []
    try:
        conn = sqlite3.connect(path, timeout=30.0)
    except sqlite3.Error as exc:
        return [], [f"the ledger {show(path)} cannot be opened: {exc}"]
    conn.text_factory = _surrogates
    conn.row_factory = sqlite3.Row
    try:
        try:
            found = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        except sqlite3.Error as exc:
            found = [str(exc)]
        if found != ["ok"]:
            problems.append(f"the ledger {show(path)} fails PRAGMA integrity_check: {'; '.join(found[:3])}")
        try:
            rows = [dict(r) for r in conn.execute("SELECT * FROM parts ORDER BY id")]
        except sqlite3.Error as exc:
            return [], [*problems, f"the ledger {show(path)} cannot be read: {exc}"]
    finally:
        conn.close()
    for row in rows:
        row["stored"] = {key: row.get(key) for key in ("source", "sorted_path", "heatmap")}
        raw = row.get("source_raw")
        row["source"] = bytes(raw) if raw is not None else _stored(row.get("source"))
        for key in ("sorted_path", "heatmap"):
            row[key] = _stored(row.get(key))
    return rows, problems


def check_promise(folder: PathLike, ledger: PathLike, jsonl: PathLike | None = None,
                  expected_files: Mapping[PathLike, bytes | Sequence[bytes]] | None = None, *,
                  sort: bool = False, heatmaps: PathLike | None = None, may_lack: Iterable[PathLike] = (),
                  settled: bool = True, cwd: PathLike | None = None) -> list[str]:
    """Every broken promise of a watch run, one line of text each; an empty list when all held.

    Args:
        folder: the watched folder.
        ledger: its ledger file.
        jsonl: the ``--results`` file, when the run had one.
        expected_files: every file dropped in the folder -> its complete
            content, or the complete contents it held in turn (a file
            rewritten), the last one being what it holds at the end. Every
            file row must describe one of these contents, and the last one
            must have a verdict.
        sort: the run sorted files (``--sort``).
        heatmaps: the ``--heatmaps`` folder, when the run had one.
        may_lack: dropped files the scenario lets go without a verdict (it
            says why).
        settled: the watcher stopped cleanly after its last part, so no
            sink may still be pending.
        cwd: the watcher's working directory, to find the files that a
            relative stored path names (after reporting it); default: ours.

    Returns:
        The violations, each naming the promise, the row and the file.
    """
    top = fs(folder)
    out: list[str] = []
    rows, problems = read_ledger(ledger)
    out += problems

    expected: dict[bytes, list[Version]] = {}
    for path, contents in (expected_files or {}).items():
        versions = [contents] if isinstance(contents, (bytes, bytearray)) else list(contents)
        expected[fs(path)] = [Version.of(bytes(v)) for v in versions]
    optional = {fs(p) for p in may_lack}

    # One verdict per part, for the complete file.
    per_version: dict[tuple[bytes, Version], list[int]] = collections.defaultdict(list)
    for row in rows:
        if row["kind"] != "file":
            continue
        source, rid = row["source"], row["id"]
        name = show(source, top)
        if not os.path.isabs(source):
            out.append(f"row #{rid}: its source {name} is a relative path")
        versions = expected.get(source)
        if versions is None:
            out.append(f"row #{rid}: a verdict for {name}, which the scenario never dropped in the folder "
                       f"(verdict {row['verdict']}{', ' + row['error'] if row['error'] else ''})")
            continue
        got = Version(row["size"], row["sha256"]) if row["sha256"] else None
        if got is None:
            out.append(f"row #{rid}: {name} got a verdict ({row['verdict']}: {row['error']}) without its content "
                       "being read: no sha256")
        elif got not in versions:
            sizes = "/".join(str(v.size) for v in versions)
            out.append(f"row #{rid}: {name} was judged on {row['size']} bytes (sha256 {row['sha256'][:12]}...), "
                       f"not on a complete content ({sizes} bytes): a half-written file got a verdict "
                       f"({row['verdict']}{': ' + row['error'] if row['error'] else ''})")
        else:
            per_version[(source, got)].append(rid)
            if row["verdict"] == "error":
                out.append(f"row #{rid}: the complete image {name} got an error verdict: {row['error']}")
    for (source, _), ids in per_version.items():
        if len(ids) > 1:
            out.append(f"{show(source, top)} has {len(ids)} verdicts for the same content: rows "
                       f"{', '.join(f'#{i}' for i in ids)}")
    for path, versions in expected.items():
        if (path, versions[-1]) not in per_version and path not in optional:
            out.append(f"{show(path, top)} ({versions[-1].size} bytes, complete) has no verdict: lost")

    if settled:
        for row in rows:
            if row["sinks_pending"]:
                out.append(f"row #{row['id']} ({show(row['source'] or b'', top)}, {row['verdict']}): sinks "
                           f"{row['sinks_pending']!r} still pending after a clean stop")
    if jsonl is not None:
        out += _check_jsonl(fs(jsonl), rows, top)
    base = fs(cwd if cwd is not None else os.getcwd())
    if sort:
        out += _check_sorted(top, rows, optional, base)
    if heatmaps is not None:
        out += _check_heatmaps(fs(heatmaps), rows, top, base)
    return out


def _check_jsonl(path: bytes, rows: list[dict], top: bytes) -> list[str]:
    """Each row id exactly once in the JSONL, saying what the ledger says."""
    out = []
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        return [f"the results file {show(path)} cannot be read: {exc.strerror}"]
    lines: dict[int, list[dict]] = collections.defaultdict(list)
    for k, text in enumerate(data.split(b"\n"), 1):
        if not text.strip():
            continue
        try:
            item = json.loads(text.decode("utf-8", "surrogateescape"))
            lines[int(item["id"])].append(item)
        except (ValueError, KeyError, TypeError):
            out.append(f"results file line {k} is not a verdict: {text[:80]!r}")
    by_id = {r["id"]: r for r in rows}
    for rid, items in lines.items():
        if rid not in by_id:
            out.append(f"results file: id {rid} ({items[0].get('verdict')}, {items[0].get('source')!r:.80}) is no "
                       "row of the ledger")
        elif len(items) > 1:
            out.append(f"results file: row #{rid} appears {len(items)} times")
    for rid, row in by_id.items():
        if rid not in lines:
            out.append(f"results file: row #{rid} ({show(row['source'] or b'', top)}, {row['verdict']}) is missing")
            continue
        item = lines[rid][0]
        for key in ("verdict", "sha256", "source", "sorted_path", "heatmap"):
            said, stored = item.get(key), row["stored"].get(key, row[key])
            if said != stored and _stored(said) != _stored(stored):
                out.append(f"results file: row #{rid} says {key}={said!r:.120}, the ledger {stored!r:.120}")
    return out


def _check_sorted(top: bytes, rows: list[dict], optional: set[bytes], base: bytes) -> list[str]:
    """Each sorted file where its row's ``sorted_path`` says, with the row's content; nothing left unsorted."""
    out = []
    named: dict[bytes, int] = {}
    for row in rows:
        if row["kind"] != "file":
            continue
        rid, where = row["id"], row["sorted_path"]
        if where is None:
            # Allowed only when the file's content is no longer in the folder (replaced, or gone).
            if row["sha256"] and _sha256(row["source"]) == row["sha256"]:
                out.append(f"row #{rid}: {show(row['source'], top)} is still in the watched folder, not sorted")
            continue
        if not os.path.isabs(where):
            out.append(f"row #{rid}: sorted_path {show(where)} is relative: it names another file from another "
                       "working directory")
            where = os.path.join(base, where)
        if os.path.dirname(where) != os.path.join(top, row["verdict"].encode()):
            out.append(f"row #{rid}: sorted_path {show(where, top)} is not in the {row['verdict']}/ folder")
        named[os.path.abspath(where)] = rid
        if not os.path.lexists(where):
            out.append(f"row #{rid}: sorted_path {show(where, top)} does not exist")
        elif row["sha256"] and _sha256(where) != row["sha256"]:
            out.append(f"row #{rid}: the file at sorted_path {show(where, top)} holds other content than the "
                       "part judged")
    for verdict in SORT_FOLDERS:
        sub = os.path.join(top, verdict.encode())
        try:
            entries = os.listdir(sub)
        except OSError:
            continue
        for name in entries:
            path = os.path.join(sub, name)
            if path not in named and not name.startswith(b"."):
                out.append(f"{show(path, top)} lies in a sort folder, but no row's sorted_path names it")
    try:
        entries = os.listdir(top)
    except OSError as exc:
        return [*out, f"the watched folder {show(top)} cannot be listed: {exc.strerror}"]
    # A file without any row is reported as lost; one whose row says "not sorted" above.
    sorted_rows = {r["source"] for r in rows if r["sorted_path"] is not None}
    for name in entries:
        path = os.path.join(top, name)
        if name.startswith(b".") or _ignored(name) or path in optional or path not in sorted_rows:
            continue
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            continue
        if regular and _sha256(path) in {r["sha256"] for r in rows if r["source"] == path}:
            out.append(f"{show(path, top)} was left in the watched folder although its row says it was sorted")
    return out


def _check_heatmaps(folder: bytes, rows: list[dict], top: bytes, base: bytes) -> list[str]:
    """An overlay PNG for each NG row, none for the others, and nothing else in the folder."""
    out = []
    named = set()
    for row in rows:
        rid, overlay = row["id"], row["heatmap"]
        if row["verdict"] != "ng":
            if overlay is not None:
                out.append(f"row #{rid} is {row['verdict']} but names a heatmap {show(overlay)}")
            continue
        if overlay is None:
            out.append(f"row #{rid} ({show(row['source'] or b'', top)}) is NG but has no heatmap")
            continue
        if not os.path.isabs(overlay):
            out.append(f"row #{rid}: heatmap {show(overlay)} is a relative path: it names another file from "
                       "another working directory")
            overlay = os.path.join(base, overlay)
        named.add(os.path.abspath(overlay))
        try:
            with open(overlay, "rb") as handle:
                head = handle.read(8)
        except OSError as exc:
            out.append(f"row #{rid}: heatmap {show(overlay)} cannot be read ({exc.strerror})")
            continue
        if head != _PNG:
            out.append(f"row #{rid}: heatmap {show(overlay)} is not a PNG")
    try:
        entries = os.listdir(folder)
    except OSError:
        return out
    for name in entries:
        path = os.path.join(folder, name)
        if path not in named:
            out.append(f"heatmap folder holds {show(name)}, which no row names (a leaked temporary file?)")
    return out

