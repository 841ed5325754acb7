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

from edge_inspect.errors import ConfigError, InputError
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
    groups: int | None = None


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


#: Correlation above which two images count as views of one part.
NEAR_DUPLICATE_LINK = 0.99
#: Side of the thumbnails near-duplicates are compared at.
NEAR_DUPLICATE_SIZE = 64


def near_duplicate_groups(images: np.ndarray, link: float = NEAR_DUPLICATE_LINK, block: int = 1024) -> np.ndarray:
    """Group images that are views of one part: a label per image.

    Two images are linked when the Pearson correlation of their pixels,
    maximised over the eight quarter turns and mirror images of the second,
    exceeds ``link``; groups are the connected components of the links. Data
    sets built by augmenting photographs hold rotated and flipped copies of
    one part, and a validation image with a copy in training scores like a
    training image, not like an unseen part.

    Args:
        images: ``(n, s, s)`` square thumbnails (:data:`NEAR_DUPLICATE_SIZE`).
        link: the correlation threshold.
        block: rows compared at a time (memory: the thumbnails and ``2 * block * n`` floats).

    Returns:
        ``(n,)`` int group labels, ``0 .. groups - 1``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(images)

    def unit_rows(x):
        z = x.reshape(len(x), -1).astype(np.float32)
        z -= z.mean(axis=1, keepdims=True)
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    side = images.shape[1]
    base = unit_rows(images)
    rows, cols = [], []
    for start in range(0, n, block):
        # corr(x, g y) = corr(g^-1 x, y): turn the block's own rows, not all n images, so memory holds the
        # thumbnails once (4 KB an image) and one block x n product, whatever the number of views
        chunk = base[start:start + block].reshape(-1, side, side)
        best = None
        for turned in (np.rot90(m, k, axes=(1, 2)) for m in (chunk, chunk[:, :, ::-1]) for k in range(4)):
            product = np.ascontiguousarray(turned).reshape(len(chunk), -1) @ base.T
            best = product if best is None else np.maximum(best, product, out=best)
        r, c = np.nonzero(best > link)
        keep = r + start != c
        rows.append(r[keep] + start)
        cols.append(c[keep])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def split_paths(root: Path, paths: list[Path], *, val_fraction: float, seed: int,
                groups: np.ndarray | None = None) -> Split:
    """Split images into training and validation, deterministically.

    An image goes to validation when a hash of the seed and its path relative
    to ``root`` falls below ``val_fraction``. The split of an image therefore
    depends only on its name and the seed: it survives reordering, and adding
    new images never moves old ones between the sides. At least one image is
    kept on each side when there are two or more.

    With ``groups`` (a label per path, :func:`near_duplicate_groups`), whole
    groups move together, keyed by the group's first relative path: no
    validation image then has a near-duplicate in training, so validation
    scores stand for unseen parts. The validation share is then only close to
    ``val_fraction``.

    Raises:
        InputError: ``val_fraction`` is outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"Validation fraction must be in [0, 1), got {val_fraction}.")
    names = [p.relative_to(root).as_posix() for p in paths]
    if groups is not None:
        first: dict[int, str] = {}
        for name, group in sorted(zip(names, groups)):
            first.setdefault(int(group), name)
        names = [first[int(group)] for group in groups]
    keyed = sorted(((_unit_hash(seed, name), p) for name, p in zip(names, paths)), key=lambda kv: kv[0])
    val = [p for u, p in keyed if u < val_fraction]
    train = [p for u, p in keyed if u >= val_fraction]
    if val_fraction > 0 and len(paths) >= 2:
        if not val:
            val, train = [train[0]], train[1:]
        elif not train:
            train, val = [val[-1]], val[:-1]
    if groups is None:
        return Split(sorted(train), sorted(val), seed, val_fraction)
    rule = (f"whole near-duplicate groups (correlation > {NEAR_DUPLICATE_LINK} at {NEAR_DUPLICATE_SIZE} px over the "
            "8 quarter turns and mirror images): sha256(f'{seed}:{first relative path of the group}') < val_fraction")
    return Split(sorted(train), sorted(val), seed, val_fraction, rule, int(np.max(groups)) + 1 if len(groups) else 0)


def load_batch(paths: list[Path], size: tuple[int, int], on_image: Callable[[], None] | None = None) -> np.ndarray:
    """Preprocess images into one ``(N, H, W, 1)`` float32 array; ``on_image()`` after each."""
    out = np.empty((len(paths), *size, 1), np.float32)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, image in enumerate(pool.map(lambda p: load(p, size), paths)):
            out[i, :, :, 0] = image
            if on_image is not None:
                on_image()
    return out


def make_dataset(
    paths: list[Path],
    size: tuple[int, int],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    cache: bool = True,
    augment: str = "none",
):
    """A ``tf.data.Dataset`` of ``(B, H, W, 1)`` float32 image batches.

    Decoding runs in parallel (``num_parallel_calls=AUTOTUNE``) through the
    shared preprocessing; decoded images are cached in memory after the first
    epoch, shuffled with ``seed`` (reshuffled every epoch) and prefetched.
    ``augment="d4"`` shows each image in one of its eight quarter-turned
    and mirrored views, drawn anew every epoch (square images only).
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
    if augment == "d4":
        if height != width:
            raise ConfigError(f"augment d4 needs square images; the input size is {height}x{width}. Use --augment none.")
        views = tf.data.Dataset.random(seed=seed + 1).map(lambda r: (tf.cast(r % 4, tf.int32), r // 4 % 2))
        ds = tf.data.Dataset.zip(ds, views).map(
            lambda image, view: tf.cond(view[1] == 1, lambda: tf.image.flip_left_right(tf.image.rot90(image, view[0])),
                                        lambda: tf.image.rot90(image, view[0])),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
