"""Sources: where the images come from, before they become arrays.

- :class:`HotFolder` (:mod:`.hotfolder`): files dropped in a folder, each
  yielded once complete, as a :class:`FileItem`.
- :class:`Camera` (:mod:`.camera`): frames from a device, network stream,
  GStreamer pipeline or video file, as :class:`FrameItem` s, reconnecting
  with :class:`Backoff`.
- :mod:`.files`: files and folders named on the command line
  (``edge-inspect predict``); import it from there, as it loads the
  inspector.

A source yields items and knows nothing of models or verdicts; the watch
pipeline reads each item, inspects it and records one verdict per part.

    >>> from edge_inspect.sources import HotFolder
    >>> with HotFolder("incoming", poll=2.0) as folder:
    ...     for item in folder:
    ...         handle(item.path)
"""

from edge_inspect.sources.camera import Backoff, Camera, FrameItem, source_kind
from edge_inspect.sources.hotfolder import DEFAULT_IGNORE, FileItem, HotFolder

__all__ = ["DEFAULT_IGNORE", "Backoff", "Camera", "FileItem", "FrameItem", "HotFolder", "source_kind"]
