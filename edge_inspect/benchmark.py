"""Runtime benchmark of a model folder: latency, throughput, memory, AUC per precision.

This module owns ``edge-inspect benchmark``: for each precision a model
folder holds (``fp32``, ``fp16``, ``int8``) it loads an :class:`Inspector`
in a fresh Python process (so that peak memory is that precision's alone),
warms it up, and measures on decoded images (file decoding is not timed;
preprocessing, the session and the criteria kernel are):

- single-image latency: ``inspect(image)`` one image at a time, p50 and p95;
- batched latency per image: ``inspect_batch`` of ``batch_size`` images,
  the batch's wall time divided by its size, p50 and p95;
- images per second: batched, images / total wall time;
- peak memory: the process's peak resident set size (``getrusage``
  ``ru_maxrss``), and its growth from loading the model and running it;
- AUC-ROC of the inspector's criterion, when the data is labelled.

Labelled data is a folder with a subfolder of normal images (``ok``,
``good`` or ``normal``) and one of anomalous images (``ng``, ``def``,
``defect``, ``defective``, ``anomalous`` or ``bad``), read recursively; any
other folder is read as unlabelled images. Without data, synthetic parts
at the model's input size are used (timing only).

    >>> report = benchmark("models/conv-ae", data="data/test")
    >>> [(row.precision, row.images_per_s) for row in report.rows]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_inspect.errors import EdgeInspectError, InputError

NORMAL_NAMES = ("ok", "good", "normal")
ANOMALOUS_NAMES = ("ng", "def", "defect", "defective", "anomalous", "bad")
#: Synthetic parts timed when no data is given.
SYNTHETIC_IMAGES = 32


@dataclass
class BenchRow:
    """One precision's measurements (times in milliseconds)."""

    precision: str
    device: str
    single_p50_ms: float
    single_p95_ms: float
    batch_p50_ms: float
    batch_p95_ms: float
    images_per_s: float
    peak_rss_mib: float
    model_rss_mib: float
    auc_roc: float | None
    images: int
    batch_size: int
    criterion: str


@dataclass
class BenchReport:
    """All rows, and what they were measured on."""

    model_dir: Path
    data: str
    labelled: bool
    threads: int
    rows: list[BenchRow] = field(default_factory=list)

    @property
    def warning(self) -> str | None:
        """What an AUC-ROC near or below chance means and what to try (the lowest precision's); else None."""
        from edge_inspect.calibrate import weak_auc_warning

        measured = [row for row in self.rows if row.auc_roc is not None]
        if not measured:
            return None
        worst = min(measured, key=lambda row: row.auc_roc)
        return weak_auc_warning(worst.auc_roc, worst.criterion, f"{worst.images} images ({worst.precision})")


def labelled_images(data: str | os.PathLike) -> tuple[list[Path], np.ndarray | None]:
    """The image files under ``data`` and their labels (1 = anomalous), or None when unlabelled.

    Raises:
        InputError: no such folder, no image in it, or only one of the two
            labelled subfolders.
    """
    from edge_inspect.sources.files import iter_image_files

    root = Path(data)
    if not root.is_dir():
        raise InputError(f"Benchmark data '{root}' is not a folder. Pass a folder of images, "
                         f"or one with {'/'.join(NORMAL_NAMES)} and {'/'.join(ANOMALOUS_NAMES)} subfolders.")
    subs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    normal = [subs[n] for n in NORMAL_NAMES if n in subs]
    anomalous = [subs[n] for n in ANOMALOUS_NAMES if n in subs]
    if bool(normal) != bool(anomalous):
        found = ", ".join(p.name for p in normal + anomalous)
        raise InputError(
            f"Benchmark data '{root}' has a labelled subfolder ({found}) but not the other kind. Labelled data "
            f"needs one normal ({', '.join(NORMAL_NAMES)}) and one anomalous ({', '.join(ANOMALOUS_NAMES)}) subfolder."
        )
    if not normal:
        return iter_image_files([root]), None
    normal_files, anomalous_files = iter_image_files(normal), iter_image_files(anomalous)
    labels = np.r_[np.zeros(len(normal_files), int), np.ones(len(anomalous_files), int)]
    return normal_files + anomalous_files, labels


