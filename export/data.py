"""Image folders as training data: find, check, split, and feed through tf.data.

A folder of normal images is read recursively. Every file is decoded once up
front with the runtime's own :func:`edge_inspect.preprocess.load`, so that
unreadable files are named and skipped before training starts rather than
failing it half-way. The readable ones are split deterministically into
training and validation images and streamed through a ``tf.data`` pipeline
with parallel decode, an in-memory cache and prefetch.

    >>> images = scan_folder("parts/ok", (128, 128))
    >>> split = split_paths(images.root, images.paths, val_fraction=0.2, seed=0)
    >>> ds = make_dataset(split.train, (128, 128), batch_size=32, shuffle=True, seed=0)
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge_inspect.errors import InputError
from edge_inspect.preprocess import IMAGE_SUFFIXES, is_image_name, load

log = logging.getLogger(__name__)


@dataclass
class ImageFolder:
    """The outcome of :func:`scan_folder`.

    Attributes:
        root: the folder that was scanned.
        paths: readable images, sorted by path.
        skipped: ``(path, reason)`` for every file that is not used.
    """

    root: Path
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class Split:
    """Training and validation images, and how they were chosen."""

    train: list[Path]
    val: list[Path]
    seed: int
    val_fraction: float
    rule: str = "sha256(f'{seed}:{relative path}') < val_fraction"


def list_files(folder: str | os.PathLike) -> list[Path]:
    """All regular files under ``folder``, recursively, sorted.

    Raises:
        InputError: the folder does not exist, is not a folder, or is empty.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"Image folder '{root}' does not exist. Pass a folder of normal (good) part images.")
    if not root.is_dir():
        raise InputError(f"'{root}' is a file, not a folder. Pass the folder that holds the images.")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise InputError(
            f"Image folder '{root}' is empty. Put the normal part images there "
            f"({', '.join(IMAGE_SUFFIXES)}), in any subfolders."
        )
    return files


def scan_folder(
    folder: str | os.PathLike,
    size: tuple[int, int],
    *,
    workers: int | None = None,
    on_file: Callable[[], None] | None = None,
) -> ImageFolder:
    """Find the usable images under ``folder`` by decoding each one.

    Files without an image suffix, empty, truncated or corrupt files are
    skipped with a warning that names each one. Mixed sizes, channel counts
    and 16-bit images are all accepted: preprocessing makes them alike.

    Args:
        folder: the folder to read recursively.
        size: ``(height, width)`` the images will be resized to.
        workers: decoding threads (OpenCV releases the GIL); default CPUs.
        on_file: called once per file checked, for progress bars.

    Returns:
        The readable images and the skipped files with reasons.

    Raises:
        InputError: no file, or no readable image, in the folder.
    """
    root = Path(folder)
    files = list_files(root)
    skipped: list[tuple[Path, str]] = []
    candidates = []
    for path in files:
        if is_image_name(path):
            candidates.append(path)
        else:
            skipped.append((path, f"not an image file name (expected {', '.join(IMAGE_SUFFIXES)})"))
            if on_file:
                on_file()

    def check(path: Path) -> str | None:
        try:
            load(path, size)
            return None
        except InputError as exc:
            return str(exc).removeprefix(f"{path}: ")
        finally:
            if on_file:
                on_file()

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        reasons = list(pool.map(check, candidates))
    paths = [p for p, reason in zip(candidates, reasons) if reason is None]
    skipped += [(p, reason) for p, reason in zip(candidates, reasons) if reason is not None]
    skipped.sort()
    for path, reason in skipped:
        log.warning("Skipping %s: %s", path, reason)
    if not paths:
        raise InputError(
            f"No readable image in '{root}' ({len(files)} files checked, all skipped; "
            f"first: {skipped[0][0].name}: {skipped[0][1]}). Expected {', '.join(IMAGE_SUFFIXES)} images."
        )
    return ImageFolder(root, paths, skipped)


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_paths(root: Path, paths: list[Path], *, val_fraction: float, seed: int) -> Split:
    """Split images into training and validation, deterministically.

    An image goes to validation when a hash of the seed and its path relative
    to ``root`` falls below ``val_fraction``. The split of an image therefore
    depends only on its name and the seed: it survives reordering, and adding
    new images never moves old ones between the sides. At least one image is
    kept on each side when there are two or more.

    Raises:
        InputError: ``val_fraction`` is outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"Validation fraction must be in [0, 1), got {val_fraction}.")
    keyed = sorted(((_unit_hash(seed, p.relative_to(root).as_posix()), p) for p in paths), key=lambda kv: kv[0])
    val = [p for u, p in keyed if u < val_fraction]
    train = [p for u, p in keyed if u >= val_fraction]
    if val_fraction > 0 and len(paths) >= 2:
        if not val:
            val, train = [train[0]], train[1:]
        elif not train:
            train, val = [val[-1]], val[:-1]
    return Split(sorted(train), sorted(val), seed, val_fraction)


def load_batch(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Preprocess images into one ``(N, H, W, 1)`` float32 array."""
    out = np.empty((len(paths), *size, 1), np.float32)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, image in enumerate(pool.map(lambda p: load(p, size), paths)):
            out[i, :, :, 0] = image
    return out


def make_dataset(
    paths: list[Path],
    size: tuple[int, int],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    cache: bool = True,
):
    """A ``tf.data.Dataset`` of ``(B, H, W, 1)`` float32 image batches.

    Decoding runs in parallel (``num_parallel_calls=AUTOTUNE``) through the
    shared preprocessing; decoded images are cached in memory after the first
    epoch, shuffled with ``seed`` (reshuffled every epoch) and prefetched.
    """
    import tensorflow as tf

    height, width = size

    def decode(path):
        return load(path.decode(), size)[:, :, None]

    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    ds = ds.map(
        lambda p: tf.ensure_shape(tf.numpy_function(decode, [p], tf.float32), (height, width, 1)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
