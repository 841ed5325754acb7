"""Sinks: what happens to a part after its verdict is committed to the ledger.

Each sink is one small module: :mod:`~edge_inspect.sinks.sort` moves the file
into ``ok/``, ``ng/`` or ``error/``, :mod:`~edge_inspect.sinks.heatmaps`
writes an overlay for each NG part, :mod:`~edge_inspect.sinks.jsonl` appends
one JSON line per verdict. The watch pipeline runs them in that order (so
the JSON line can name where the file went and its heatmap) after the
verdicts' transaction commits, then records in the ledger which sinks are
done for each row (``sinks_pending``). After a crash the rows still pending
are replayed at start; every sink's :meth:`Sink.replay` is idempotent, so a
sink that had run but was not yet recorded as done runs without effect.

    >>> from edge_inspect.sinks import JsonlSink, SortSink
    >>> sinks = [SortSink("parts/"), JsonlSink("verdicts.jsonl")]
"""

from edge_inspect.sinks.base import Done, Sink, fsync_dir, same_content
from edge_inspect.sinks.heatmaps import HeatmapSink
from edge_inspect.sinks.jsonl import JsonlSink
from edge_inspect.sinks.sort import SortSink

__all__ = ["Done", "HeatmapSink", "JsonlSink", "Sink", "SortSink", "fsync_dir", "same_content"]