def benchmark(
    model_dir: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    device: str = "auto",
    precisions: list[str] | None = None,
    batch_size: int | None = None,
    single_runs: int = 32,
    threads: int | None = None,
    limit: int | None = None,
    isolate: bool = True,
) -> BenchReport:
    """Measure every precision of a model folder.

    Args:
        model_dir: an exported model folder.
        data: images to time (and score, when labelled); default synthetic.
        device: ``auto``, ``cpu`` or ``cuda``.
        precisions: which to measure (default: all the folder holds).
        batch_size: images per session run in the batched measurement (default: the
            model's, as ``predict``: :func:`~edge_inspect.inspector.default_batch_size`).
        single_runs: single-image inspections timed.
        threads: CPU threads of the session (default: all this process may use).
        limit: read at most this many images per label (evenly spaced).
        isolate: measure each precision in a fresh process (honest peak
            memory); ``False`` measures in this process, and peak memory is
            then this process's.

    Raises:
        ModelCardError: an invalid or tampered model folder.
        InputError: unusable data.
        ConfigError: a device or precision that is not available.
    """
    from edge_inspect.card import load_card
    from edge_inspect.session import default_threads

    card = load_card(model_dir)
    wanted = precisions or card.precisions
    for precision in wanted:
        card.path(precision)  # ModelCardError naming what the folder holds
    if data is not None:
        labelled_images(data)  # fail here, before any worker starts
    job = {"model_dir": str(model_dir), "data": None if data is None else str(data), "device": device,
           "batch_size": batch_size, "single_runs": single_runs, "threads": threads, "limit": limit}
    rows = []
    for precision in wanted:
        job["precision"] = precision
        rows.append(_in_subprocess(job) if isolate else _measure(**job))
    return BenchReport(Path(model_dir), str(data) if data else f"{SYNTHETIC_IMAGES} synthetic parts",
                       rows[0].auc_roc is not None if rows else False, threads or default_threads(), rows)


def _in_subprocess(job: dict) -> BenchRow:
    proc = subprocess.run([sys.executable, "-m", "edge_inspect.benchmark", json.dumps(job)],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        message = lines[-1] if proc.returncode == 2 and lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeInspectError(f"Benchmark of {job['precision']} failed: {message}")
    return BenchRow(**json.loads(lines[-1]))


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _images(data, size, limit) -> tuple[list[np.ndarray], np.ndarray | None]:
    from edge_inspect.preprocess import read_image

    if data is None:
        from edge_inspect.synthetic import make_part

        rng = np.random.default_rng(0)
        return [make_part(rng, size=max(size))[0] for _ in range(SYNTHETIC_IMAGES)], None
    files, labels = labelled_images(data)
    if limit:
        groups = [np.flatnonzero(labels == k) for k in (0, 1)] if labels is not None else [np.arange(len(files))]
        keep = np.concatenate([g[np.linspace(0, len(g) - 1, min(limit, len(g))).astype(int)] for g in groups if len(g)])
        files = [files[i] for i in keep]
        labels = labels[keep] if labels is not None else None
    images, kept = [], []
    for i, path in enumerate(files):
        try:
            images.append(read_image(path))
            kept.append(i)
        except EdgeInspectError:
            continue  # unreadable files are not timed; predict reports them
    if not images:
        raise InputError(f"No readable image in '{data}'.")
    return images, (labels[kept] if labels is not None else None)


def _measure(*, model_dir, data, device, precision, batch_size, single_runs, threads, limit) -> BenchRow:
    from edge_inspect.calibrate import auc
    from edge_inspect.inspector import Inspector

    card_size = _card_size(model_dir)
    images, labels = _images(data, card_size, limit)
    before = _rss_mib()
    inspector = Inspector.load(model_dir, precision=precision, device=device, threads=threads, batch_size=batch_size)
    batch_size = inspector.batch_size

    single = []
    for k in range(single_runs):
        t = time.perf_counter()
        inspector.inspect(images[k % len(images)])
        single.append((time.perf_counter() - t) * 1e3)

    per_image, scores = [], []
    total_images, start = 0, time.perf_counter()
    rounds = max(1, -(-2 * batch_size // len(images)))  # at least two full batches when data is small
    for _ in range(rounds):
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            t = time.perf_counter()
            results = inspector.inspect_batch(chunk)
            per_image.append((time.perf_counter() - t) * 1e3 / len(chunk))
            total_images += len(chunk)
            if len(scores) < len(images):
                scores += [r.score if r.score is not None else np.nan for r in results]
    elapsed = time.perf_counter() - start

    auc_roc = None
    if labels is not None:
        s = np.asarray(scores, np.float64)
        ok = np.isfinite(s)
        auc_roc = auc(s[ok & (labels == 0)], s[ok & (labels == 1)])
    peak = _rss_mib()
    return BenchRow(
        precision=precision, device=inspector.device,
        single_p50_ms=float(np.percentile(single, 50)), single_p95_ms=float(np.percentile(single, 95)),
        batch_p50_ms=float(np.percentile(per_image, 50)), batch_p95_ms=float(np.percentile(per_image, 95)),
        images_per_s=total_images / elapsed, peak_rss_mib=peak, model_rss_mib=peak - before,
        auc_roc=auc_roc, images=len(images), batch_size=batch_size, criterion=inspector.criterion,
    )


def _card_size(model_dir) -> tuple[int, int]:
    from edge_inspect.card import load_card

    return load_card(model_dir).size


def _worker(argv: list[str]) -> int:
    """``python -m edge_inspect.benchmark JOB_JSON``: measure one precision, print one JSON row."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        row = _measure(**json.loads(argv[0]))
    except EdgeInspectError as exc:
        print(str(exc).replace("\n", " "))
        return 2
    print(json.dumps(asdict(row)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
