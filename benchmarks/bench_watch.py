"""Benchmark: `edge-inspect watch` latency and burst drain against predict's batched throughput (a script, not a test).

Measures, in one run, on the same image files, the same model folder and the
same batch size:

- **single image**: ``Inspector.inspect(image)`` on decoded images, one at
  a time (preprocessing, session, criteria kernel, decision), p50 and p95,
  before and after the watcher runs: the model's own latency, which the
  watch latency is compared with (the mean of the two);
- **predict**: :func:`edge_inspect.sources.files.inspect_files` over the
  burst's files (read, decode and inspect in batches, as ``edge-inspect
  predict`` does), images per second; measured before and after the
  watcher runs, so that a change of load on a shared machine shows;
- **watch, steady**: ``edge-inspect watch`` as its own process (event mode,
  the default; per-verdict logging to a file) while this script renames
  files into its folder at a steady rate, well under its capacity. The
  latency of each file is ``committed_at`` in the ledger minus the time
  right after the rename that made the file appear complete; p50 and p95.
  Once a file's verdict is in, the script times one single-image inference
  of its own before the next file, so the two are measured side by side,
  under the same load;
- **watch, burst**: then ``--burst`` files renamed in as fast as possible;
  drain time from the first rename to the last ``committed_at``, and the
  rate, compared with predict's.
- **serve** (``--serve``): the same steady phase and burst through
  ``edge-inspect serve`` with two sources (the measured folder and a second,
  idle one, on the same model) and metrics on, scraped once a second; its
  burst drain and steady p95 against watch's, side by side in one run.
- **serve with MQTT** (``--mqtt``, needs mosquitto): the same again with
  the MQTT sink on, to a local broker and a QoS-1 subscriber: its burst
  drain against serve's without it, the time from commit to the
  subscriber's receipt (p50, p95) over the steady phase, and, with the
  broker stopped for ``--outage`` seconds during a steady stream, the time
  from the broker's restart until the subscriber has every verdict.

``committed_at`` is taken just before the verdict's transaction; the
commit's sync (``synchronous=FULL``) follows it, so the script also times
one single-row commit to a ledger on the same file system, and adds it to
the p95 latency in the ratio with the target.

    python benchmarks/bench_watch.py --model /tmp/bench-model --data /tmp/bench-data/ok

Without ``--model`` a tiny model is trained and exported the way the tests'
fixture does (``tests/runtime/conftest.py``; needs the ``train`` extra).
Without ``--data`` synthetic parts of ``--image-size`` pixels are written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from edge_inspect.inspector import Inspector  # noqa: E402
from edge_inspect.preprocess import read_image  # noqa: E402
from edge_inspect.sources.files import inspect_files, iter_image_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def stage_files(sources: list[Path], folder: Path, count: int, prefix: str) -> list[Path]:
    """``count`` copies of the source images (cycled) under new names, in ``folder``."""
    folder.mkdir(parents=True)
    out = []
    for i in range(count):
        source = sources[i % len(sources)]
        target = folder / f"{prefix}{i:05d}{source.suffix}"
        shutil.copyfile(source, target)
        out.append(target)
    return out


def single_image(inspector: Inspector, files: list[Path], n: int) -> list[float]:
    images = [read_image(p) for p in files[:n]]
    for image in images[:5]:
        inspector.inspect(image)
    times = []
    for image in images:
        start = time.perf_counter()
        inspector.inspect(image)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def predict_rate(inspector: Inspector, files: list[Path]) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in inspect_files(inspector, files))
    return n / (time.perf_counter() - start)


def commit_cost(folder: Path, rounds: int = 50) -> float:
    """Median ms of one single-row commit with the ledger's settings, on ``folder``'s file system."""
    from edge_inspect.ledger import Ledger, Record, file_identity

    path = folder / ".commit-cost.sqlite"
    times = []
    with Ledger.open(path) as ledger:
        for i in range(rounds):
            now = time.time()
            record = Record(identity=file_identity(f"/x/{i}", i, i, None), kind="file", source=f"/x/{i}",
                            verdict="ok", arrived_at=now, committed_at=now, latency_ms=0.0)
            start = time.perf_counter()
            ledger.record([record])
            times.append((time.perf_counter() - start) * 1e3)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return statistics.median(times)


class Watcher:
    """``edge-inspect watch`` in a child process; READY heard on a notify socket drained on a thread."""

    def __init__(self, folder: Path, model: Path, args: argparse.Namespace, log: Path, extra=(), serve=None):
        address = f"@bench-watch-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:])
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        command = [sys.executable, "-m", "edge_inspect.cli", "watch", str(folder), "--model", str(model),
                   "--batch-size", str(args.batch_size), "--device", args.device, "--settle", "0.2", *extra]
        if serve is not None:
            command = [sys.executable, "-m", "edge_inspect", "serve", "--config", str(serve)]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=out,
                                         env={**os.environ, "NOTIFY_SOCKET": address})
        if not self.ready.wait(300):
            self.proc.kill()
            raise SystemExit(f"the watcher did not get ready; see {log}")

    def _drain(self):
        while True:
            data = self.sock.recv(4096)
            if not data:
                return
            if b"READY=1" in data:
                self.ready.set()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(300)
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        return code


def stages(ledger: Path, closed: dict[str, float], names: list[str]) -> dict[str, float]:
    """Median ms of each stage for the named files: event, read + decode, inspect, to the commit."""
    with sqlite3.connect(ledger) as conn:
        rows = {Path(r[0]).name: r[1:] for r in conn.execute(
            "SELECT source, arrived_at, read_at, inspected_at, committed_at FROM parts")}
    spans = {"event (close -> source)": [], "read, hash, decode": [], "queue + inspect": [], "to commit": []}
    for name in names:
        arrived, read, inspected, done = rows[name]
        for key, (a, b) in zip(spans, [(closed[name], arrived), (arrived, read), (read, inspected), (inspected, done)]):
            spans[key].append((b - a) * 1e3)
    return {key: statistics.median(v) for key, v in spans.items()}


def committed(ledger: Path) -> dict[str, float]:
    """File name -> committed_at, from the ledger."""
    if not ledger.exists():
        return {}
    with sqlite3.connect(ledger) as conn:
        try:
            return {Path(s).name: t for s, t in conn.execute("SELECT source, committed_at FROM parts")}
        except sqlite3.OperationalError:
            return {}


def wait_count(ledger: Path, n: int, timeout: float = 1800.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = committed(ledger)
        if len(rows) >= n:
            return rows
        time.sleep(0.2)
    raise SystemExit(f"only {len(committed(ledger))} of {n} verdicts after {timeout} s")


def serve_config(work: Path, folder: Path, model: Path, args: argparse.Namespace,
                 mqtt_port: int | None = None) -> tuple[Path, int]:
    """Two folder sources on one model (the measured one and an idle one), metrics on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    idle = work / "idle"
    idle.mkdir(exist_ok=True)
    path = work / "serve.toml"
    source = f'model = "{model}"\nbatch_size = {args.batch_size}\ndevice = "{args.device}"\nsettle = 0.2\n'
    mqtt = (f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nsources = ["line"]\nstart_at = "start"\n\n'
            if mqtt_port else "")
    path.write_text(f'[http]\nport = {port}\n\n{mqtt}[sources.line]\nkind = "folder"\npath = "{folder}"\n{source}\n'
                    f'[sources.idle]\nkind = "folder"\npath = "{idle}"\n{source}')
    return path, port


