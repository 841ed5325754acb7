"""Files and folders named on the command line, as a source for ``edge-inspect predict``.

This module turns paths into decoded arrays for the inspector: it lists the
files to inspect (:func:`iter_image_files`), reads and decodes them on a
thread pool, and inspects them batch by batch (:func:`inspect_files`). A file
that cannot be read gets an ``error`` result of its own; the others go on.

    >>> inspector = Inspector.load("models/conv-ae")
    >>> for result, _ in inspect_files(inspector, ["parts/today"]):
    ...     print(result.source, result.verdict)
    parts/today/0001.png ok
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edge_inspect.errors import EdgeInspectError, InputError
from edge_inspect.inspector import Inspector, Result
from edge_inspect.preprocess import NoteWarnings, is_image_name, read_image


def iter_image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to inspect, as absolute paths: each file as given, each folder's images recursively.

    Folders contribute the files with an image suffix
    (:data:`edge_inspect.preprocess.IMAGE_SUFFIXES`), sorted; a file named
    explicitly is kept whatever its suffix, and a path that does not exist
    is kept too, so that it gets an ``error`` result of its own.

    Raises:
        InputError: nothing to inspect (no paths, or only empty folders).
    """
    files: list[Path] = []
    for path in (Path(os.path.abspath(p)) for p in paths):  # absolute: results name each file unambiguously
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
        else:
            files.append(path)
    if not files:
        shown = ", ".join(str(p) for p in paths) or "(none)"
        raise InputError(f"No image to inspect in {shown}. Expected image files or folders holding them.")
    return files


def inspect_files(inspector: Inspector, paths: Sequence[str | os.PathLike], *,
                  keep_images: bool = False) -> Iterator[tuple[Result, np.ndarray | None]]:
    """Read, decode and inspect files, one batch at a time, in order.

    Decoding runs on a thread pool (OpenCV releases the GIL) while the
    previous batch is inspected. A file that cannot be read or decoded gets
    an ``error`` result with the reason; inspection goes on. The first image
    with each kind of input note (colour, much larger or smaller than the
    model's input, another aspect ratio; see :class:`~edge_inspect.preprocess.NoteWarnings`)
    is named in a warning in the log; every result carries its own note.

    Args:
        inspector: the loaded model.
        paths: what :func:`iter_image_files` accepts.
        keep_images: also yield each decoded image (for heatmap overlays);
            otherwise ``None``.

    Yields:
        ``(result, image)`` per file, ``result.source`` being the path.

    Raises:
        InputError: nothing to inspect (see :func:`iter_image_files`).
    """
    files = iter_image_files(paths)

    def read(path: Path):
        try:
            return read_image(path), None
        except EdgeInspectError as exc:
            return None, str(exc)

    size = inspector.batch_size
    warn = NoteWarnings("predict", inspector.size)
    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = pool.submit(lambda c: [read(p) for p in c], chunks[0])
        for k, chunk in enumerate(chunks):
            decoded = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(lambda c: [read(p) for p in c], chunks[k + 1])
            good = [i for i, (image, _) in enumerate(decoded) if image is not None]
            inspected = iter(inspector.inspect_batch([decoded[i][0] for i in good], [str(chunk[i]) for i in good]))
            for i, (image, reason) in enumerate(decoded):
                if image is None:
                    result = Result("error", None, float(inspector.entry["threshold"]), inspector.criterion,
                                    source=str(chunk[i]), error=reason, polarity=inspector.entry["polarity"])
                else:
                    result = next(inspected)
                    warn(str(chunk[i]), result.input_note)
                yield result, (image if keep_images else None)
