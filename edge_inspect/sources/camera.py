"""The camera: frames from a device, a network stream, a GStreamer pipeline or a video file.

A :class:`Camera` opens its URI with OpenCV's ``VideoCapture`` and yields
:class:`FrameItem` s. What the URI names decides how it is read:

========================  ================================  ===============
URI                       opened with                       at a failure
========================  ================================  ===============
``"0"`` (an integer)      device index, any backend (V4L2)  reconnect
``/dev/video0``           the device path                   reconnect
``rtsp://``, ``http://``  FFmpeg, with open/read timeouts   reconnect
``... ! appsink``         GStreamer (the URI has a ``!``)   reconnect
a video file              the default backend (FFmpeg)      end of stream
========================  ================================  ===============

A live source that cannot be opened, or whose stream breaks, is reopened
with exponential :class:`Backoff`; each drop and each recovery is logged
with counts. A video file ends the iteration cleanly at its end.

Live sources are grabbed on a thread of their own, without pause, so that
the driver's buffer never holds old frames: when inspection is slower than
the camera, the newest frame waits and older ones are dropped (and
counted). Frames of a video file are all read, in order, on the caller's
thread.

    >>> for frame in Camera("rtsp://10.0.0.7/stream1", every=3, fps=5):
    ...     print(frame.index, frame.image.shape)
    0 (1080, 1920, 3)
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_inspect.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

#: How long FFmpeg may take to open a network stream, and to read a frame,
#: before the attempt counts as failed (milliseconds).
STREAM_TIMEOUT_MS = 10_000
#: Slow-consumer drops are logged at most this often (seconds).
DROP_LOG_INTERVAL_S = 60.0

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class FrameItem:
    """One frame grabbed from a camera.

    Attributes:
        uri: the camera URI as given.
        index: frame number since the source opened, 0-based, counting every
            grabbed frame, skipped ones included; it goes on counting across
            reconnections.
        timestamp: ``time.time()`` when the frame was grabbed.
        image: as returned by OpenCV, BGR uint8 (or gray).
    """

    uri: str
    index: int
    timestamp: float
    image: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Backoff:
    """Exponential delays between reconnection attempts.

    Attributes:
        initial: the first delay, in seconds.
        factor: each delay is the previous one times ``factor``...
        maximum: ...up to ``maximum`` seconds.

    Raises:
        ConfigError: a negative delay, a factor below 1, or a maximum below
            the initial delay.
    """

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0

    def __post_init__(self):
        if not (self.initial >= 0 and self.factor >= 1 and self.maximum >= self.initial):
            raise ConfigError(
                f"Backoff(initial={self.initial}, factor={self.factor}, maximum={self.maximum}) is out of range; "
                "expected initial >= 0, factor >= 1 and maximum >= initial."
            )

    def delays(self) -> Iterator[float]:
        """``initial``, ``initial * factor``, ... capped at ``maximum``, without end."""
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * self.factor, self.maximum)


def source_kind(uri: str) -> str:
    """What a camera URI names: ``"device"``, ``"stream"``, ``"pipeline"`` or ``"file"``.

    An integer is a device index and an existing character device (such as
    ``/dev/video0``) a device; another existing path is a video file; a URI
    with a ``!`` is a GStreamer pipeline and one with a scheme (``rtsp://``)
    a network stream; anything else is taken for a video file (that does
    not exist).
    """
    text = uri.strip()
    try:
        int(text)
        return "device"
    except ValueError:
        pass
    try:
        st = os.stat(text)
    except (OSError, ValueError):
        st = None
    if st is not None:
        return "device" if stat.S_ISCHR(st.st_mode) else "file"
    if "!" in text:
        return "pipeline"
    if _SCHEME.match(text):
        return "stream"
    return "file"


class Camera:
    """Yield frames from a camera or a video file.

    Args:
        uri: a device index (``"0"``), a device path (``/dev/video0``),
            ``rtsp://`` or ``http(s)://`` URL, a video file path, or a
            GStreamer pipeline (contains ``!``, ends in ``appsink``).
        every: keep every ``every``-th frame (1: all).
        fps: yield at most this many frames per second: wall-clock time for
            a live source (the frames in between are grabbed and dropped),
            the video's own time for a file (frames skipped).
        retry: delays between attempts to (re)open a live source.
        max_failures: raise after this many consecutive failed attempts to
            open or read a live source; ``None``: retry for ever.
        on_reconnect: called with no arguments each time a lost live stream
            delivers frames again (a metric).

    Iterate a camera once; :meth:`stop` (thread- and signal-safe) ends the
    iteration within a fraction of a second.

    Raises:
        ConfigError: ``every``, ``fps`` or ``max_failures`` out of range.
        SourceError: a video file that does not exist, or a pipeline when
            this OpenCV has no GStreamer support (at once); a live source
            that could not be opened ``max_failures`` times in a row (while
            iterating).
    """

    def __init__(self, uri: str, *, every: int = 1, fps: float | None = None, retry: Backoff = Backoff(),
                 max_failures: int | None = None, on_reconnect=None):
        if not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"Camera 'every' must be an integer of at least 1, got {every!r}.")
        if fps is not None and not fps > 0:
            raise ConfigError(f"Camera fps limit must be a positive number, got {fps!r}.")
        if max_failures is not None and not (isinstance(max_failures, int) and max_failures >= 1):
            raise ConfigError(f"Camera max_failures must be None or an integer of at least 1, got {max_failures!r}.")
        self.uri = str(uri)
        self.every = every
        self.fps = fps
        self.retry = retry
        self.max_failures = max_failures
        #: Called (no arguments) each time a lost stream is opened again: a metric.
        self.on_reconnect = on_reconnect
        self.kind = source_kind(self.uri)
        self.live = self.kind != "file"
        self._stopping = threading.Event()
        if self.kind == "file" and not Path(self.uri.strip()).is_file():
            raise SourceError(
                f"Video file {self.uri!r} does not exist. Check the path; for a camera pass its index (\"0\"), "
                "its device (/dev/video0), an rtsp:// or http:// URL, or a GStreamer pipeline."
            )
        if self.kind == "pipeline" and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise SourceError(
                f"Camera {self.uri!r} is a GStreamer pipeline, but this OpenCV ({cv2.__version__}) was built "
                "without GStreamer. Use an OpenCV built with GStreamer, or an rtsp:// URL or device index."
            )

    def stop(self) -> None:
        """End the iteration promptly; safe from any thread, a signal handler included."""
        self._stopping.set()

    def __iter__(self) -> Iterator[FrameItem]:
        return self._live_frames() if self.live else self._file_frames()

    # ------------------------------------------------------------ opening

    def _open(self) -> tuple[cv2.VideoCapture | None, str]:
        """A capture that is open, or None and the reason."""
        text = self.uri.strip()
        try:
            if self.kind == "device":
                capture = cv2.VideoCapture(int(text)) if _is_int(text) else cv2.VideoCapture(text)
            elif self.kind == "pipeline":
                capture = cv2.VideoCapture(text, cv2.CAP_GSTREAMER)
            elif self.kind == "stream":
                capture = cv2.VideoCapture(text, cv2.CAP_FFMPEG, [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                ])
            else:
                capture = cv2.VideoCapture(text)
        except cv2.error as exc:
            return None, f"OpenCV error: {exc}".strip()
        if not capture.isOpened():
            capture.release()
            return None, "OpenCV could not open it"
        return capture, ""

    # ------------------------------------------------------------ video files

    def _file_frames(self) -> Iterator[FrameItem]:
        capture, reason = self._open()
        if capture is None:
            raise SourceError(
                f"Cannot open video file {self.uri!r}: {reason}. Check that it is a video OpenCV can decode "
                "(for example MJPG in .avi, H.264 in .mp4) and that it is complete."
            )
        file_fps = capture.get(cv2.CAP_PROP_FPS)
        pace = _Pace(self.fps)
        index = 0
        try:
            while not self._stopping.is_set():
                if not capture.grab():
                    log.info("Video %s ended after %d frames", self.uri, index)
                    return
                timestamp = time.time()
                i, index = index, index + 1
                if i % self.every:
                    continue
                # The video's own clock: the frame rate it was recorded at.
                media_time = i / file_fps if file_fps > 0 else capture.get(cv2.CAP_PROP_POS_MSEC) / 1e3
                if not pace.due(media_time):
                    continue
                ok, image = capture.retrieve()
                if not ok or image is None:
                    log.warning("Video %s: frame %d could not be decoded; ending there", self.uri, i)
                    return
                yield FrameItem(self.uri, i, timestamp, image)
        finally:
            capture.release()

    # ------------------------------------------------------------ live sources

    def _live_frames(self) -> Iterator[FrameItem]:
        handoff = _Handoff()
        grabber = threading.Thread(target=self._grab, args=(handoff,), name=f"camera {self.uri}", daemon=True)
        grabber.start()
        try:
            while True:
                item = handoff.take(self._stopping, grabber)
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stopping.set()
            grabber.join(timeout=1.0)

    def _grab(self, handoff: "_Handoff") -> None:
        """The grab loop, on its own thread: open, grab without pause, reconnect, hand over."""
        try:
            self._grab_loop(handoff)
        except Exception as exc:  # noqa: BLE001  (raised again by the iterator, on the consumer's thread)
            handoff.fail(exc)

    def _grab_loop(self, handoff: "_Handoff") -> None:
        capture = None
        delays = self.retry.delays()
        failures = 0          # consecutive failed attempts to open or read
        drops = 0             # times a working stream was lost
        down_since = None     # monotonic time of the last loss, until recovered
        index = 0
        pace = _Pace(self.fps)
        ever_opened = False
        try:
            while not self._stopping.is_set():
                if capture is None:
                    capture, reason = self._open()
                    if capture is None:
                        failures += 1
                        self._give_up_after(failures, reason)
                        delay = next(delays)
                        log.warning("Camera %s: cannot open (attempt %d%s): %s; retrying in %.3g s", self.uri,
                                    failures, self._of_max(), reason, delay)
                        self._stopping.wait(delay)
                        continue
                    log.info("Camera %s: opened (%s)", self.uri, capture.getBackendName())
                if not capture.grab():
                    capture.release()
                    capture = None
                    failures += 1
                    if ever_opened and down_since is None:
                        drops += 1
                        down_since = time.monotonic()
                        log.warning("Camera %s: stream lost after frame %d (drop %d); reconnecting", self.uri,
                                    index - 1, drops)
                    self._give_up_after(failures, "no frame could be read")
                    delay = next(delays)
                    log.warning("Camera %s: no frame (attempt %d%s); retrying in %.3g s", self.uri, failures,
                                self._of_max(), delay)
                    self._stopping.wait(delay)
                    continue
                timestamp = time.time()
                if down_since is not None and self.on_reconnect is not None:
                    self.on_reconnect()
                if down_since is not None:
                    log.info("Camera %s: recovered after %.1f s and %d failed attempts (drop %d)", self.uri,
                             time.monotonic() - down_since, failures, drops)
                elif failures:
                    log.info("Camera %s: first frame after %d failed attempts", self.uri, failures)
                if failures:
                    failures, down_since, delays = 0, None, self.retry.delays()
                ever_opened = True
                i, index = index, index + 1
                if i % self.every or not pace.due(time.monotonic()):
                    continue
                ok, image = capture.retrieve()
                if not ok or image is None:
                    log.warning("Camera %s: frame %d grabbed but not decoded; skipped", self.uri, i)
                    continue
                handoff.put(FrameItem(self.uri, i, timestamp, image), self.uri)
        finally:
            if capture is not None:
                capture.release()

    def _give_up_after(self, failures: int, reason: str) -> None:
        if self.max_failures is not None and failures >= self.max_failures:
            raise SourceError(
                f"Camera {self.uri!r}: {failures} attempts in a row failed ({reason}). Check that the camera is "
                "connected and powered, the URL, user and password, and that no other program holds the device."
            )

    def _of_max(self) -> str:
        return f" of {self.max_failures}" if self.max_failures is not None else ""


class _Pace:
    """Keeps at most ``fps`` frames per second of a clock (``None``: all frames)."""

    def __init__(self, fps: float | None):
        self.period = 1.0 / fps if fps else None
        self.next_due: float | None = None

    def due(self, now: float) -> bool:
        if self.period is None:
            return True
        if self.next_due is not None and now < self.next_due - 1e-6:
            return False
        # Step by the period, so that the average rate is exact; restart
        # from now after a gap longer than a period.
        if self.next_due is None or now - self.next_due >= self.period:
            self.next_due = now
        self.next_due += self.period
        return True


class _Handoff:
    """One slot between the grab thread and the consumer: the newest frame wins."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: FrameItem | BaseException | None = None
        self._dropped = 0
        self._dropped_logged_at = time.monotonic()

    def put(self, item: FrameItem, uri: str) -> None:
        with self._cond:
            if isinstance(self._item, BaseException):
                return
            if self._item is not None:
                self._dropped += 1
            self._item = item
            self._cond.notify()
            now = time.monotonic()
            if self._dropped and now - self._dropped_logged_at >= DROP_LOG_INTERVAL_S:
                log.info("Camera %s: %d frames dropped in %.0f s, inspection being slower than the camera; "
                         "a lower fps or a larger 'every' keeps up", uri, self._dropped, now - self._dropped_logged_at)
                self._dropped, self._dropped_logged_at = 0, now

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._item = exc
            self._cond.notify()

    def take(self, stopping: threading.Event, grabber: threading.Thread) -> FrameItem | BaseException | None:
        """The next frame or error; None once stopped or the grab thread ended."""
        with self._cond:
            while True:
                if stopping.is_set():
                    return None
                if self._item is not None:
                    break
                if not grabber.is_alive():
                    return None
                # A short wait, not a notification: stop() must stay signal-safe.
                self._cond.wait(0.1)
            item, self._item = self._item, None
            return item


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False
