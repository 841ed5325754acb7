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
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def _unit(name: str) -> float:
    return int.from_bytes(hashlib.sha256(f"casting-dev:{name}".encode()).digest()[:8], "big") / 2**64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/casting"))
    parser.add_argument("--out", type=Path, default=Path("runs/casting-dev"))
    parser.add_argument("--eval-fraction", type=float, default=0.15)
    args = parser.parse_args()

    ok = sorted(p for p in (args.data / "train" / "ok").iterdir() if p.is_file())
    defective = sorted((p for p in (args.data / "train" / "def").iterdir() if p.is_file()), key=lambda p: _unit(p.name))
    sides = {
        "train_ok": [p for p in ok if _unit(p.name) >= args.eval_fraction],
        "eval_ok": [p for p in ok if _unit(p.name) < args.eval_fraction],
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
