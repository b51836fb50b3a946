"""Reports of a compression run: report.json (schema 1) with markdown and HTML views, terminal
summary lines, and side-by-side comparison of several runs."""

from compress.report.build import SCHEMA, to_jsonable, validate_report, write_report
from compress.report.compare import compare, load_report
from compress.report.markdown import summary_lines

__all__ = [
    "SCHEMA",
    "compare",
    "load_report",
    "summary_lines",
    "to_jsonable",
    "validate_report",
    "write_report",
]
