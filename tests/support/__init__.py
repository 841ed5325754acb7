"""Test support: synthetic casting-like parts and image-file helpers.

The generator itself lives in :mod:`edge_inspect.synthetic` so that the demo
can use it too; it is re-exported here for the tests.
"""

from edge_inspect.synthetic import DEFECTS, make_part, write_parts

__all__ = ["DEFECTS", "make_part", "write_parts"]
