"""`edge-inspect serve` as a real process: two sources, kill -9, reload, health and metrics, a full disk.

The service is started with ``python -m edge_inspect serve --config FILE``,
heard through a real sd_notify socket, scraped over real HTTP, and judged by
its SQLite ledgers.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.runtime.test_watch import WAIT_S, count, rows, wait_for
from tests.runtime.test_watch_crash import NotifySocket, check_consistent, feed, staged
from tests.support import write_parts
from tests.support.mounts import tmpfs

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """A 40-frame MJPG clip of casting-like parts."""
    from edge_inspect.synthetic import make_part

    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (64, 64))
    rng = np.random.default_rng(5)
    for _ in range(40):
        gray = cv2.resize(make_part(rng, 32)[0], (64, 64))
        writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


class Serve:
    """`python -m edge_inspect serve --config FILE` with its own notify socket."""

    def __init__(self, config: Path, log: Path, *, ready: bool = True):
        self.notify = NotifySocket()
        self.log = log
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.address, "COLUMNS": "200"}
        with open(log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_inspect", "serve", "--config", str(config)],
                                         cwd=ROOT, env=env, stdout=out, stderr=out)
        if ready:
            try:
                self.notify.wait_for("READY=1")
            except AssertionError:
                self.proc.kill()
                raise AssertionError(f"serve never got ready: {log.read_text()[-3000:]}") from None

    def finish(self, signum=signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=WAIT_S)
        self.notify.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=WAIT_S)
        self.notify.close()

    def __del__(self):
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.kill()


def config_text(model: Path, folder: Path, *, port: int, camera: Path | None = None, threshold: float | None = None,
                results: Path | None = None, extra: str = "", camera_extra: str = "") -> str:
    text = f'[http]\nport = {port}\n\n[sources.line1]\nkind = "folder"\npath = "{folder}"\nmodel = "{model}"\n'
    text += 'settle = 0.2\nbatch_size = 4\nsinks.sort = true\n'
    if results is not None:
        text += f'sinks.results = "{results}"\n'
    if threshold is not None:
        text += f"threshold = {threshold}\n"
    text += extra
    if camera is not None:
        text += (f'\n[sources.cam]\nkind = "camera"\nuri = "{camera}"\nmodel = "{model}"\n'
                 f'ledger = "{folder.parent / "cam.sqlite"}"\n{camera_extra}')
    return text


def scrape(port: int) -> dict[str, list]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_two_sources_in_one_process_keep_exactly_once_across_kill_9(model_dir, tmp_path, video):  # noqa: F811
    folder, staging, names, results = staged(tmp_path, 120, seed=70)
    config = tmp_path / "config.toml"
    port = free_port()
    config.write_text(config_text(model_dir, folder, port=port, camera=video, results=results))
    ledger = folder / ".edge-inspect" / "ledger.sqlite"
    cam_ledger = tmp_path / "cam.sqlite"

    first = Serve(config, tmp_path / "first.log")
    writer = feed(staging, folder)
    wait_for(lambda: count(ledger) >= 20, what="20 verdicts")
    first.kill()
    writer.join(WAIT_S)
    assert count(ledger) < len(names), "the burst was over before the kill"

    second = Serve(config, tmp_path / "second.log")
    wait_for(lambda: count(ledger) >= len(names), what="every file's verdict")
    wait_for(lambda: not any(p.is_file() for p in folder.iterdir()), what="the sort")
    wait_for(lambda: count(cam_ledger) >= 40, what="the second run's 40 frames")
    metrics = scrape(port)
    assert second.finish() == 0, (tmp_path / "second.log").read_text()[-3000:]
    check_consistent(folder, names, results, sort=True)
    frames = rows(cam_ledger)
    assert len({r["identity"] for r in frames}) == len(frames), "a frame with two verdicts"
    second_run = [r for r in frames if r["frame_index"] is not None]
    assert collections.Counter(r["frame_index"] for r in second_run).most_common(1)[0][1] <= 2  # one per run at most
    for path in (ledger, cam_ledger):
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Both sources share one loaded model: the log says so once per source, the model info carries one sha.
    info = metrics["edge_inspect_model_info"]
    assert {s.labels["source"] for s in info} == {"line1", "cam"}
    assert len({s.labels["sha256"] for s in info}) == 1


def test_health_and_metrics_match_the_ledger_and_a_stopped_camera_turns_503(model_dir, tmp_path, video):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text(model_dir, folder, port=port, camera=video, camera_extra="stale_after = 3\n"))
    serve = Serve(config, tmp_path / "serve.log")
    try:
        write_parts(tmp_path / "staging", 12, size=32, seed=71)
        for path in sorted((tmp_path / "staging").iterdir()):
            os.replace(path, folder / path.name)
        ledger = folder / ".edge-inspect" / "ledger.sqlite"
        wait_for(lambda: count(ledger) == 12, what="12 verdicts")
        wait_for(lambda: count(tmp_path / "cam.sqlite") == 40, what="the clip's 40 frames")
        time.sleep(1.5)  # the last commit's metrics
        metrics = scrape(port)
        by_verdict = collections.Counter((r["verdict"]) for r in rows(ledger))
        parts = {(s.labels["source"], s.labels["verdict"]): s.value for s in metrics["edge_inspect_parts"]
                 if s.name == "edge_inspect_parts_total"}
        for verdict, n in by_verdict.items():
            assert parts[("line1", verdict)] == n
        assert sum(v for (source, _), v in parts.items() if source == "cam") == 40
        # The clip has ended: the camera delivers nothing more, and after stale_after health says so.
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 503,
                 timeout=30, what="503 from /healthz")
        body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert body["sources"]["line1"]["healthy"] is True
        assert body["sources"]["cam"]["healthy"] is False and "no frame" in body["sources"]["cam"]["reason"]
    finally:
        assert serve.finish() == 0


def test_sighup_reload_swaps_the_threshold_during_a_burst_and_a_broken_file_keeps_the_old(model_dir,  # noqa: F811
                                                                                          tmp_path):
    folder, staging, names, results = staged(tmp_path, 150, seed=72)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text(model_dir, folder, port=port, threshold=0.25, results=results))
    ledger = folder / ".edge-inspect" / "ledger.sqlite"
    serve = Serve(config, tmp_path / "serve.log")
    try:
        writer = feed(staging, folder, pause=0.02)
        wait_for(lambda: count(ledger) >= 20, what="20 verdicts")
        config.write_text(config_text(model_dir, folder, port=port, threshold=0.75, results=results))
        serve.proc.send_signal(signal.SIGHUP)
        writer.join(WAIT_S)
        wait_for(lambda: count(ledger) >= len(names), what="every file's verdict")
        wait_for(lambda: "Reload done" in (tmp_path / "serve.log").read_text(), what="the reload")
        # A broken file: the reload fails, the old configuration goes on.
        config.write_text("[sources.line1\n")
        serve.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Reload failed" in (tmp_path / "serve.log").read_text(), what="the failed reload")
        body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert "not valid TOML" in body["reload"]["error"]
        late = [f"late-{path.name}" for path in write_parts(tmp_path / "late", 3, size=32, seed=73)]
        for name in late:
            os.replace(tmp_path / "late" / name.removeprefix("late-"), folder / name)
        wait_for(lambda: count(ledger) == len(names) + 3, what="the parts after the failed reload")
    finally:
        assert serve.finish() == 0, (tmp_path / "serve.log").read_text()[-3000:]
    got = check_consistent(folder, names + late, results, sort=True)
    thresholds = [r["threshold"] for r in got]
    swap = thresholds.index(0.75)
    assert set(thresholds[:swap]) == {0.25} and set(thresholds[swap:]) == {0.75}, "the old threshold after the swap"
    assert 0 < swap < len(names), "the reload did not land during the burst"


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", size="16m") as (folder, _):
        yield folder


def test_a_full_disk_pauses_sorting_keeps_every_verdict_and_sorting_resumes(model_dir, tmp_path,  # noqa: F811
                                                                            small_disk):
    folder = small_disk / "in"
    folder.mkdir()
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text(model_dir, folder, port=port,
                                  extra=f'sinks.heatmaps = "{small_disk / "maps"}"\n')
                      + '\n[disk]\nmin_free = "6MB"\n')
    ledger = folder / ".edge-inspect" / "ledger.sqlite"
    serve = Serve(config, tmp_path / "serve.log")
    try:
        staging = small_disk / "staging"  # the same file system: parts arrive by rename
        write_parts(staging, 30, size=32, seed=74)
        for path in write_parts(small_disk / "defects", 10, size=32, seed=75, defective=True):
            os.replace(path, staging / f"d-{path.name}")
        names = sorted(p.name for p in staging.iterdir())
        ballast = small_disk / "ballast"
        ballast.write_bytes(b"\0" * (11 * 2**20))  # about 4 MB left: below min_free
        for name in names:
            os.replace(staging / name, folder / name)
        wait_for(lambda: count(ledger) == len(names), what="every verdict, though the disk is low")
        time.sleep(2)
        assert any(p.is_file() for p in folder.iterdir()), "sorting went on below disk.min_free"
        body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert body["sources"]["line1"]["sinks_paused"] is True
        ballast.unlink()
        wait_for(lambda: not any(p.is_file() for p in folder.iterdir()), timeout=90, what="sorting resumed")
        wait_for(lambda: all(not r["sinks_pending"] for r in rows(ledger)), timeout=90, what="every sink done")
    finally:
        assert serve.finish() == 0, (tmp_path / "serve.log").read_text()[-3000:]
    check_consistent(folder, names, None, sort=True)
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    log = (tmp_path / "serve.log").read_text()
    assert log.count("Sink sort failed") == 1 and "low disk" in log and log.count("Sink sort works again") == 1


def test_sources_naming_one_model_share_one_session(model_dir, tmp_path):  # noqa: F811
    from edge_inspect import config
    from edge_inspect.service import Models

    loaded = config.validate({"sources": {
        "a": {"kind": "folder", "path": str(tmp_path / "a"), "model": str(model_dir), "threshold": 0.3},
        "b": {"kind": "folder", "path": str(tmp_path / "b"), "model": str(model_dir), "batch_size": 2},
        "c": {"kind": "folder", "path": str(tmp_path / "c"), "model": str(model_dir), "precision": "int8"}}})
    models = Models()
    a, b, c = (models.inspector(name, source) for name, source in loaded.sources.items())
    assert a.session is b.session and c.session is not a.session
    assert a.entry["threshold"] == 0.3 and b.entry["threshold"] != 0.3 and b.batch_size == 2


def test_a_failing_source_is_retried_while_the_other_inspects_on(model_dir, tmp_path):  # noqa: F811
    folder, other = tmp_path / "in", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text(model_dir, folder, port=port)
                      + f'\n[sources.line2]\nkind = "folder"\npath = "{other}"\nmodel = "{model_dir}"\n'
                      + f'ledger = "{tmp_path / "line2.sqlite"}"\nsettle = 0.2\n')
    serve = Serve(config, tmp_path / "serve.log")
    try:
        other.rename(tmp_path / "other-away")  # its watch ends: line2 fails
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 503, timeout=30,
                 what="503 naming line2")
        body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert set(body["unhealthy"]) == {"line2"} and "removed or renamed" in body["unhealthy"]["line2"]
        write_parts(tmp_path / "staging", 5, size=32, seed=76)
        for path in sorted((tmp_path / "staging").iterdir()):
            os.replace(path, folder / path.name)
        wait_for(lambda: count(folder / ".edge-inspect" / "ledger.sqlite") == 5, what="line1 inspecting on")
        (tmp_path / "other-away").rename(other)
        write_parts(other, 2, size=32, seed=77)
        wait_for(lambda: count(tmp_path / "line2.sqlite") == 2, timeout=90, what="line2 back after its retry")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200, timeout=30,
                 what="200 again")
        failures = [s for s in scrape(port)["edge_inspect_source_failures"]
                    if s.name == "edge_inspect_source_failures_total" and s.labels["source"] == "line2"]
        assert failures and failures[0].value >= 1
    finally:
        assert serve.finish() == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "Source line2 failed" in (tmp_path / "serve.log").read_text()


def test_serve_delivers_every_verdict_over_mqtt_through_a_broker_outage_and_a_kill_9(model_dir, tmp_path):  # noqa: F811
    """The broker down at start: verdicts wait in the ledger, backlog in health and metrics; then all arrive."""
    from tests.runtime.test_mqtt import Broker, Subscriber

    broker = Broker(tmp_path / "broker")
    folder, staging, names, _ = staged(tmp_path, 30, seed=78)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text(model_dir, folder, port=port)
                      + f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nstart_at = "start"\ntimeout = 2\n'
                      + '[service]\ninstallation_id = "pc-test"\n')
    ledger = folder / ".edge-inspect" / "ledger.sqlite"
    serve = Serve(config, tmp_path / "first.log")
    try:
        for name in names[:20]:
            os.replace(staging / name, folder / name)
        wait_for(lambda: count(ledger) == 20, what="20 verdicts with the broker down")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["sources"]["line1"]
                 ["deliveries"]["mqtt"]["backlog"] == 20, timeout=30, what="the backlog in health")
        body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert body["sources"]["line1"]["deliveries"]["mqtt"]["outage"], body
        samples = {(s.name, s.labels.get("sink")): s.value for family in scrape(port).values() for s in family}
        assert samples[("edge_inspect_delivery_backlog_parts", "mqtt")] == 20
        assert samples[("edge_inspect_delivery_up", "mqtt")] == 0
        broker.start()
        subscriber = Subscriber(broker.port, "edge-inspect/pc-test/line1/verdict", client_id="serve-test")
        wait_for(lambda: subscriber.count() >= 20, timeout=60, what="the backlog delivered")
        serve.kill()  # kill -9 during delivery of what comes next
        for name in names[20:]:
            os.replace(staging / name, folder / name)
        serve = Serve(config, tmp_path / "second.log")
        wait_for(lambda: count(ledger) == len(names), what="every verdict")
        wait_for(lambda: len({p["id"] for p in subscriber.payloads()}) == len(names), timeout=60,
                 what="every verdict delivered")
    finally:
        assert serve.finish() == 0
        broker.stop()
    got = {p["sequence"]: p for p in subscriber.payloads()}
    assert sorted(got) == sorted(r["id"] for r in rows(ledger))
    assert all(p["id"].startswith("pc-test:line1:") and p["source"] == "line1" for p in got.values())
    by_id = {r["id"]: r for r in rows(ledger)}
    assert all(got[k]["verdict"] == by_id[k]["verdict"] for k in got)
    print(f"duplicates seen by the subscriber: {len(subscriber.payloads()) - len(got)}")
