"""The ``edge-inspect`` console script, run from the tree under test; as a script, with a shorter rescan.

:func:`console_script` gives the Python code that runs what the installed
``edge-inspect`` runs: the entry point ``pyproject.toml`` declares (an
installed script may be older than the tree). The watch scenarios start
every watcher with it.

No flag or setting reaches :class:`~edge_inspect.sources.HotFolder`'s
``rescan`` (60 s) from the command line, so a scenario that must see a
rescan within seconds runs this file as a script, which changes only that
keyword's default before running the console script::

    TORTURE_RESCAN_S=1 python tests/torture/launch.py watch in/ --model m/
"""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def console_script() -> str:
    """Python code that runs the ``edge-inspect`` entry point with the arguments in ``sys.argv[1:]``."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        target = tomllib.load(handle)["project"]["scripts"]["edge-inspect"]
    module, function = target.split(":")
    return f"import sys; from {module} import {function} as main; sys.argv[0] = 'edge-inspect'; sys.exit(main())"


if __name__ == "__main__":
    from edge_inspect.sources.hotfolder import HotFolder

    HotFolder.__init__.__kwdefaults__["rescan"] = float(os.environ["TORTURE_RESCAN_S"])
    exec(console_script())
