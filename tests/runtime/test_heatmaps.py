"""Heatmap overlays, checked pixel by pixel: the part's own grey where nothing was found, the banner, the scale.

The overlays come from real calls (the function, the sink, ``predict``), not
from a drawing of what they should be.
"""

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edge_inspect.cli import app
from edge_inspect.inspector import HEATMAP_FULL_SCALE, HEATMAP_MIN_WIDTH, heatmap_overlay
from edge_inspect.ledger import Record
from edge_inspect.sinks import Done, HeatmapSink
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.support import make_part

runner = CliRunner()

DECISION = {"score": 0.8342, "threshold": 0.6123, "verdict": "ng", "criterion": "range"}


def _map(size: int = 32) -> np.ndarray:
    """A residual that is zero except in one block (above full scale) in the upper left quarter."""
    amap = np.zeros((size, size), np.float32)
    amap[4:12, 4:12] = 2 * HEATMAP_FULL_SCALE
    return amap


def _text_rows(banner: np.ndarray) -> np.ndarray:
    """Rows of the banner that hold light text pixels (the banner itself is dark grey)."""
    return np.flatnonzero((banner.min(axis=2) > 150).any(axis=1))


@pytest.mark.parametrize("size", [64, 1024])
def test_zero_residual_keeps_the_parts_own_grey_and_the_banner_is_legible(size):
    image = make_part(np.random.default_rng(3), size=size)[0]
    overlay = heatmap_overlay(image, _map(), **DECISION)
    width = max(size, HEATMAP_MIN_WIDTH)
    assert overlay.shape[1] == width and overlay.shape[0] > size
    # The part at its own size, centred; a small one on a dark canvas, a large one filling the width.
    left = (width - size) // 2
    picture, banner = overlay[:size, left:left + size], overlay[size:]
    canvas = np.delete(overlay[:size], np.s_[left:left + size], axis=1)
    assert canvas.size == 0 if size >= HEATMAP_MIN_WIDTH else (canvas == canvas[0, 0]).all() and canvas.max() < 64
    # The lower half had zero residual: every pixel is the part's own, in all three channels.
    half = size // 2
    assert np.array_equal(picture[half:], np.repeat(image[half:, :, None], 3, axis=2))
    # The defect block is tinted red (JET at full scale), not left grey.
    inner = slice(6 * size // 32, 10 * size // 32)  # inside the block, clear of its blurred edge
    block = picture[inner, inner]
    assert (block[..., 2].astype(int) - block[..., 0].astype(int)).mean() > 40
    # The banner: two lines of text at least 9 px high on a 64 px part, larger on a large one.
    rows = _text_rows(banner)
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    assert len(runs) >= 2, "the decision line and the colour bar's labels"
    assert len(runs[0]) >= (9 if size == 64 else 20)
    # The verdict word in red (BGR): only an NG banner has it.
    red = (banner[..., 2] > 180) & (banner[..., 1] < 120) & (banner[..., 0] < 120)
    assert red[runs[0]].sum() > 20
    # The colour bar: one banner row runs from JET's blue to its red, left to right.
    bar_row = banner[runs[1][len(runs[1]) // 2]]
    blue = np.flatnonzero((bar_row[:, 0] > 100) & (bar_row[:, 2] < 60) & (bar_row[:, 1] < 60))
    reds = np.flatnonzero((bar_row[:, 2] > 100) & (bar_row[:, 0] < 60) & (bar_row[:, 1] < 60))
    assert blue.size and reds.size and blue.min() < reds.max()
    assert (bar_row[blue.min(): reds.max()].max(axis=1) > 100).all(), "the bar is continuous"


def test_a_small_parts_overlay_stays_small_on_disk():
    image = np.random.default_rng(6).integers(0, 256, (32, 32), np.uint8)   # texture: PNG cannot shrink the part
    overlay = heatmap_overlay(image, _map(), **DECISION)
    ok, encoded = cv2.imencode(".png", overlay)
    ok_alone, alone = cv2.imencode(".png", heatmap_overlay(image, _map(), banner=False))
    assert ok and ok_alone
    # The canvas and the banner are flat colour and text: what they add does not grow with the part's pixels
    # (the part enlarged 16 times to fill the width made this file about 280 KB).
    assert len(encoded) < len(alone) + 32_000, (len(encoded), len(alone))


def test_the_banner_names_the_verdict_in_its_colour():
    image = make_part(np.random.default_rng(4), size=64)[0]
    ok = heatmap_overlay(image, _map(), **{**DECISION, "score": 0.2, "verdict": "ok"})
    ng = heatmap_overlay(image, _map(), **DECISION)
    assert ok.shape == ng.shape
    h = 64
    green = lambda a: ((a[..., 1] > 150) & (a[..., 2] < 130) & (a[..., 0] < 130)).sum()  # noqa: E731
    assert green(ok[h:]) > 20 and green(ng[h:]) == 0
    assert not np.array_equal(ok[h:], ng[h:])  # the score differs too


def test_the_sink_writes_ok_parts_only_when_asked(tmp_path):
    image = make_part(np.random.default_rng(5), size=32)[0]
    part = tmp_path / "part.png"
    cv2.imwrite(str(part), image)
    base = dict(identity="x", kind="file", source=str(part), arrived_at=0.0, committed_at=0.0, latency_ms=1.0,
                score=0.2, threshold=0.6, criterion="range")
    ok = Record(**base, verdict="ok", id=1)
    ng = Record(**{**base, "score": 0.9}, verdict="ng", id=2)
    error = Record(**{**base, "score": None}, verdict="error", id=3)
    default, every = HeatmapSink(tmp_path / "ng-only"), HeatmapSink(tmp_path / "all", every_part=True)
    assert [default.wants(r) for r in (ok, ng, error)] == [False, True, False]
    assert [every.wants(r) for r in (ok, ng, error)] == [True, True, False]
    written = every.write([Done(ok, image, _map()), Done(ng, image, _map())])
    overlay = cv2.imread(written[ok.id]["heatmap"])
    assert overlay.shape[1] == HEATMAP_MIN_WIDTH and 32 < overlay.shape[0] < HEATMAP_MIN_WIDTH
    assert not np.array_equal(overlay, cv2.imread(written[ng.id]["heatmap"]))  # each carries its own decision


def test_heatmaps_all_without_a_folder_is_refused():
    from edge_inspect import config
    from edge_inspect.errors import ConfigError

    with pytest.raises(ConfigError, match="sinks.heatmaps_all.*set sinks.heatmaps"):
        config.validate({"sources": {"a": {"kind": "folder", "path": "/srv/in", "model": "/m",
                                           "sinks": {"heatmaps_all": True}}}})
    result = runner.invoke(app, ["predict", "/nowhere", "--model", "/nowhere", "--heatmaps-all"])
    assert result.exit_code == 1 and "add --heatmaps FOLDER" in result.stderr


def test_predict_writes_overlays_of_ng_parts_unless_asked_for_all(model_dir, tmp_path):  # noqa: F811
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.default_rng(12)
    for i in range(6):
        image = make_part(rng, size=32)[0]
        cv2.imwrite(str(parts / f"ok_{i}.png"), image)
        image = make_part(rng, size=32)[0]
        image[8:20, 8:20] = 255  # a large bright blot: NG for any criterion of the tiny model
        cv2.imwrite(str(parts / f"blot_{i}.png"), image)
    counts = {}
    for mode, extra in (("ng", []), ("all", ["--heatmaps-all"])):
        out = tmp_path / mode
        result = runner.invoke(app, ["predict", str(parts), "--model", str(model_dir), "--json", "--heatmaps", str(out),
                                     "--criterion", "range", *extra])
        assert result.exit_code == 0, result.output + result.stderr
        lines = [json.loads(text) for text in result.stdout.splitlines()]
        with_overlay = {line["source"] for line in lines if line.get("heatmap")}
        counts[mode] = {v: sum(line["verdict"] == v for line in lines) for v in ("ok", "ng")}
        wanted = {line["source"] for line in lines if mode == "all" or line["verdict"] == "ng"}
        assert with_overlay == wanted
        assert len(list(out.iterdir())) == len(wanted)
    assert counts["ng"]["ng"] > 0 and counts["ng"]["ok"] > 0, counts


def _video(path, frames: int):
    """An MJPG video of synthetic parts, every third one with a bright blot."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    rng = np.random.default_rng(8)
    for i in range(frames):
        image = make_part(rng, size=32)[0]
        if i % 3 == 0:
            image[8:20, 8:20] = 255
        writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def _rows(ledger):
    import sqlite3

    with sqlite3.connect(ledger) as conn:
        return conn.execute("SELECT verdict, score, heatmap FROM parts ORDER BY id").fetchall()


def test_watch_writes_overlays_of_ng_parts_unless_asked_for_all(model_dir, tmp_path, monkeypatch):  # noqa: F811
    from edge_inspect import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 200)
    video = _video(tmp_path / "line.avi", 12)
    base = ["watch", "--camera", str(video), "--model", str(model_dir), "--criterion", "range"]
    result = runner.invoke(app, [*base, "--ledger", str(tmp_path / "scores.sqlite")])
    assert result.exit_code == 0, result.output + result.stderr
    threshold = float(np.median([score for _, score, _ in _rows(tmp_path / "scores.sqlite")]))
    for mode, extra in (("ng", []), ("all", ["--heatmaps-all"])):
        ledger, heat = tmp_path / f"{mode}.sqlite", tmp_path / f"heat-{mode}"
        result = runner.invoke(app, [*base, "--ledger", str(ledger), "--threshold", repr(threshold),
                                     "--heatmaps", str(heat), *extra])
        assert result.exit_code == 0, result.output + result.stderr
        rows = _rows(ledger)
        verdicts = [verdict for verdict, _, _ in rows]
        assert verdicts.count("ng") > 0 and verdicts.count("ok") > 0, verdicts
        for verdict, _, heatmap in rows:
            assert (heatmap is not None) == (verdict == "ng" or mode == "all"), (verdict, heatmap)
        assert len(list(heat.iterdir())) == sum(h is not None for _, _, h in rows)
        if mode == "all":
            ok_overlay = cv2.imread(next(h for v, _, h in rows if v == "ok"))
            banner = ok_overlay[32:]
            assert ((banner[..., 1] > 150) & (banner[..., 2] < 130) & (banner[..., 0] < 130)).sum() > 20, "OK in green"
    result = runner.invoke(app, [*base, "--ledger", str(tmp_path / "x.sqlite"), "--heatmaps-all"])
    assert result.exit_code == 1 and "--heatmaps-all: overlays of every part need a folder" in result.stderr
