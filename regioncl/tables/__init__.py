"""Metrics JSON -> pandas -> result tables.

`summary`: one row per run and benchmark. `paper`: the papers' table layouts with their own
numbers (`reference`) beside ours, rendered by `render` and plotted by `plots` (imported from
their modules, so the summary does not load matplotlib).
"""

from regioncl.tables.summary import load_metrics, summarize, write_summary

__all__ = ["load_metrics", "summarize", "write_summary"]
