"""Lay out the fixed development split of the casting data as a tree of symlinks.

    python benchmarks/casting_split.py --data ../shared/data/casting --out runs/casting-dev

writes ``OUT/train_ok``, ``OUT/eval_ok`` and ``OUT/eval_def`` (symbolic links,
no copies) and ``OUT/split.json`` listing every file. The rule, fixed so the
figures in docs/results.md can be reproduced:

- an image of ``train/ok`` goes to ``eval_ok`` when
  ``sha256("casting-dev:" + file name)`` read as a fraction is below 0.15,
  else to ``train_ok`` (training then holds out its own 20% for validation
  and calibration, by the training split's rule);
- ``eval_def`` takes, from ``train/def``, as many images as ``eval_ok`` holds
  (a balanced set, like the paper's 262 + 262 test set): those with the
  smallest hash of ``"casting-dev:" + file name``.

``--grouped`` lays out a split that bounds the leak of augmented views
(``train/`` holds rotated and flipped copies of the same castings):

    python benchmarks/casting_split.py --grouped --out runs/casting-grouped

Two normal images are near-duplicates when the Pearson correlation of their
64 x 64 versions, maximised over the eight quarter turns and mirror images,
is above ``--link`` (0.99). Near-duplicates are linked into groups
(connected components), and whole groups go to ``eval_ok``, in the order of
``sha256("casting-group:" + the group's first file name)``, until it holds
``--eval-fraction`` of the images. No evaluation normal then correlates
above 0.99 with any training normal in any orientation. ``eval_def`` takes
defective images at the withheld test split's ratio (453 defective to 262
normal), ``eval_def_balanced`` the first ``len(eval_ok)`` of those.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Defective to normal parts in the data set's withheld test split.
TEST_RATIO = 453 / 262


def _unit(key: str) -> float:
    """sha256 of ``key`` read as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def near_duplicate_groups(paths: list[Path], link: float) -> np.ndarray:
    """Group label of each image (``export.data.near_duplicate_groups`` on 64 px thumbnails)."""
    from export.data import NEAR_DUPLICATE_SIZE, load_batch
    from export.data import near_duplicate_groups as groups_of

    return groups_of(load_batch(paths, (NEAR_DUPLICATE_SIZE, NEAR_DUPLICATE_SIZE))[..., 0], link)


def grouped_sides(ok: list[Path], defective: list[Path], eval_fraction: float, link: float) -> dict:
    labels = near_duplicate_groups(ok, link)
    first = {}
    for path, label in zip(ok, labels):
        first.setdefault(label, path.name)
    order = sorted(first, key=lambda g: _unit(f"casting-group:{first[g]}"))
    chosen, count = set(), 0
    for group in order:
        if count >= eval_fraction * len(ok):
            break
        chosen.add(group)
        count += int(np.sum(labels == group))
    eval_ok = [p for p, g in zip(ok, labels) if g in chosen]
    sizes = np.bincount(labels)
    print(f"near-duplicate groups at r > {link}: {len(sizes)} (largest {sizes.max()}, singletons {(sizes == 1).sum()}); "
          f"evaluation holds {len(chosen)} groups")
    n_def = min(len(defective), round(len(eval_ok) * TEST_RATIO))
    return {
        "train_ok": [p for p, g in zip(ok, labels) if g not in chosen],
        "eval_ok": eval_ok,
        "eval_def": sorted(defective[:n_def]),
        "eval_def_balanced": sorted(defective[: len(eval_ok)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/casting"))
    parser.add_argument("--out", type=Path, default=Path("runs/casting-dev"))
    parser.add_argument("--eval-fraction", type=float, default=0.15)
    parser.add_argument("--grouped", action="store_true", help="split whole groups of near-duplicates (bounds the leak)")
    parser.add_argument("--link", type=float, default=0.99, help="correlation above which two images are near-duplicates")
    args = parser.parse_args()

    ok = sorted(p for p in (args.data / "train" / "ok").iterdir() if p.is_file())
    defective = sorted((p for p in (args.data / "train" / "def").iterdir() if p.is_file()), key=lambda p: _unit(f"casting-dev:{p.name}"))
    if args.grouped:
        sides = grouped_sides(ok, defective, args.eval_fraction, args.link)
    else:
        sides = {
            "train_ok": [p for p in ok if _unit(f"casting-dev:{p.name}") >= args.eval_fraction],
            "eval_ok": [p for p in ok if _unit(f"casting-dev:{p.name}") < args.eval_fraction],
        }
        sides["eval_def"] = sorted(defective[: len(sides["eval_ok"])])
    for side, paths in sides.items():
        folder = args.out / side
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = folder / path.name
            if not link.is_symlink():
                link.symlink_to(path.resolve())
        print(f"{side}: {len(paths)} images")
    (args.out / "split.json").write_text(json.dumps({k: [p.name for p in v] for k, v in sides.items()}, indent=1))


if __name__ == "__main__":
    main()
