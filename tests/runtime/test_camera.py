"""The camera source with real OpenCV: video files it writes, a real HTTP stream, unreachable URIs."""

from __future__ import annotations

import functools
import http.server
import itertools
import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect.errors import ConfigError, SourceError
from edge_inspect.sources import Backoff, Camera, FrameItem, source_kind

FRAMES, FPS, WIDTH, HEIGHT, BITS = 30, 30.0, 64, 48, 8
TINY = Backoff(initial=0.01, factor=2.0, maximum=0.05)


def _frame(index: int) -> np.ndarray:
    """A frame showing ``index`` in binary: 8 columns, white for a 1 bit."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    step = WIDTH // BITS
    for bit in range(BITS):
        if index >> bit & 1:
            image[:, bit * step:(bit + 1) * step] = 255
    return image


def _decode(image: np.ndarray) -> int:
    step = WIDTH // BITS
    gray = image if image.ndim == 2 else image.mean(axis=2)
    return sum(1 << bit for bit in range(BITS) if gray[:, bit * step + 2:(bit + 1) * step - 2].mean() > 128)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened(), "this OpenCV cannot write MJPG .avi"
    for k in range(FRAMES):
        writer.write(_frame(k))
    writer.release()
    return path


def test_a_video_file_yields_every_frame_in_order_and_ends_cleanly(video):
    frames = list(Camera(str(video)))
    assert [f.index for f in frames] == list(range(FRAMES))
    assert [_decode(f.image) for f in frames] == list(range(FRAMES))
    assert all(isinstance(f, FrameItem) and f.uri == str(video) for f in frames)
    assert all(f.image.shape == (HEIGHT, WIDTH, 3) and f.image.dtype == np.uint8 for f in frames)
    stamps = [f.timestamp for f in frames]
    assert stamps == sorted(stamps) and abs(stamps[0] - time.time()) < 600


@pytest.mark.parametrize("every", [2, 4, 7])
def test_every_keeps_every_nth_frame_and_indexes_count_all_frames(video, every):
    frames = list(Camera(str(video), every=every))
    assert [f.index for f in frames] == list(range(0, FRAMES, every))
    assert [_decode(f.image) for f in frames] == [f.index for f in frames]


def test_fps_limit_on_a_file_skips_frames_by_the_video_clock(video):
    frames = list(Camera(str(video), fps=FPS / 3))
    assert [f.index for f in frames] == list(range(0, FRAMES, 3))
    both = list(Camera(str(video), every=2, fps=FPS / 4))  # every 2nd, then at most one per 4 frames of time
    assert [f.index for f in both] == list(range(0, FRAMES, 4))


def test_stop_ends_a_video_early(video):
    camera = Camera(str(video))
    seen = []
    for frame in camera:
        seen.append(frame.index)
        if frame.index == 4:
            camera.stop()
    assert seen == [0, 1, 2, 3, 4]


def test_a_missing_or_undecodable_video_file_raises_at_once(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        Camera(str(tmp_path / "missing.avi"))
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(SourceError, match="Cannot open video file"):
        next(iter(Camera(str(junk), max_failures=None)))


@pytest.mark.parametrize("uri", ["rtsp://127.0.0.1:9/none", "99"])
def test_an_unreachable_live_source_raises_after_max_failures_and_logs_each_retry(uri, caplog):
    caplog.set_level(logging.INFO, logger="edge_inspect.sources.camera")
    camera = Camera(uri, retry=TINY, max_failures=3)
    with pytest.raises(SourceError, match="3 attempts in a row failed") as info:
        next(iter(camera))
    assert uri in str(info.value)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert "attempt 1 of 3" in retries[0] and "attempt 2 of 3" in retries[1]


class _Clip(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_clip(video):
    """The video served over HTTP: a live source whose stream ends with each download."""
    handler = functools.partial(_Clip, directory=str(video.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/{video.name}"
    server.shutdown()
    server.server_close()


def test_a_live_stream_that_drops_reconnects_logs_it_and_keeps_counting(http_clip, caplog):
    caplog.set_level(logging.INFO, logger="edge_inspect.sources.camera")
    server, url = http_clip
    reconnects = []
    camera = Camera(url, retry=TINY, on_reconnect=lambda: reconnects.append(time.monotonic()))
    frames = []
    deadline = time.monotonic() + 60
    for frame in camera:
        frames.append(frame)
        if frame.index >= 2 * FRAMES + 5 or time.monotonic() > deadline:
            camera.stop()
    indexes = [f.index for f in frames]
    assert indexes == sorted(set(indexes)), "indexes go on increasing across reconnections"
    assert indexes[-1] >= 2 * FRAMES, "frames of a third download arrived"
    # The newest frame wins when the consumer lags, so some may be missing,
    # but each one that arrives is the frame its index says.
    assert all(_decode(f.image) == f.index % FRAMES for f in frames)
    messages = [r.getMessage() for r in caplog.records]
    assert any("stream lost after frame 29 (drop 1)" in m for m in messages), messages
    assert any("recovered after" in m and "(drop 1)" in m for m in messages), messages
    assert any("(drop 2)" in m for m in messages), messages
    recovered = sum("recovered after" in m for m in messages)
    assert len(reconnects) == recovered >= 2, (reconnects, messages)


def test_a_live_stream_gone_for_good_raises_after_max_failures(http_clip):
    server, url = http_clip
    camera = Camera(url, retry=TINY, max_failures=3)
    iterator = iter(camera)
    # A frame arrives (the newest one wins when the consumer lags: not always frame 0), then the server goes.
    assert next(iterator).index >= 0
    server.shutdown()
    server.server_close()
    with pytest.raises(SourceError, match="attempts in a row failed"):
        for _ in iterator:
            pass


def test_backoff_delays_grow_by_the_factor_up_to_the_maximum():
    assert list(itertools.islice(Backoff(0.5, 2.0, 3.0).delays(), 6)) == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert list(itertools.islice(Backoff(1.0, 1.0, 1.0).delays(), 3)) == [1.0, 1.0, 1.0]
    assert list(itertools.islice(Backoff().delays(), 8))[-1] == 30.0
    for bad in (dict(initial=-1), dict(factor=0.5), dict(initial=5, maximum=1)):
        with pytest.raises(ConfigError, match="out of range"):
            Backoff(**bad)


def test_source_kinds(video):
    assert source_kind("0") == source_kind(" 2 ") == "device"
    assert source_kind(str(video)) == "file"
    assert source_kind("rtsp://10.0.0.7/stream1") == source_kind("http://cam.local/video.mjpg") == "stream"
    assert source_kind("v4l2src device=/dev/video0 ! videoconvert ! appsink") == "pipeline"
    assert source_kind("recordings/missing.mp4") == "file"


def test_bad_settings_are_refused(video):
    for bad in (dict(every=0), dict(fps=0), dict(max_failures=0)):
        with pytest.raises(ConfigError):
            Camera(str(video), **bad)


def test_a_gstreamer_pipeline_needs_an_opencv_built_with_gstreamer():
    pipeline = "videotestsrc num-buffers=1 ! nosuchelement ! appsink"
    if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        with pytest.raises(SourceError, match="without GStreamer"):
            Camera(pipeline)
    else:
        with pytest.raises(SourceError, match="attempts in a row failed"):
            next(iter(Camera(pipeline, retry=TINY, max_failures=2)))
