"""What this install runs on: the package, ONNX Runtime and its providers, Numba and its threads, Python.

Imports only the runtime's own libraries, never the training side, so it
answers at once, on a lean install as on a full one.

    >>> about()["onnxruntime"]["providers"]
    ['CPUExecutionProvider']
"""

from __future__ import annotations

import platform
import sys


def about() -> dict:
    """Versions of the package and of the runtime's engines.

    Returns:
        ``{"edge-inspect": "0.1.0", "onnxruntime": {"version", "build",
        "providers"}, "numba": {"version", "threads"},
        "python": {"version", "implementation", "executable"}, "platform": ...}``;
        ``providers`` are the execution providers this ONNX Runtime build has
        (CUDA needs ``CUDAExecutionProvider``), ``threads`` the threads the
        kernels run on (``NUMBA_NUM_THREADS`` sets them).
    """
    import numba
    import onnxruntime as ort

    from edge_inspect import __version__

    return {
        "edge-inspect": __version__,
        "onnxruntime": {"version": ort.__version__, "build": ort.get_device(),
                        "providers": list(ort.get_available_providers())},
        "numba": {"version": numba.__version__, "threads": numba.config.NUMBA_NUM_THREADS},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
    }


def lines(info: dict) -> list[str]:
    """:func:`about` as lines for a terminal."""
    ort, numba, python = info["onnxruntime"], info["numba"], info["python"]
    return [
        f"edge-inspect {info['edge-inspect']}",
        f"ONNX Runtime {ort['version']} ({ort['build']} build); providers: {', '.join(ort['providers'])}",
        f"Numba {numba['version']}, {numba['threads']} threads",
        f"Python {python['version']} ({python['implementation']}, {python['executable']})",
        f"Platform {info['platform']}",
    ]
