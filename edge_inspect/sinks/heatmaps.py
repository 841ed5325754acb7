"""The heatmaps sink: an anomaly-map overlay PNG for each NG part.

The overlay (:func:`edge_inspect.inspector.heatmap_overlay`) is named after
the part and its ledger row id, ``<stem>-<id>.png`` (``frame-<index>-<id>.png``
for camera frames), so a replay writes the same file again rather than a
second one. Each file is written to a hidden temporary name, synced, and
renamed into place: a reader never sees half a PNG.

Replay after a crash reads the part's file again (from its sort folder if it
was moved), checks that its sha256 is still the one in the ledger, and
inspects it again for the map. A camera frame is not kept, so its overlay
cannot be made again; that is logged.

    >>> sink = HeatmapSink("overlays/")
    >>> sink.write([Done(record, image, anomaly_map)])   # {record.id: {"heatmap": "overlays/part_7-1234.png"}}
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_inspect.errors import EdgeInspectError, InputError
from edge_inspect.ledger import Record
from edge_inspect.sinks.base import Done, fsync_dir

log = logging.getLogger(__name__)


def heatmap_name(record: Record) -> str:
    """The overlay's file name for a row."""
    if record.kind == "frame":
        return f"frame-{record.frame_index}-{record.id}.png"
    return f"{Path(record.source).stem}-{record.id}.png"


class HeatmapSink:
    """Write an overlay PNG for each NG part into ``folder``.

    The inspector must compute anomaly maps (``anomaly_map=True``).

    Args:
        folder: where overlays go; created when missing.

    Raises:
        InputError: the folder cannot be created.
    """

    name = "heatmaps"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create the heatmap folder {self.folder} ({exc.strerror or exc}); "
                             "check the path given to --heatmaps.") from exc

    def wants(self, record: Record) -> bool:
        return record.verdict == "ng"

    def write(self, done: Sequence[Done]) -> dict[int, dict]:
        updates = {}
        for d in done:
            if d.image is None or d.anomaly_map is None:
                log.error("No image or anomaly map kept for row %d; no heatmap.", d.record.id)
                continue
            try:
                updates[d.record.id] = {"heatmap": str(self._write(d.record, d.image, d.anomaly_map))}
            except (OSError, EdgeInspectError) as exc:
                log.error("Cannot write the heatmap of row %d (%s); tried again at the next start.", d.record.id, exc)
        if updates:
            fsync_dir(self.folder)
        return updates

    def _write(self, record: Record, image: np.ndarray, anomaly_map: np.ndarray) -> Path:
        import cv2

        from edge_inspect.inspector import heatmap_overlay

        ok, encoded = cv2.imencode(".png", heatmap_overlay(image, anomaly_map))
        if not ok:
            raise InputError(f"OpenCV could not encode the heatmap of row {record.id} as PNG.")
        target = self.folder / heatmap_name(record)
        temporary = self.folder / f".{target.name}.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(encoded.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
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
            path = Path(record.sorted_path or record.source)
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("No heatmap for row %d: %s cannot be read (%s).", record.id, path, exc.strerror or exc)
                updates[record.id] = {}
                continue
            if hashlib.sha256(data).hexdigest() != record.sha256:
                log.warning("No heatmap for row %d: %s holds other content than the part inspected.", record.id, path)
                updates[record.id] = {}
                continue
            try:
                image = decode_image(data, path.name)
                result = inspector.inspect(image, str(path))
                if result.anomaly_map is None:
                    raise InputError("the inspector computes no anomaly map; load it with anomaly_map=True")
                updates[record.id] = {"heatmap": str(self._write(record, image, result.anomaly_map))}
            except (OSError, EdgeInspectError) as exc:
                log.error("Cannot write the heatmap of row %d (%s); tried again at the next start.", record.id, exc)
        if updates:
            fsync_dir(self.folder)
        log.info("Heatmaps: %d pending overlay(s) handled.", len(updates))
        return updates

    def close(self) -> None:
        pass
