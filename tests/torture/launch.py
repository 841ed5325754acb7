"""The ``edge-inspect`` console script, run from the tree under test.

:func:`console_script` gives the Python code that runs what the installed
``edge-inspect`` runs: the entry point ``pyproject.toml`` declares (an
installed script may be older than the tree). The watch scenarios start
every watcher with it.
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

