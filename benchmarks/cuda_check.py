"""The runtime on a GPU: does CUDA load, do its verdicts match the CPU's, and how fast is it, side by side.

For a machine with an NVIDIA GPU and ``onnxruntime-gpu``. Three parts:

1. **Loading.** Whether ONNX Runtime's CUDA provider loads in a fresh
   process with nothing done first, and after ``preload_dlls`` (what
   :mod:`edge_inspect.session` does before a CUDA session).
2. **Agreement.** Every image of ``--data`` through the same model folder
   on the CPU and on CUDA, each precision the folder holds: the largest
   relative difference of the deciding criterion's score, the verdicts that
   differ, and AUC-ROC on each device when the data is labelled.
3. **Speed**, in rounds that take the devices in turn: images per second
   through ``inspect_batch`` (preprocessing, session, criteria kernel; the
   images decoded beforehand), and lone-image latency p50/p95.

    python benchmarks/cuda_check.py --model MODEL --data DATA --out OUT

``DATA`` holds ``ok/`` and ``def/`` (or any folder of images). Writes
``OUT/cuda_check.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_PROBE = """
import json, sys
import onnxruntime as ort
if sys.argv[2] == "preload":
    ort.preload_dlls()
s = ort.InferenceSession(sys.argv[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print(json.dumps(s.get_providers()))
"""


def probe(model_file: Path, how: str) -> dict:
    """Providers a fresh process's session gets, with nothing done first (``plain``) or after preload_dlls."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(model_file), how], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    providers = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return {"how": how, "providers": providers, "cuda": bool(providers) and providers[0] == "CUDAExecutionProvider",
            "stderr_tail": proc.stderr.strip().splitlines()[-3:]}


def environment() -> dict:
    import onnxruntime as ort

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        gpu = "no nvidia-smi"
    return {"onnxruntime": ort.__version__, "build": ort.get_device(), "providers": ort.get_available_providers(),
            "gpu": gpu, "python": sys.version.split()[0],
            "numpy": np.__version__}


def scores(inspector, images) -> tuple[np.ndarray, np.ndarray]:
    results = inspector.inspect_batch(images)
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} images failed on {inspector.device}: {errors[0]}")
    return np.array([r.score for r in results], np.float64), np.array([r.verdict for r in results])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lone", type=int, default=50, help="lone images timed per device and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--devices", default="cpu,cuda", help="the reference device, then the one checked against it")
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    if len(devices) != 2:
        parser.error("--devices takes two devices, such as cpu,cuda")

    from edge_inspect.benchmark import labelled_images
    from edge_inspect.calibrate import auc
    from edge_inspect.card import load_card
    from edge_inspect.inspector import Inspector
    from edge_inspect.preprocess import read_image

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment()}
    card = load_card(args.model)
    report["loading"] = [probe(args.model / card.path(card.default_precision).name, how) for how in ("plain", "preload")]

    files, labels = labelled_images(args.data)
    images = [read_image(f) for f in files]
    report["images"] = len(images)

    rows = []
    for precision in card.precisions:
        row: dict = {"precision": precision}
        inspectors = {}
        for device in devices:
            try:
                inspectors[device] = Inspector.load(args.model, precision=precision, device=device,
                                                    batch_size=args.batch_size)
                row[f"{device}_providers"] = inspectors[device].session.get_providers()
            except Exception as exc:  # noqa: BLE001 - recorded, and the row says the device failed
                row[f"{device}_error"] = f"{type(exc).__name__}: {exc}"
        if len(inspectors) < 2:
            rows.append(row)
            continue
        (ref_s, ref_v), (chk_s, chk_v) = (scores(inspectors[d], images) for d in devices)
        scale = np.maximum(np.abs(ref_s), np.abs(ref_s).max() * 1e-6)
        row["max_rel_score_diff"] = float(np.max(np.abs(chk_s - ref_s) / scale))
        row["verdicts_differ"] = int(np.sum(ref_v != chk_v))
        row["threshold"] = inspectors[devices[0]].entry["threshold"]
        if labels is not None:
            row["auc_ref"] = auc(ref_s[labels == 0], ref_s[labels == 1])
            row["auc_checked"] = auc(chk_s[labels == 0], chk_s[labels == 1])

        rates = {d: [] for d in inspectors}
        lone = {d: [] for d in inspectors}
        for _ in range(args.rounds):
            for device, inspector in inspectors.items():
                t = time.perf_counter()
                for i in range(0, len(images), args.batch_size):
                    inspector.inspect_batch(images[i:i + args.batch_size])
                rates[device].append(len(images) / (time.perf_counter() - t))
                time.sleep(0.2)  # an idle spell before the lone parts, as on a line
                for k in range(args.lone):
                    t = time.perf_counter()
                    inspector.inspect(images[k % len(images)])
                    lone[device].append((time.perf_counter() - t) * 1e3)
        for device, key in zip(devices, ("ref", "checked")):
            row[f"{key}_device"] = inspectors[device].device
            row[f"{key}_images_per_s"] = float(np.median(rates[device]))
            row[f"{key}_lone_p50_ms"] = float(np.percentile(lone[device], 50))
            row[f"{key}_lone_p95_ms"] = float(np.percentile(lone[device], 95))
        row["speedup"] = row["checked_images_per_s"] / row["ref_images_per_s"]
        rows.append(row)
    report["rows"] = rows
    (args.out / "cuda_check.json").write_text(json.dumps(report, indent=2))

    print(json.dumps(report["environment"]))
    for item in report["loading"]:
        print(f"CUDA provider, fresh process, {item['how']}: {'loads' if item['cuda'] else 'does not load'} "
              f"{item['providers']} {item['stderr_tail'] if not item['cuda'] else ''}")
    a, b = devices
    print(f"{'precision':<9} {'max rel diff':>12} {'verdicts differ':>15} {'AUC ' + a:>8} {'AUC ' + b:>8} "
          f"{a + ' img/s':>9} {b + ' img/s':>10} {'ratio':>6} {'lone p50/p95 ms, ' + a:>22} {b:>12}")
    for row in rows:
        if "speedup" not in row:
            print(f"{row['precision']:<9} {row.get(a + '_error', '')} {row.get(b + '_error', '')}")
            continue
        print(f"{row['precision']:<9} {row['max_rel_score_diff']:>12.2e} {row['verdicts_differ']:>8}/{len(images):<6} "
              f"{row.get('auc_ref', float('nan')):>8.4f} {row.get('auc_checked', float('nan')):>8.4f} "
              f"{row['ref_images_per_s']:>9.0f} {row['checked_images_per_s']:>10.0f} {row['speedup']:>6.2f} "
              f"{row['ref_lone_p50_ms']:>15.2f}/{row['ref_lone_p95_ms']:<6.2f} "
              f"{row['checked_lone_p50_ms']:>6.2f}/{row['checked_lone_p95_ms']:<6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
