"""Metrics JSON -> pandas -> result tables."""

from regioncl.tables.summary import load_metrics, summarize, write_summary

__all__ = ["load_metrics", "summarize", "write_summary"]
