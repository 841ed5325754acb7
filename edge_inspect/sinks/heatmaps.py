"""The heatmaps sink: an anomaly-map overlay PNG for each NG part (each part, when asked).

The overlay (:func:`edge_inspect.inspector.heatmap_overlay`) carries the
decision the ledger recorded (verdict, score, threshold, criterion). It is
named after the part and its ledger row id, ``<stem>-<id>.png``
(``frame-<index>-<id>.png`` for camera frames), so a replay writes the same
file again rather than a second one. Each file is written to a hidden temporary name, synced, and
renamed into place: a reader never sees half a PNG. A temporary file left by
a killed process (its PID no longer runs) is removed at start, and one left
by a failed write (a full disk) at once.

Replay after a crash reads the part's file again (from its sort folder if it
was moved), checks that its sha256 is still the one in the ledger, and
inspects it again for the map. A camera frame is not kept, so its overlay
cannot be made again; that is logged. A part whose file cannot be read now
(a folder unmounted) stays pending, with the reason in :attr:`failures`.

    >>> sink = HeatmapSink("overlays/")
    >>> sink.write([Done(record, image, anomaly_map)])   # {record.id: {"heatmap": "overlays/part_7-1234.png"}}
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_inspect.errors import EdgeInspectError, InputError
from edge_inspect.ledger import Record
from edge_inspect.sinks.base import Done, fit_name, fsync_dir, safe_name, split_name

log = logging.getLogger(__name__)


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


def heatmap_name(record: Record) -> str:
    """The overlay's file name for a row: valid UTF-8 whatever the part's name (see :func:`safe_name`)."""
    if record.kind == "frame":
        return f"frame-{record.frame_index}-{record.id}.png"
    return fit_name(split_name(safe_name(record.path.name))[0], f"-{record.id}.png")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


class HeatmapSink:
    """Write an overlay PNG for each NG part (and OK part, with ``every_part``) into ``folder``.

    The inspector must compute anomaly maps (``anomaly_map=True``).

    Args:
        folder: where overlays go; created when missing.
        max_pixels: the pixel limit for parts decoded again on replay
            (default: :func:`~edge_inspect.preprocess.decode_image`'s).
        every_part: overlays of OK parts too (``sinks.heatmaps_all``); an
            ``error`` verdict has no map, so never an overlay.

    Raises:
        InputError: the folder cannot be created.
    """

    name = "heatmaps"

    def __init__(self, folder: str | os.PathLike, max_pixels: int | None = None, every_part: bool = False):
        # Absolute: the ledger records where each overlay went, for any later working directory.
        self.folder = Path(os.path.abspath(folder))
        #: Row id -> why the last call left it pending.
        self.failures: dict[int, str] = {}
        #: The watcher's pixel limit, for parts decoded again on replay.
        self.max_pixels = max_pixels
        self.every_part = every_part
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create the heatmap folder {self.folder} ({exc.strerror or exc}); "
                             "check the heatmaps folder setting (sinks.heatmaps).") from exc
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Remove temporary files of processes that no longer run (a kill -9 between write and rename)."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            match = _TEMPORARY.match(name)
            if match and not _running(int(match.group(1))):
                try:
                    os.unlink(self.folder / name)
                    log.info("Heatmaps: removed %s, left by an interrupted write.", name)
                except OSError as exc:
                    log.warning("Heatmaps: cannot remove %s, left by an interrupted write (%s).", name,
                                exc.strerror or exc)

    def wants(self, record: Record) -> bool:
        return record.verdict == "ng" or (self.every_part and record.verdict == "ok")

    def write(self, done: Sequence[Done]) -> dict[int, dict]:
        updates = {}
        for d in done:
            if d.image is None or d.anomaly_map is None:
                self.failures[d.record.id] = "no image or anomaly map was kept; the overlay is made from the file"
                continue
            try:
                updates[d.record.id] = {"heatmap": str(self._write(d.record, d.image, d.anomaly_map))}
            except (OSError, EdgeInspectError) as exc:
                self.failures[d.record.id] = f"cannot write the overlay ({_reason(exc)})"
        if updates:
            fsync_dir(self.folder)
        return updates

    def _write(self, record: Record, image: np.ndarray, anomaly_map: np.ndarray) -> Path:
        import cv2

        from edge_inspect.inspector import heatmap_overlay

        overlay = heatmap_overlay(image, anomaly_map, score=record.score, threshold=record.threshold,
                                  verdict=record.verdict, criterion=record.criterion)
        ok, encoded = cv2.imencode(".png", overlay)
        if not ok:
            raise InputError(f"OpenCV could not encode the heatmap of row {record.id} as PNG.")
        target = self.folder / heatmap_name(record)
        temporary = self.folder / f".heatmap-{record.id}.{os.getpid()}.tmp"  # short: the target may fill NAME_MAX
        try:
            with open(temporary, "wb") as handle:
                handle.write(encoded.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        return target

    def replay(self, records: Sequence[Record], inspector=None) -> dict[int, dict]:
        """Make the overlays of pending rows again, from their files."""
        from edge_inspect.preprocess import decode_image

        updates: dict[int, dict] = {}
        for record in records:
            if record.kind != "file":
                log.warning("The heatmap of camera frame %s (row %d) cannot be made again: frames are not kept.",
                            record.frame_index, record.id)
                updates[record.id] = {}
                continue
            path = Path(record.sorted_path) if record.sorted_path else record.path
            try:
                data = path.read_bytes()
            except OSError as exc:
                # Perhaps for now (a share unmounted, a folder renamed): the row stays pending, retried.
                self.failures[record.id] = f"{path} cannot be read ({exc.strerror or exc})"
                continue
            if hashlib.sha256(data).hexdigest() != record.sha256:
                log.warning("No heatmap for row %d: %s holds other content than the part inspected.", record.id, path)
                updates[record.id] = {}
                continue
            try:
                image = (decode_image(data, path.name) if self.max_pixels is None
                         else decode_image(data, path.name, max_pixels=self.max_pixels))
                result = inspector.inspect(image, str(path))
                if result.anomaly_map is None:
                    raise InputError("the inspector computes no anomaly map; load it with anomaly_map=True")
                updates[record.id] = {"heatmap": str(self._write(record, image, result.anomaly_map))}
            except (OSError, EdgeInspectError) as exc:
                self.failures[record.id] = f"cannot write the overlay ({_reason(exc)})"
        if updates:
            fsync_dir(self.folder)
        log.info("Heatmaps: %d pending overlay(s) handled.", len(updates))
        return updates

    def close(self) -> None:
        pass


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or str(exc)
