"""Benchmark: what the watcher's check for writers costs a file, against a plain read.

``read_file`` reads a file once; ``read_complete`` (what the watcher uses)
also asks whether any process has it open for writing (a file lease) and
stats it again. Both read the same files, in alternating rounds, warm in the
page cache; the difference is the check's cost, to set against the
milliseconds a part takes from file to verdict.

    python benchmarks/bench_read.py --data runs/casting-grouped/eval_ok --files 256 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="folder of image files")
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from edge_inspect.preprocess import is_image_name
    from edge_inspect.sources.writers import WriteCheck
    from edge_inspect.watch import read_complete, read_file

    files = sorted(p.resolve() for p in args.data.iterdir() if is_image_name(p.name))[: args.files]
    if not files:
        raise SystemExit(f"no image files in {args.data}")
    check = WriteCheck(files[0].parent)
    readers = {"read_file": lambda f: read_file(f, 1 << 30),
               "read_complete": lambda f: read_complete(f, 1 << 30, check, 10.0)}
    for read in readers.values():  # into the page cache
        for f in files:
            read(f)
    times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.rounds):
        for name, read in readers.items():
            start = time.perf_counter()
            for f in files:
                read(f)
            times[name].append((time.perf_counter() - start) / len(files) * 1e6)
    lease = check.busy(files[0], scan=False)
    print(f"{len(files)} files of {args.data}, {args.rounds} rounds; the file lease "
          f"{'answers' if lease is not None else 'cannot be taken here: the check is the stat alone'}")
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.1f} us a file (rounds: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    extra = statistics.median(times["read_complete"]) - statistics.median(times["read_file"])
    print(f"the check: {extra:.1f} us a file")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
