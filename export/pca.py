"""The linear autoencoder's fit: PCA streamed over the images, split by the square's symmetry.

The default model is PCA of the good parts and their eight quarter-turned
and mirrored views (the symmetry group D4 of the square). That set is closed
under D4, so its covariance commutes with the eight pixel permutations and,
in a symmetry-adapted basis, falls apart into independent blocks, one per
irreducible representation (Schur's lemma):

- ``A1``, ``A2``, ``B_diag``, ``B_axis``: one coordinate per pixel orbit each
  (``B_diag`` also on the diagonals' orbits of four);
- ``E``: two copies of one block, which the fit stacks.

The fixed orthogonal change of basis (:class:`D4Basis`) takes each orbit's
eight pixel values (four on the diagonals) to these coordinates. PCA of the
augmented set is then PCA of each block of the originals alone: the same
top-k subspace, up to ties, at a fraction of the cost. Each E eigenvalue
counts twice when the top k are chosen across blocks. ``../docs/models.md``
has the derivation; ``tests/export/test_pca.py`` checks it against the dense
PCA of the augmented images.

The fit never holds the images: they are decoded once, taken to block
coordinates and written to a file beside the run (:class:`ImageCache`), then
streamed through a randomized range finder per block, with a few power
iterations, so its memory depends on the image size and the component count,
not on the number of images.

    >>> cache = ImageCache.build(run_dir / ".fit-images.f32", paths, (256, 256), "d4")
    >>> pca = fit_pca(cache, components=1024)
    >>> pca.reconstruct(images).shape                     # (n, 256, 256)
    >>> pca.save(run_dir / "model.npz")
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edge_inspect.errors import ConfigError, ModelCardError

#: Augmentations of the fit: none, or the eight symmetries of the square.
AUGMENTATIONS = ("none", "d4")

#: Extra columns of each block's random sketch, and power iterations over the data. On the casting data (1,024
#: components at 256 px) one iteration already explains 99.36725% of the variance, six 99.36736%, the dense
#: randomized SVD this replaced 99.36131%; the label-free F1 was the same at one to six (docs/benchmarks.md).
OVERSAMPLE = 10
POWER_ITERATIONS = 2

#: Images per streamed chunk.
CHUNK = 128


# ------------------------------------------------------------------ the group


def _group() -> list[np.ndarray]:
    """D4 as 2x2 integer matrices on (row, column) offsets from the centre: 4 rotations, 4 reflections."""
    turn = np.array([[0, -1], [1, 0]])
    mirror = np.array([[1, 0], [0, -1]])
    rotations = [np.linalg.matrix_power(turn, k) for k in range(4)]
    return rotations + [r @ mirror for r in rotations]


def _characters(g: np.ndarray) -> dict[str, float]:
    """The four one-dimensional irreducible representations at ``g``."""
    det = round(np.linalg.det(g))
    axis_like = g[0, 1] == 0  # identity, half turn and the row/column mirrors
    b_diag = (1.0 if axis_like else -1.0) if det > 0 else (-1.0 if axis_like else 1.0)
    return {"A1": 1.0, "A2": float(det), "B_diag": b_diag, "B_axis": b_diag * det}


#: The two-dimensional representation in a basis where the main-diagonal mirror is diag(1, -1).
_E_BASIS = np.array([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2.0)


def _e_matrix(g: np.ndarray) -> np.ndarray:
    return _E_BASIS.T @ g @ _E_BASIS


# ------------------------------------------------------------------ the basis


@dataclass(frozen=True)
class Block:
    """One block of the covariance: where its coordinates sit in the coefficient vector.

    ``index`` is ``(copies, dim)``: E has two copies that share one basis.
    """

    name: str
    index: np.ndarray

    @property
    def copies(self) -> int:
        return self.index.shape[0]

    @property
    def dim(self) -> int:
        return self.index.shape[1]


#: Where each block's coordinates come from: per copy, the rows of the orbits-of-eight transform (``t8``) and
#: of the diagonal orbits' (``t4``), in order. Rows of t8: A1, A2, B_diag, B_axis, E(a=0, b=0), E(1, 0), E(0, 1),
#: E(1, 1); of t4: A1, B_diag, E(0, 0), E(1, 0). E's copies are its two ``a``, which D4 turns alike.
PIECES = {
    "A1": [[(8, 0), (4, 0)]],
    "A2": [[(8, 1)]],
    "B_diag": [[(8, 2), (4, 1)]],
    "B_axis": [[(8, 3)]],
    "E": [[(8, 4), (8, 6), (4, 2)], [(8, 5), (8, 7), (4, 3)]],
}


class D4Basis:
    """The orthogonal change of basis from a square image's pixels to D4 block coordinates.

    Pixels fall into orbits of eight (``idx8``, ``(O8, 8)``) and, on the two
    diagonals, of four (``idx4``, ``(O4, 4)``); ``t8`` (8x8) and ``t4`` (4x4)
    are orthogonal and map an orbit's values to its coordinates. The
    coefficient vector is ``concat(coef8.ravel(), coef4.ravel())``; each
    :class:`Block` indexes into it.

    Raises:
        ConfigError: the size is not square and even.
    """

    def __init__(self, size: tuple[int, int]):
        height, width = size
        if height != width or height % 2:
            raise ConfigError(
                f"augment 'd4' needs a square image with an even side, found {height}x{width}. "
                "Use a square, even --size (e.g. 256) or --augment none."
            )
        n = height
        self.size = (n, n)
        group = _group()
        rows, cols = np.divmod(np.arange(n * n), n)
        offsets = np.stack([2 * rows - (n - 1), 2 * cols - (n - 1)])  # odd integers, centred
        perms = []
        for g in group:
            moved = g @ offsets
            perms.append(((moved[0] + n - 1) // 2) * n + (moved[1] + n - 1) // 2)
        perms = np.stack(perms)  # (8, P): perms[h, p] = h . p
        seen = np.zeros(n * n, bool)
        free, diagonal = [], []
        for p in range(n * n):
            if seen[p]:
                continue
            orbit = perms[:, p]
            seen[orbit] = True
            (free if len(set(orbit.tolist())) == 8 else diagonal).append(p)
        self.idx8 = perms[:, free].T.copy()  # (O8, 8): v[h] = x(h . p)
        rows8 = [[_characters(g)[name] for g in group] for name in ("A1", "A2", "B_diag", "B_axis")]
        rows8 += [[_e_matrix(g)[a, b] for g in group] for b in (0, 1) for a in (0, 1)]
        dims = np.array([1, 1, 1, 1, 2, 2, 2, 2])
        self.t8 = np.array(rows8) * np.sqrt(dims / 8.0)[:, None]  # Schur: orthogonal rows
        # Diagonal orbits: the representative sits on the main diagonal, whose mirror fixes it, so each
        # value appears twice among the eight; keep the four coordinates that do not vanish.
        reps = np.array(diagonal, dtype=np.int64)
        full = perms[:, reps].T  # (O4, 8) with repeats
        self.idx4 = np.array([list(dict.fromkeys(row.tolist())) for row in full], dtype=np.int64).reshape(-1, 4)
        keep = [0, 2, 4, 5]  # A1, B_diag, E(a=0, b=0), E(a=1, b=0)
        t4 = np.zeros((4, 4))
        first = full[0]
        for h in range(8):
            t4[:, list(self.idx4[0]).index(first[h])] += self.t8[keep, h]
        self.t4 = t4 / math.sqrt(2.0)
        if not np.allclose(self.t4 @ self.t4.T, np.eye(4)) or not np.allclose(self.t8 @ self.t8.T, np.eye(8)):
            raise AssertionError("The D4 change of basis is not orthogonal.")  # pragma: no cover
        o8, o4 = len(self.idx8), len(self.idx4)
        at = {8: lambda r: np.arange(o8) * 8 + r, 4: lambda r: 8 * o8 + np.arange(o4) * 4 + r}
        self.blocks = [Block(name, np.stack([np.concatenate([at[size](row) for size, row in copy]) for copy in copies]))
                       for name, copies in PIECES.items()]
        self.pixels = n * n

    def forward(self, flat: np.ndarray) -> np.ndarray:
        """``(m, P)`` pixels to ``(m, P)`` coefficients."""
        coef8 = flat[:, self.idx8] @ self.t8.T.astype(flat.dtype)
        coef4 = flat[:, self.idx4] @ self.t4.T.astype(flat.dtype)
        return np.concatenate([coef8.reshape(len(flat), -1), coef4.reshape(len(flat), -1)], axis=1)

    def inverse(self, coef: np.ndarray) -> np.ndarray:
        """``(m, P)`` coefficients back to ``(m, P)`` pixels."""
        m, o8 = len(coef), len(self.idx8)
        out = np.empty_like(coef)
        out[:, self.idx8] = coef[:, : 8 * o8].reshape(m, o8, 8) @ self.t8.astype(coef.dtype)
        out[:, self.idx4] = coef[:, 8 * o8 :].reshape(m, -1, 4) @ self.t4.astype(coef.dtype)
        return out


class PlainBasis:
    """No symmetry: one block of every pixel, the identity change of basis."""

    def __init__(self, size: tuple[int, int]):
        self.size = tuple(size)
        self.pixels = size[0] * size[1]
        self.blocks = [Block("all", np.arange(self.pixels)[None])]

    def forward(self, flat: np.ndarray) -> np.ndarray:
        return flat

    def inverse(self, coef: np.ndarray) -> np.ndarray:
        return coef


def block_order(basis) -> tuple[np.ndarray, list[slice]]:
    """Where each coefficient goes when the blocks are laid out one after another, and each block's slice."""
    order = np.concatenate([block.index.reshape(-1) for block in basis.blocks])
    bounds = np.cumsum([0] + [block.index.size for block in basis.blocks])
    return order, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def make_basis(size: tuple[int, int], augment: str):
    """The change of basis of ``augment``: :class:`D4Basis` or :class:`PlainBasis`.

    Raises:
        ConfigError: unknown ``augment``; a size D4 cannot use.
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}.")
    return D4Basis(size) if augment == "d4" else PlainBasis(size)


# ------------------------------------------------------------------ images


class ImageCache:
    """Preprocessed images in one float32 file, in block coordinates, read back in chunks.

    Each image is stored as its coefficient vector with the blocks laid out
    one after another (:func:`block_order`), so that every pass of the fit
    reads contiguous block slices without redoing the change of basis.
    Reading with ``np.fromfile`` leaves the data in the page cache, not in
    the process: the fit's memory does not grow with the number of images.
    """

    def __init__(self, path: Path, count: int, size: tuple[int, int], augment: str):
        self.path, self.count, self.size, self.augment = Path(path), count, tuple(size), augment
        self.basis = make_basis(self.size, augment)

    @classmethod
    def build(cls, path: str | os.PathLike, paths: list[Path], size: tuple[int, int], augment: str,
              on_image: Callable[[], None] | None = None) -> "ImageCache":
        """Decode and preprocess ``paths`` (in parallel) into ``path``.

        Raises:
            ConfigError: unknown ``augment``; a size it cannot use.
        """
        from concurrent.futures import ThreadPoolExecutor

        from edge_inspect.preprocess import load

        cache = cls(Path(path), len(paths), size, augment)
        with open(cache.path, "wb") as out, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for start in range(0, len(paths), CHUNK):
                images = list(pool.map(lambda p: load(p, size), paths[start : start + CHUNK]))
                cache._write(out, np.stack(images))
                if on_image is not None:
                    for _ in images:
                        on_image()
        return cache

    @classmethod
    def from_array(cls, path: str | os.PathLike, images: np.ndarray, augment: str = "d4") -> "ImageCache":
        """Write ``(n, H, W)`` float images (tests, small sets)."""
        cache = cls(Path(path), len(images), images.shape[1:3], augment)
        with open(cache.path, "wb") as out:
            for start in range(0, len(images), CHUNK):
                cache._write(out, np.asarray(images[start : start + CHUNK], np.float32))
        return cache

    def _write(self, out, images: np.ndarray) -> None:
        order, _ = block_order(self.basis)
        coef = self.basis.forward(images.reshape(len(images), -1).astype(np.float32))
        out.write(np.ascontiguousarray(coef[:, order]).tobytes())

    def chunks(self, size: int = CHUNK) -> Iterator[np.ndarray]:
        """``(m, P)`` float32 block-ordered coefficients, ``size`` images at a time."""
        pixels = self.size[0] * self.size[1]
        with open(self.path, "rb") as f:
            for start in range(0, self.count, size):
                m = min(size, self.count - start)
                yield np.fromfile(f, np.float32, m * pixels).reshape(m, pixels)

    def images(self) -> Iterator[np.ndarray]:
        """The images back, ``(m, H, W)`` float32 chunks."""
        order, _ = block_order(self.basis)
        for coef in self.chunks():
            flat = np.empty_like(coef)
            flat[:, order] = coef
            yield self.basis.inverse(flat).reshape(-1, *self.size)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ the model


@dataclass
class LinearPCA:
    """A fitted linear autoencoder: mean, change of basis and one orthonormal basis per block.

    ``bases[i]`` is ``(k_i, dim_i)``; E's basis serves both its copies, so
    ``components`` counts it twice.
    """

    size: tuple[int, int]
    augment: str
    mean: np.ndarray  # (P,) float32, pixel order
    bases: list[np.ndarray]
    eigenvalues: list[np.ndarray]
    explained_variance: float

    def __post_init__(self):
        self.basis = make_basis(self.size, self.augment)
        self.name = "linear_ae"

    @property
    def components(self) -> int:
        return sum(b.shape[0] * block.copies for b, block in zip(self.bases, self.basis.blocks))

    @property
    def weight_count(self) -> int:
        """Numbers in the bases (each stored once): what a lone part reads."""
        return sum(b.size for b in self.bases)

    def reconstruct(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """``(n, H, W)`` float32 in, ``(n, H, W)`` float32 reconstructions out."""
        images = np.asarray(images, np.float32)
        out = np.empty_like(images)
        for start in range(0, len(images), batch_size):
            flat = images[start : start + batch_size].reshape(-1, self.basis.pixels) - self.mean
            coef = self.basis.forward(flat)
            rec = np.zeros_like(coef)
            for block, w in zip(self.basis.blocks, self.bases):
                if len(w):
                    x = coef[:, block.index].reshape(-1, block.dim)
                    rec[:, block.index] = ((x @ w.T) @ w).reshape(len(flat), block.copies, block.dim)
            out[start : start + batch_size] = (self.basis.inverse(rec) + self.mean).reshape(-1, *self.size)
        return out

    def __call__(self, batch, training: bool = False):
        """Keras' calling convention: ``(n, H, W, 1)`` in and out."""
        return self.reconstruct(np.asarray(batch)[..., 0])[..., None]

    def save(self, path: str | os.PathLike) -> None:
        """Write ``model.npz`` atomically."""
        path = Path(path)
        arrays = {"mean": self.mean, "size": np.array(self.size), "explained": np.array(self.explained_variance)}
        for i, (w, s) in enumerate(zip(self.bases, self.eigenvalues)):
            arrays[f"basis_{i}"], arrays[f"eigenvalues_{i}"] = w, s
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, augment=np.array(self.augment), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LinearPCA":
        """Read ``model.npz``.

        Raises:
            ModelCardError: the file is not a saved linear-ae.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                size = tuple(int(v) for v in data["size"])
                blocks = len(make_basis(size, str(data["augment"])).blocks)
                return cls(size, str(data["augment"]), data["mean"], [data[f"basis_{i}"] for i in range(blocks)],
                           [data[f"eigenvalues_{i}"] for i in range(blocks)], float(data["explained"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ModelCardError(f"'{path}' is not a saved linear-ae ({exc}). Train the run again.") from exc


# ------------------------------------------------------------------ the fit


def fit_pca(images: ImageCache, components: int, *, seed: int = 0, power_iterations: int = POWER_ITERATIONS,
            on_pass: Callable[[str], None] | None = None) -> LinearPCA:
    """PCA of the images (and, with ``augment="d4"``, their eight views), streamed.

    Each pass reads the images once: the mean, a random sketch of every
    block's covariance, ``power_iterations`` refinements, and the projected
    covariances whose eigenvectors become the bases. Memory: about
    ``2 * P * (components + OVERSAMPLE)`` float32 numbers, whatever the
    number of images.

    Args:
        images: the training images, in the basis of their augmentation.
        components: K, chosen across blocks by eigenvalue. E's come in
            pairs; where the cut would split one, the next one-dimensional
            component takes the last place.
        seed: of the random sketches.
        on_pass: called with a description before each pass.

    Raises:
        ConfigError: more components than the augmented images or the
            pixels allow.
    """
    basis, augment = images.basis, images.augment
    n, pixels = images.count, basis.pixels
    views = 8 * n if augment == "d4" else n
    if not 1 <= components <= min(views, pixels):
        raise ConfigError(
            f"components ({components}) must be between 1 and the number of training images ({views}, after "
            f"augmentation) and the pixel count ({pixels}). Choose --components {min(views, pixels)} or fewer."
        )
    say = on_pass or (lambda _: None)
    order, slices = block_order(basis)
    say("Mean of the training images")
    total, sq = np.zeros(pixels, np.float64), 0.0
    for x in images.chunks():
        total += x.sum(axis=0, dtype=np.float64)
        sq += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    mean = total / n
    if augment == "d4":  # the augmented set's mean is the mean's average over the eight views: its A1 part
        mean[slices[0].stop:] = 0.0
    variance = (sq - 2 * float(mean @ total) + n * float(mean @ mean)) / n  # per view, about the mean
    mean = mean.astype(np.float32)

    rng = np.random.default_rng(seed)
    widths = [min(block.dim, n * block.copies, (components // block.copies) + OVERSAMPLE) for block in basis.blocks]
    q = [np.linalg.qr(rng.standard_normal((block.dim, w)).astype(np.float32))[0]
         for block, w in zip(basis.blocks, widths)]
    for it in range(power_iterations + 1):
        say(f"Sketching the covariance ({it + 1} of {power_iterations + 1})")
        y = [np.zeros_like(m) for m in q]
        for coords in _block_coords(images, mean, slices):
            for i, x in enumerate(coords):
                y[i] += x.T @ (x @ q[i])
        q = [np.linalg.qr(m)[0] for m in y]
    say("Projected covariances")
    gram = [np.zeros((m.shape[1], m.shape[1]), np.float64) for m in q]
    for coords in _block_coords(images, mean, slices):
        for i, x in enumerate(coords):
            z = x @ q[i]
            gram[i] += z.T.astype(np.float64) @ z
    values, vectors = [], []
    for block, g, m in zip(basis.blocks, gram, q):
        s, u = np.linalg.eigh(g / (n * block.copies))
        desc = np.argsort(s)[::-1]
        values.append(np.maximum(s[desc], 0.0))
        vectors.append((m @ u[:, desc].astype(np.float32)).T)  # (width, dim), rows orthonormal
    keep = _choose(values, [block.copies for block in basis.blocks], components)
    bases = [np.ascontiguousarray(v[:k]) for v, k in zip(vectors, keep)]
    kept = [s[:k] for s, k in zip(values, keep)]
    explained = sum(float(s.sum()) * block.copies for s, block in zip(kept, basis.blocks))
    flat_mean = np.empty_like(mean)
    flat_mean[order] = mean
    pixel_mean = basis.inverse(flat_mean[None])[0].astype(np.float32)
    return LinearPCA(tuple(images.size), augment, pixel_mean, bases, kept,
                     explained / variance if variance > 0 else 1.0)


def _block_coords(images: ImageCache, mean: np.ndarray, slices: list[slice]) -> Iterator[list[np.ndarray]]:
    """Each chunk's centred coordinates, per block: ``(m * copies, dim)`` float32."""
    for x in images.chunks():
        x -= mean
        yield [np.ascontiguousarray(x[:, s]).reshape(-1, block.dim) for s, block in zip(slices, images.basis.blocks)]


def _choose(values: list[np.ndarray], copies: list[int], components: int) -> list[int]:
    """How many leading vectors of each block the top ``components`` eigenvalues take."""
    ranked = sorted(((float(s), i) for i, vals in enumerate(values) for s in vals), key=lambda t: -t[0])
    keep, used = [0] * len(values), 0
    for _, i in ranked:
        if used + copies[i] > components:
            if used + 1 > components:
                break
            continue
        keep[i] += 1
        used += copies[i]
    return keep
