"""Seeded synthetic casting-like parts, with injected defects and their masks.

A part is a bright disc with concentric rings and a dark hub on a textured
background, like the top view of a cast impeller. Defects are dark holes,
scratches and chipped edges. The images serve the tests that must run
without real data and the end-to-end demo.

    >>> import numpy as np
    >>> image, mask = make_part(np.random.default_rng(0), size=64, defect="hole")
    >>> image.dtype, image.shape, bool(mask.any())
    (dtype('uint8'), (64, 64), True)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("hole", "scratch", "chip")


def _texture(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    sigma = max(size / 64.0, 0.5) * scale
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    return smooth / (smooth.std() + 1e-6)


def make_part(
    rng: np.random.Generator, size: int = 128, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one part.

    Args:
        rng: the random generator; equal seeds give equal parts.
        size: side of the square image in pixels.
        defect: None for a normal part, or one of :data:`DEFECTS`.

    Returns:
        ``(image, mask)``: ``(size, size)`` uint8 and ``(size, size)`` bool,
        the mask marking the defect's pixels (all False for a normal part).
    """
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"Unknown defect {defect!r}; expected one of {DEFECTS} or None.")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = size / 2 + rng.uniform(-0.01, 0.01) * size
    cx = size / 2 + rng.uniform(-0.01, 0.01) * size
    r = np.hypot(yy - cy, xx - cx) / size
    radius = 0.40 + rng.uniform(-0.01, 0.01)
    hub = 0.10 + rng.uniform(-0.005, 0.005)

    image = 0.30 + 0.03 * _texture(rng, size, 3.0)
    disc = r < radius
    rings = 0.62 + 0.06 * np.cos(2 * np.pi * r / 0.06) + 0.015 * _texture(rng, size, 1.0)
    image = np.where(disc, rings, image)
    image = np.where(r < hub, 0.12, image)
    image = image * rng.uniform(0.95, 1.05)

    mask = np.zeros((size, size), bool)
    if defect == "hole":
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(hub + 0.06, radius - 0.06) * size
        centre = (int(cx + dist * np.cos(angle)), int(cy + dist * np.sin(angle)))
        axes = (max(2, int(rng.uniform(0.03, 0.05) * size)), max(2, int(rng.uniform(0.025, 0.04) * size)))
        cv2.ellipse(mask.view(np.uint8), centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        image = np.where(mask, 0.08, image)
    elif defect == "scratch":
        a0, a1 = rng.uniform(0, 2 * np.pi, 2)
        d0, d1 = rng.uniform(hub + 0.05, radius - 0.04, 2) * size
        p0 = (int(cx + d0 * np.cos(a0)), int(cy + d0 * np.sin(a0)))
        p1 = (int(cx + d1 * np.cos(a1)), int(cy + d1 * np.sin(a1)))
        cv2.line(mask.view(np.uint8), p0, p1, 1, max(2, size // 40))
        mask &= disc
        image = np.where(mask, 0.95, image)
    elif defect == "chip":
        angle = rng.uniform(0, 2 * np.pi)
        centre = (int(cx + radius * size * np.cos(angle)), int(cy + radius * size * np.sin(angle)))
        cv2.circle(mask.view(np.uint8), centre, max(3, int(rng.uniform(0.06, 0.09) * size)), 1, -1)
        mask &= disc
        image = np.where(mask, 0.30, image)

    image = image + rng.normal(0.0, 0.01, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), mask


def write_parts(
    folder: str | Path,
    count: int,
    *,
    size: int = 128,
    seed: int = 0,
    defective: bool = False,
    suffix: str = ".png",
) -> list[Path]:
    """Write ``count`` parts as image files named ``part_NNNNN<suffix>``.

    Defective parts cycle through :data:`DEFECTS`. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image, _ = make_part(rng, size, DEFECTS[i % len(DEFECTS)] if defective else None)
        path = folder / f"part_{i:05d}{suffix}"
        if not cv2.imwrite(str(path), image):
            raise OSError(f"Could not write {path}.")
        paths.append(path)
    return paths
