"""The torture scenarios' long variants, outside pytest: a table of scenario / iterations / violations.

Runs the same scenario functions as ``tests/torture`` (each a real
``edge-inspect watch`` process against real files, signals and file
systems), one after the other, with the seed and count given here instead of
the short slice's, and prints one row per scenario and parameter, then the
first violations of each that broke the promise::

    python benchmarks/torture.py --seed 1 --count 200
    python benchmarks/torture.py --seed 7 --count 50 --scenario kill_9 --scenario names
    python benchmarks/torture.py --list

Without ``--model`` a tiny model is trained and exported first, the way the
tests' fixture does (``tests/runtime/conftest.py``; needs the ``train``
extra, ~1 min). Each scenario works in a folder of its own under
``--workdir`` (default: a temporary folder, removed at the end unless
``--keep``); its watcher logs are in ``<folder>/logs/``. Exit status 1 when
any scenario broke the promise.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402  (after the path: the scenarios skip through pytest's exception)

import tests.torture  # noqa: E402
from tests.torture.harness import SCENARIOS, Broken, Torture  # noqa: E402


def load_scenarios() -> None:
    for module in pkgutil.iter_modules(tests.torture.__path__):
        if module.name.startswith("test_"):
            importlib.import_module(f"tests.torture.{module.name}")


def model_folder(given: str | None, work: Path) -> Path:
    if given:
        return Path(given)
    from tests.runtime.conftest import tiny_model

    print("Training and exporting the tiny test model...", flush=True)
    base = work / "tiny-models"
    base.mkdir(parents=True, exist_ok=True)
    return tiny_model(base)


def run_one(function, params: dict, folder: Path, model: Path, seed: int, count: int) -> tuple[str, list[str]]:
    """Run one scenario variant; (status, violations)."""
    run = Torture(folder, model, seed, count)
    status = "ok"
    try:
        function(run, **params)
    except Broken as exc:
        run.violations.append(f"scenario stopped: {exc}")
    except pytest.skip.Exception as exc:
        status = f"skipped: {exc.msg}"
    except Exception as exc:  # noqa: BLE001 - a harness error is reported, and the next scenario runs
        status = f"crashed: {type(exc).__name__}: {exc}"
    finally:
        run.close()
    if run.violations and status == "ok":
        status = "BROKEN"
    return status, run.violations


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="seeds every random choice (default 1)")
    parser.add_argument("--count", type=int, default=None,
                        help="iterations of each scenario (files, writers, kills...); default: 10x its short count")
    parser.add_argument("--scenario", action="append", default=[],
                        help="run only scenarios whose name contains this (repeatable)")
    parser.add_argument("--model", help="an exported model folder (default: train the tiny one)")
    parser.add_argument("--workdir", help="where scenarios work (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    parser.add_argument("--show", type=int, default=5, help="violations shown per broken scenario (default 5)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)

    load_scenarios()
    chosen = [s for s in SCENARIOS.values() if not args.scenario or any(p in s.name for p in args.scenario)]
    if args.list or not chosen:
        for s in SCENARIOS.values():
            grid = ", ".join(f"{k}={v}" for k, v in s.grid.items())
            print(f"{s.name}  (short count {s.short}{'; ' + grid if grid else ''})")
        return 0 if chosen else 2

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edge-inspect-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    model = model_folder(args.model, work)
    rows, details = [], []
    try:
        for s in chosen:
            count = args.count if args.count is not None else 10 * s.short
            for params in s.variants():
                label = s.name.removeprefix("test_") + "".join(f"[{v}]" for v in params.values())
                folder = work / f"{label.replace('[', '-').replace(']', '')}-seed{args.seed}"
                shutil.rmtree(folder, ignore_errors=True)
                print(f"{label} (seed {args.seed}, count {count})...", flush=True)
                start = time.monotonic()
                status, violations = run_one(s.function, params, folder, model, args.seed, count)
                seconds = time.monotonic() - start
                rows.append((label, count, len(violations), status, seconds))
                if violations:
                    details.append((label, violations))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"\nseed {args.seed}")
    print(f"{'scenario':<{width}}  {'iterations':>10}  {'violations':>10}  {'seconds':>8}  status")
    for label, count, n, status, seconds in rows:
        print(f"{label:<{width}}  {count:>10}  {n:>10}  {seconds:>8.1f}  {status}")
    for label, violations in details:
        print(f"\n{label}: {len(violations)} violation(s)")
        for line in violations[:args.show]:
            print(f"  - {line}")
        if len(violations) > args.show:
            print(f"  ... and {len(violations) - args.show} more")
    return 1 if details or any(r[3].startswith("crashed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
