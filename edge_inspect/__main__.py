"""The ``edge-inspect`` console script (and ``python -m edge_inspect``).

For ``watch`` and ``serve``, the stop signals are caught before anything else is
imported: loading the CLI, NumPy and ONNX Runtime takes about a second, and
a SIGTERM or SIGHUP in that second must still end in a drained stop with
exit 0, not in Python's default action (:mod:`edge_inspect.signals`).
"""

from __future__ import annotations

import sys

#: Commands that run until stopped and drain on a stop signal.
LONG_RUNNING = ("watch", "serve")


def main() -> None:
    """Console-script entry point."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command in LONG_RUNNING:
        from edge_inspect import signals

        signals.install()
    from edge_inspect.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
