"""The demo's line: a real watcher on a hot folder, fed parts like a camera.

``edge-inspect demo`` ends here, after export. :class:`Line` starts
``edge-inspect watch`` in a process of its own, as a plant would run it
(the lean runtime alone, with the sort, results and heatmaps sinks), and
waits for it the way systemd does: the watcher says ``READY=1`` on a
notify socket. It then drops the test parts into the hot folder at a steady
rate, each written under a partial name and renamed into place as a camera
does, reads each verdict back from the watcher's ledger as it commits, and
stops the watcher with SIGTERM: a drained stop, exit 0.

    >>> drops = plan({"ok": Path("demo/parts/test/ok"), "ng": Path("demo/parts/test/ng")})
    >>> line = Line("demo/models/linear-ae", "demo/line", drops, rate=10)
    >>> for drop, record in line.run():      # verdicts, as they commit
    ...     print(drop.name, drop.label, record.verdict)
    part-0001.png ng ng
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_inspect.errors import ConfigError, EdgeInspectError, SourceError
from edge_inspect.preprocess import is_image_name

if TYPE_CHECKING:
    from edge_inspect.ledger import Record

#: Seconds the watcher may take to load its model and say it is ready.
START_S = 60.0
#: Seconds the watcher may take, after the last part was dropped, to commit every part.
DRAIN_S = 60.0
#: Seconds a drained stop may take after SIGTERM.
STOP_S = 30.0
#: Lines of the watcher's log quoted in an error.
LOG_TAIL = 15


@dataclass(frozen=True)
class Drop:
    """A part the camera drops: its name in the hot folder, the image it copies, and its true label."""

    name: str
    image: Path
    label: str


def plan(folders: Mapping[str, Path], seed: int = 0) -> list[Drop]:
    """The parts of each labelled folder, interleaved in a seeded random order and named ``part-0001.png`` on.

    Args:
        folders: true label (``ok``, ``ng``) -> a folder of images.
        seed: the order's seed.

    Raises:
        ConfigError: a folder holds no image.
    """
    parts = []
    for label, folder in folders.items():
        images = sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_name(p))
        if not images:
            raise ConfigError(f"The demo line has no {label} parts to drop: '{folder}' holds no image.")
        parts += [(label, image) for image in images]
    random.Random(seed).shuffle(parts)
    width = max(4, len(str(len(parts))))
    return [Drop(f"part-{i:0{width}d}{image.suffix.lower()}", image, label)
            for i, (label, image) in enumerate(parts, 1)]


class Line:
    """``edge-inspect watch`` in its own process on ``folder/hot``, fed ``drops`` at ``rate`` parts per second.

    Files it leaves in ``folder``: ``hot/`` (the parts, sorted into
    ``hot/ok`` and ``hot/ng``; the ledger in ``hot/.edge-inspect``),
    ``verdicts.jsonl``, ``heatmaps/`` (NG parts) and ``watch.log`` (the
    watcher's log).

    Args:
        model: the exported model folder.
        folder: the line's folder; created, and must not hold a hot folder yet.
        drops: the parts, in the order they are dropped (:func:`plan`).
        rate: parts per second.

    Attributes:
        exit_code: the watcher's exit code once it stopped, else None.
        committed: the rows in the ledger once the watcher stopped (one
            per part when each was inspected exactly once), else None.
    """

    def __init__(self, model: str | os.PathLike, folder: str | os.PathLike, drops: list[Drop], rate: float):
        if not rate > 0:
            raise ConfigError(f"--rate: {rate!r} parts per second; give a positive rate, e.g. 10.")
        self.model = Path(model).resolve()
        self.folder = Path(folder).resolve()
        self.hot = self.folder / "hot"
        self.results = self.folder / "verdicts.jsonl"
        self.heatmaps = self.folder / "heatmaps"
        self.log = self.folder / "watch.log"
        self.drops = list(drops)
        self.rate = float(rate)
        self.exit_code: int | None = None
        self.committed: int | None = None

    @property
    def ledger(self) -> Path:
        from edge_inspect.watch import default_ledger

        return default_ledger(self.hot)

    def command(self) -> list[str]:
        """The watcher's command line: the same ``watch`` a plant runs."""
        return [sys.executable, "-m", "edge_inspect", "watch", str(self.hot), "--model", str(self.model), "--sort",
                "--results", str(self.results), "--heatmaps", str(self.heatmaps)]

    def run(self) -> Iterator[tuple[Drop, "Record"]]:
        """Start the watcher, drop every part, yield ``(drop, ledger record)`` as each commits, stop the watcher.

        Every part is yielded once, in the order the watcher committed them.

        Raises:
            SourceError: the watcher failed to start, exited early, took too
                long, or did not stop cleanly; the message quotes its log.
        """
        from edge_inspect.ledger import Ledger

        self.hot.mkdir(parents=True, exist_ok=False)
        with tempfile.TemporaryDirectory(prefix="edge-inspect-demo-") as tmp, \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(self.log, "wb") as log:
            address = os.path.join(tmp, "notify")
            notify.bind(address)
            env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
            env["NOTIFY_SOCKET"] = address
            process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env)
            try:
                self._wait_ready(process, notify)
                with Ledger.open(self.ledger, readonly=True) as ledger:
                    yield from self._feed(process, ledger)
                self._stop(process)
                with Ledger.open(self.ledger, readonly=True) as ledger:
                    self.committed = sum(ledger.counts().values())
            finally:
                if process.poll() is None:  # interrupted, or failed: never leave a watcher behind
                    process.terminate()
                    try:
                        process.wait(STOP_S)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()

    def _wait_ready(self, process: subprocess.Popen, notify: socket.socket) -> None:
        deadline = time.monotonic() + START_S
        notify.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                message = notify.recv(4096).decode("utf-8", "replace")
            except socket.timeout:
                message = ""
            if "READY=1" in message.splitlines():
                return
            if process.poll() is not None:
                raise self._failure(f"The watcher exited with code {process.returncode} before it was ready.")
        raise self._failure(f"The watcher did not say it was ready within {START_S:.0f} s.")

    def _feed(self, process: subprocess.Popen, ledger) -> Iterator[tuple[Drop, "Record"]]:
        by_name = {drop.name: drop for drop in self.drops}
        waiting = set(by_name)
        last_id, dropped = 0, 0
        start = time.monotonic()
        deadline = start + len(self.drops) / self.rate + DRAIN_S
        while waiting:
            now = time.monotonic()
            while dropped < len(self.drops) and now >= start + dropped / self.rate:
                self._drop(self.drops[dropped])
                dropped += 1
            for record in ledger.after(last_id, 500):
                last_id = record.id
                name = Path(record.source).name
                if name in waiting:
                    waiting.discard(name)
                    yield by_name[name], record
            if not waiting:
                break
            if process.poll() is not None:
                raise self._failure(f"The watcher exited with code {process.returncode} with "
                                    f"{len(waiting)} of {len(self.drops)} parts not inspected.")
            if now > deadline:
                raise self._failure(f"The watcher committed {len(self.drops) - len(waiting)} of {len(self.drops)} "
                                    f"parts in {now - start:.0f} s.")
            due = start + dropped / self.rate if dropped < len(self.drops) else float("inf")
            time.sleep(max(0.0, min(0.05, due - time.monotonic())))

    def _drop(self, drop: Drop) -> None:
        """Write the part under a partial name the watcher ignores, then rename it into place, as cameras do."""
        partial = self.hot / f"{drop.name}.part"
        partial.write_bytes(drop.image.read_bytes())
        os.replace(partial, self.hot / drop.name)

    def _stop(self, process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            raise self._failure(f"The watcher did not stop within {STOP_S:.0f} s of SIGTERM.") from None
        if self.exit_code != 0:
            raise self._failure(f"The watcher stopped with exit code {self.exit_code}, not 0.")

    def _failure(self, what: str) -> EdgeInspectError:
        try:
            tail = self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
        except OSError:
            tail = []
        quoted = "".join(f"\n  {line}" for line in tail) or " (empty)"
        return SourceError(f"{what} Its command: {' '.join(self.command())}. The end of its log ({self.log}):{quoted}")