class Receipts:
    """A QoS-1 subscriber with a persistent session: when each verdict (by sequence) first arrived."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.first: dict[int, float] = {}
        self.committed: dict[int, float] = {}
        self.duplicates = 0
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-receipts", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, *a: c.subscribe("edge-inspect/+/+/verdict", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=properties)
        self.client.loop_start()
        if not ready.wait(10):
            raise SystemExit("the benchmark's MQTT subscriber got no SUBACK")

    def _message(self, client, userdata, msg):
        import json

        now = time.time()
        data = json.loads(msg.payload)
        with self.lock:
            if data["sequence"] in self.first:
                self.duplicates += 1
            else:
                self.first[data["sequence"]] = now
                self.committed[data["sequence"]] = data["timestamps"]["committed"]

    def count(self) -> int:
        with self.lock:
            return len(self.first)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def scrape_every_second(port: int, stop: threading.Event) -> None:
    import urllib.request

    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            pass


def run_watch(model, args, work: Path, steady: list[Path], burst: list[Path], inspector: Inspector,
              images: list[np.ndarray], extra=(), label="", serve: bool = False, broker=None,
              outage: list[Path] | None = None) -> dict:
    folder = work / f"in{label}"
    folder.mkdir()
    ledger = folder / ".edge-inspect" / "ledger.sqlite"
    receipts = Receipts(broker.port) if broker is not None else None
    config, port = (serve_config(work, folder, model, args, broker.port if broker else None) if serve
                    else (None, None))
    watcher = Watcher(folder, model, args, work / f"watch{label}.log", extra, serve=config)
    scraping = threading.Event()
    if serve:
        threading.Thread(target=scrape_every_second, args=(port, scraping), daemon=True).start()
    closed: dict[str, float] = {}
    single: list[float] = []
    try:
        conn = sqlite3.connect(ledger)
        for k, path in enumerate(steady):
            start = time.time()
            os.replace(path, folder / path.name)
            closed[path.name] = time.time()
            source = str(folder / path.name)
            while conn.execute("SELECT 1 FROM parts WHERE source = ?", (source,)).fetchone() is None:
                time.sleep(0.005)
            # Side by side: one single-image inference here, between two files, under the same load.
            tick = time.perf_counter()
            inspector.inspect(images[k % len(images)])
            single.append((time.perf_counter() - tick) * 1e3)
            time.sleep(max(0.0, 1.0 / args.rate - (time.time() - start)))
        conn.close()
        wait_count(ledger, len(steady))
        first = time.time()
        for path in burst:
            os.replace(path, folder / path.name)
            closed[path.name] = time.time()
        rows = wait_count(ledger, len(steady) + len(burst))
        recovery = None
        if receipts is not None:
            wait_receipts(receipts, len(steady) + len(burst))
            if outage:
                # A steady stream; the broker stops for args.outage seconds in the middle of it.
                broker.stop()
                down = time.monotonic()
                for k, path in enumerate(outage):
                    os.replace(path, folder / path.name)
                    time.sleep(max(0.0, down + (k + 1) / args.rate - time.monotonic()))
                    if time.monotonic() - down >= args.outage:
                        break
                wait_count(ledger, len(steady) + len(burst) + k + 1)
                broker.start()
                back = time.monotonic()
                wait_receipts(receipts, len(steady) + len(burst) + k + 1)
                recovery = {"seconds": time.monotonic() - back, "waiting": k + 1}
    finally:
        scraping.set()
        code = watcher.stop()
        if receipts is not None:
            receipts.close()
    steady_ms = [(rows[p.name] - closed[p.name]) * 1e3 for p in steady]
    drain = max(rows[p.name] for p in burst) - first
    receipt_ms = None
    if receipts is not None:
        receipt_ms = [(receipts.first[k] - receipts.committed[k]) * 1e3 for k in range(1, len(steady) + 1)]
    return {"receipt_ms": receipt_ms, "recovery": recovery,
            "duplicates": receipts.duplicates if receipts else None, "steady_ms": steady_ms, "single_ms": single, "drain_s": drain, "rate": len(burst) / drain, "exit": code,
            "stages": stages(ledger, closed, [p.name for p in steady])}


def wait_receipts(receipts: Receipts, n: int, timeout: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout
    while receipts.count() < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {receipts.count()} of {n} verdicts reached the MQTT subscriber")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: train and export a tiny one)")
    parser.add_argument("--data", type=Path, help="image files to use, cycled (default: synthetic parts)")
    parser.add_argument("--image-size", type=int, default=300, help="side of the synthetic parts")
    parser.add_argument("--steady", type=int, default=100, help="files at a steady rate")
    parser.add_argument("--rate", type=float, default=4.0, help="files per second of the steady phase")
    parser.add_argument("--burst", type=int, default=1000, help="files of the burst")
    parser.add_argument("--single", type=int, default=50, help="images timed one at a time")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--with-sinks", action="store_true", help="also run the watcher with --sort and --results")
    parser.add_argument("--serve", action="store_true", help="also run serve: two sources, metrics scraped")
    parser.add_argument("--mqtt", action="store_true", help="also run serve with the MQTT sink (needs mosquitto)")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the broker is down in the MQTT run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from tests.runtime.conftest import tiny_model

        model = tiny_model(work / "model")
    if args.data is not None:
        sources = iter_image_files([args.data])
    else:
        from edge_inspect.synthetic import write_parts

        sources = write_parts(work / "parts", 64, size=args.image_size, seed=0)
    runs = [("", ())] + ([("-sinks", ("--sort", "--results", str(work / "verdicts.jsonl")))] if args.with_sinks else [])
    runs += [("-serve", ())] if args.serve or args.mqtt else []
    runs += [("-mqtt", ())] if args.mqtt else []
    staged = {label: (stage_files(sources, work / f"steady{label}", args.steady, "s"),
                      stage_files(sources, work / f"burst{label}", args.burst, "b")) for label, _ in runs}

    broker = None
    if args.mqtt:
        sys.path.insert(0, str(ROOT))
        from tests.runtime.test_mqtt import Broker

        broker = Broker(work / "broker")
        broker.start()
    outage = stage_files(sources, work / "outage", int(args.outage * args.rate) + 1, "o") if args.mqtt else None
    inspector = Inspector.load(model, device=args.device, batch_size=args.batch_size)
    load = os.getloadavg()[0]
    print(f"model {model} ({inspector.precision} on {inspector.device}, {inspector.size[0]} px), batch "
          f"{args.batch_size}; {len(sources)} source images; load average {load:.1f}")
    single = single_image(inspector, sources, args.single)
    before = predict_rate(inspector, staged[""][1])
    cost = commit_cost(work)
    images = [read_image(p) for p in sources[:args.single]]
    results = {label: run_watch(model, args, work, *staged[label], inspector, images, extra=extra, label=label,
                                serve=label in ("-serve", "-mqtt"), broker=broker if label == "-mqtt" else None,
                                outage=outage if label == "-mqtt" else None)
               for label, extra in runs}
    if broker is not None:
        broker.stop()
    after = predict_rate(inspector, list((work / "in").glob("b*")))
    single_after = single_image(inspector, sources, args.single)
    predict = (before + after) / 2
    s50 = (percentile(single, 50) + percentile(single_after, 50)) / 2

    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| single image, ms p50 / p95 (before; after) | {percentile(single, 50):.1f} / "
          f"{percentile(single, 95):.1f}; {percentile(single_after, 50):.1f} / {percentile(single_after, 95):.1f} |")
    print(f"| predict, images/s (before / after) | {before:.1f} / {after:.1f} |")
    print(f"| one single-row ledger commit, ms (median) | {cost:.2f} |")
    for label, r in results.items():
        name = {"": "watch", "-sinks": "watch --sort --results", "-serve": "serve (2 sources, metrics)",
                "-mqtt": "serve + MQTT"}[label]
        w50, w95 = percentile(r["steady_ms"], 50), percentile(r["steady_ms"], 95)
        i50, i95 = percentile(r["single_ms"], 50), percentile(r["single_ms"], 95)
        print(f"| {name}: steady latency, ms p50 / p95 ({args.steady} files at {args.rate:g}/s) | "
              f"{w50:.1f} / {w95:.1f} |")
        print(f"| {name}: single image between those files, ms p50 / p95 | {i50:.1f} / {i95:.1f} |")
        print(f"| {name}: burst of {args.burst}, drain s / images/s | {r['drain_s']:.1f} / {r['rate']:.1f} |")
        print(f"| {name}: (p95 latency + one commit) / single-image p50 between (target <= 1.5) | "
              f"**{(w95 + cost) / i50:.2f}** |")
        print(f"| {name}: (p95 latency + one commit) / single-image p50 before and after | "
              f"{(w95 + cost) / s50:.2f} |")
        print(f"| {name}: predict rate / burst rate (target <= 1.3) | **{predict / r['rate']:.2f}** |")
        print(f"| {name}: p50 latency / single-image p50 between; p95 / p95 between | {w50 / i50:.2f}; "
              f"{(w95 + cost) / i95:.2f} |")
        print(f"| {name}: exit code after SIGTERM | {r['exit']} |")
        print(f"| {name}: steady, median ms per stage | "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()) + " |")
    if "-mqtt" in results:
        v, m = results["-serve"], results["-mqtt"]
        r50, r95 = percentile(m["receipt_ms"], 50), percentile(m["receipt_ms"], 95)
        print(f"| serve + MQTT / serve: burst drain time (target <= 1.10) | **{m['drain_s'] / v['drain_s']:.3f}** |")
        print(f"| MQTT: commit to subscriber's receipt, ms p50 / p95 (target p95 < 20) | {r50:.1f} / **{r95:.1f}** |")
        if m["recovery"]:
            print(f"| MQTT: after a {args.outage:g} s broker outage, {m['recovery']['waiting']} verdicts waiting: "
                  f"seconds from the broker's restart to the last receipt | **{m['recovery']['seconds']:.1f}** |")
        print(f"| MQTT: duplicates the subscriber saw | {m['duplicates']} |")
    if "-serve" in results:
        w, v = results[""], results["-serve"]
        print(f"| serve / watch: burst drain time (target <= 1.05) | **{v['drain_s'] / w['drain_s']:.3f}** |")
        print(f"| serve / watch: steady p95 latency | **{percentile(v['steady_ms'], 95) / percentile(w['steady_ms'], 95):.3f}** |")
    print(f"\nwork folder (logs, ledgers): {work}")


if __name__ == "__main__":
    main()
