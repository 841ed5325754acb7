"""Benchmark: the paper-style Keras pipeline against the ONNX Runtime inspector (a script, not a test).

Times, in one run, on the same decoded images, the same model and the same
input size, from a decoded image to its fourteen criteria and its verdict:

- ``keras predict``: the paper-style pipeline: the shared preprocessing,
  Keras ``model.predict`` on the batch, then the fourteen criteria with the
  plain NumPy/SciPy twins of ``tests/runtime/naive.py`` image by image
  (``NUMPY_TWINS``), then the threshold;
- ``keras call``: the same with ``model(x, training=False)`` in place of
  ``predict`` (``predict`` builds a data pipeline on every call), for
  reference;
- ``runtime fp32`` and ``runtime int8``: :class:`edge_inspect.inspector.Inspector`
  on the model folder's ``model.onnx`` and ``model.int8.onnx``;
- ablations of the export and session choices: the graphs with the
  original ConvTranspose (no subpixel rewrite) at fp32 and int8; with the
  subpixel rewrite but the last pixel shuffle before the output Conv (no
  ``shuffle_after_narrow_conv``) at fp32 and int8; and int8 with ORT's
  workers spinning after each run too (ORT's default) and never spinning.

Throughput: every pipeline processes the same ``--timing-images`` images in
batches of ``--batch`` per round, the pipelines taking turns within each
round so that load from other processes falls on all alike; the table
gives the median over ``--rounds`` rounds, and each ratio is the median of
the per-round ratios. Single-image latency: ``--single`` images one at a
time per round, median; then ``--idle`` more, each after ``--idle-gap``
seconds of idle (a lone part on a quiet line: thread wake-ups and cold
caches included), p50 and p95. AUC-ROC of the card's default criterion over all
the labelled images (``DATA/ok`` normal, ``DATA/def`` or ``DATA/ng``
defective), once per pipeline.

FLOPs per image are counted from the ONNX graphs (2 x multiply-adds of
every Conv, ConvTranspose, MatMul and Gemm). GFLOP/s and the fraction of
peak count the model's own FLOPs (the ConvTranspose graph, what Keras
runs) for every row, not the subpixel graph's extra zero taps. The CPU's
fp32 peak is cores x clock x 32 FLOP/cycle (two 256-bit FMA pipes: AVX2 +
FMA).

    python benchmarks/bench_runtime.py --run /tmp/bench-run --model /tmp/bench-model --data /tmp/bench-data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from edge_inspect.calibrate import auc, is_anomalous, oriented  # noqa: E402
from edge_inspect.card import load_card  # noqa: E402
from edge_inspect.inspector import Inspector  # noqa: E402
from edge_inspect.kernels import CRITERIA  # noqa: E402
from edge_inspect.preprocess import preprocess, read_image  # noqa: E402
from edge_inspect.session import session_options  # noqa: E402
from edge_inspect.sources.files import iter_image_files  # noqa: E402
from tests.runtime import naive  # noqa: E402


def graph_flops(proto, size: tuple[int, int]) -> int:
    """FLOPs of one image through an ONNX graph: 2 x the multiply-adds of its Conv, ConvTranspose, MatMul, Gemm."""
    import onnx
    from onnx import numpy_helper, shape_inference

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    proto = shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*proto.graph.value_info, *proto.graph.input, *proto.graph.output)}
    weights = {t.name: numpy_helper.to_array(t).shape for t in proto.graph.initializer}
    total = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]  # (Cout, Cin/group, kh, kw)
            out = shapes[node.output[0]]
            total += 2 * int(np.prod(w)) * out[2] * out[3]
        elif node.op_type == "ConvTranspose":
            w = weights[node.input[1]]  # (Cin, Cout/group, kh, kw)
            x = shapes[node.input[0]]
            total += 2 * int(np.prod(w)) * x[2] * x[3]
        elif node.op_type in ("MatMul", "Gemm"):
            w = weights.get(node.input[1]) or shapes[node.input[1]]
            rows = int(np.prod(shapes[node.input[0]][:-1]))
            total += 2 * rows * int(np.prod(w))
    return total


def cpu_peak_gflops() -> tuple[float, str]:
    cores = len(os.sched_getaffinity(0))
    mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    model = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    ghz = max(mhz) / 1000 if mhz else float("nan")
    return cores * ghz * 32, f"{model}, {cores} cores at {ghz:.2f} GHz (as /proc/cpuinfo reports), AVX2+FMA"


def keras_pipeline(model, size, entry, column, *, direct: bool):
    def run(images):
        batch = np.stack([preprocess(image, size) for image in images])
        if direct:
            recons = np.asarray(model(batch[..., None], training=False))[..., 0]
        else:
            recons = model.predict(batch[..., None], batch_size=len(batch), verbose=0)[..., 0]
        scores = naive.criteria(batch, recons.astype(np.float32), twins=naive.NUMPY_TWINS)
        return oriented(scores[:, column], entry), is_anomalous(scores[:, column], entry)

    return run


def runtime_pipeline(inspector):
    def run(images):
        results = inspector.inspect_batch(images)
        return np.array([r.score for r in results]), np.array([r.verdict == "ng" for r in results])

    return run


def inspector_from_graph(card, proto_bytes, precision, *, spinning="stop"):
    """An Inspector on ``proto_bytes``; ``spinning``: ``stop`` (the runtime's
    choice: spin within a run, stop at its end), ``on`` (ORT's default: keep
    spinning after a run) or ``off`` (never spin)."""
    import onnxruntime as ort

    options = session_options()  # spinning="stop" is its own choice
    if spinning != "stop":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "off" else "1")
        options.add_session_config_entry("session.force_spinning_stop", "0")
    session = ort.InferenceSession(proto_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    inspector = Inspector(card, session, device="cpu", precision=precision, batch_size=16)
    inspector.warmup()
    return inspector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="the calibrated run folder the model was exported from")
    parser.add_argument("--model", required=True, type=Path, help="its model folder, with model.int8.onnx")
    parser.add_argument("--data", required=True, type=Path, help="labelled images: DATA/ok and DATA/def (or ng)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timing-images", type=int, default=128)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--idle", type=int, default=4, help="images per round timed one at a time after an idle gap")
    parser.add_argument("--idle-gap", type=float, default=0.25, help="seconds of idle before each of those")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import keras
    import onnx
    import tensorflow as tf

    import export.models  # noqa: F401  (registers the model classes)
    from export.graph_rewrites import subpixel_conv_transpose
    from export.quantize import int8_calibration_images, quantize_int8
    from export.to_onnx import convert
    from export.scoring import load_run

    load0 = os.getloadavg()
    card = load_card(args.model)
    size = card.size
    name = card.default_criterion
    entry, column = card.calibration["criteria"][name], CRITERIA.index(name)
    model = keras.models.load_model(args.run / "model.keras")

    sub = next(p for p in ("def", "ng") if (args.data / p).is_dir())
    normal, defective = iter_image_files([args.data / "ok"]), iter_image_files([args.data / sub])
    images = [read_image(p) for p in normal + defective]
    labels = np.r_[np.zeros(len(normal), int), np.ones(len(defective), int)]
    pick = np.r_[np.linspace(0, len(normal) - 1, args.timing_images // 2).astype(int),
                 len(normal) + np.linspace(0, len(defective) - 1, args.timing_images // 2).astype(int)]
    timing = [images[i] for i in pick]

    pipelines = {
        "keras predict": keras_pipeline(model, size, entry, column, direct=False),
        "keras call": keras_pipeline(model, size, entry, column, direct=True),
        "runtime fp32": runtime_pipeline(Inspector.load(args.model, precision="fp32", device="cpu", batch_size=args.batch)),
        "runtime int8": runtime_pipeline(Inspector.load(args.model, precision="int8", device="cpu", batch_size=args.batch)),
    }
    run = load_run(args.run)
    plain = convert(run.model, size, card.data["opset"], subpixel=False)
    flops = {"model (Keras, ConvTranspose graph)": graph_flops(plain, size),
             "exported graph (subpixel Conv)": graph_flops(onnx.load(card.path("fp32")), size)}
    if not args.no_ablations:
        tmp = Path("/tmp") / f"bench-runtime-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        quant_images = int8_calibration_images(run)
        plain_int8 = quantize_int8(plain, quant_images, tmp)
        early = subpixel_conv_transpose(plain)  # the last shuffle stays before the output Conv
        early_int8 = quantize_int8(early, quant_images, tmp)
        tmp.rmdir()
        pipelines["fp32, ConvTranspose"] = runtime_pipeline(inspector_from_graph(card, plain.SerializeToString(), "fp32"))
        pipelines["int8, ConvTranspose"] = runtime_pipeline(inspector_from_graph(card, plain_int8.SerializeToString(), "int8"))
        pipelines["fp32, shuffle before output Conv"] = runtime_pipeline(
            inspector_from_graph(card, early.SerializeToString(), "fp32"))
        pipelines["int8, shuffle before output Conv"] = runtime_pipeline(
            inspector_from_graph(card, early_int8.SerializeToString(), "int8"))
        int8_bytes = card.path("int8").read_bytes()
        pipelines["int8, spinning after runs"] = runtime_pipeline(
            inspector_from_graph(card, int8_bytes, "int8", spinning="on"))
        pipelines["int8, no spinning"] = runtime_pipeline(inspector_from_graph(card, int8_bytes, "int8", spinning="off"))
    for run_fn in pipelines.values():  # warm-up: JIT, TF graph tracing, ORT buffers
        run_fn(timing[: args.batch])

    per_round = {k: [] for k in pipelines}
    single = {k: [] for k in pipelines}
    idle = {k: [] for k in pipelines}
    for _ in range(args.rounds):
        for key, run_fn in pipelines.items():
            start = time.perf_counter()
            for i in range(0, len(timing), args.batch):
                run_fn(timing[i:i + args.batch])
            per_round[key].append(len(timing) / (time.perf_counter() - start))
            for image in timing[: args.single]:
                start = time.perf_counter()
                run_fn([image])
                single[key].append((time.perf_counter() - start) * 1e3)
            for image in timing[args.single: args.single + args.idle]:
                time.sleep(args.idle_gap)
                start = time.perf_counter()
                run_fn([image])
                idle[key].append((time.perf_counter() - start) * 1e3)
    load1 = os.getloadavg()

    aucs = {}
    for key in ("keras call", "runtime fp32", "runtime int8"):
        scores = np.concatenate([pipelines[key](images[i:i + args.batch])[0] for i in range(0, len(images), args.batch)])
        aucs[key] = auc(scores[labels == 0], scores[labels == 1])
    aucs["keras predict"] = aucs["keras call"]  # same model, same scores

    peak, cpu = cpu_peak_gflops()
    base = np.array(per_round["keras predict"])
    model_flops = flops["model (Keras, ConvTranspose graph)"]
    rows = []
    for key in pipelines:
        ips = float(np.median(per_round[key]))
        rows.append({
            "pipeline": key,
            "images_per_s": ips,
            "speedup_vs_keras_predict": float(np.median(np.array(per_round[key]) / base)),
            "single_ms_p50": float(np.median(single[key])),
            "after_idle_ms_p50_p95": [float(np.percentile(idle[key], q)) for q in (50, 95)] if idle[key] else None,
            "auc_roc": aucs.get(key),
            "gflops_per_s": ips * model_flops / 1e9,
            "fraction_of_fp32_peak": ips * model_flops / 1e9 / peak,
        })
    report = {
        "machine": cpu, "python": platform.python_version(), "tensorflow": tf.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "model": card.model_kind, "size": size, "criterion": name, "batch": args.batch, "rounds": args.rounds,
        "timing_images": len(timing), "auc_images": {"normal": int((labels == 0).sum()), "defective": int(labels.sum())},
        "flops_per_image": flops, "fp32_peak_gflops": peak, "load_average_before_after": [load0[0], load1[0]],
        "rows": rows,
    }
    print(f"{cpu}; fp32 peak {peak:.0f} GFLOP/s; load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"{card.model_kind} {size[0]}x{size[1]}, criterion {name}; FLOPs/image: "
          + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in flops.items()))
    print(f"| pipeline | images/s | x keras predict | 1-image ms (p50) | AUC-ROC ({report['auc_images']['normal']} + "
          f"{report['auc_images']['defective']}) | GFLOP/s | of fp32 peak | 1-image ms after {args.idle_gap:g} s idle "
          "(p50 / p95) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        auc_text = f"{row['auc_roc']:.4f}" if row["auc_roc"] is not None else "-"
        print(f"| {row['pipeline']} | {row['images_per_s']:.1f} | {row['speedup_vs_keras_predict']:.2f} | "
              f"{row['single_ms_p50']:.1f} | {auc_text} | {row['gflops_per_s']:.1f} | {row['fraction_of_fp32_peak']:.0%} | "
              + (" / ".join(f"{v:.1f}" for v in row["after_idle_ms_p50_p95"]) if row["after_idle_ms_p50_p95"] else "-")
              + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
