"""Runs of a sweep → the study's comparison table, paired significance tests, compute costs
and plots (``python -m clintune.report``)."""

from clintune.report.collect import Collection, RunRecord, collect_dirs, collect_wandb
from clintune.report.render import write_report
from clintune.report.table import Report, build_report

__all__ = [
    "Collection",
    "Report",
    "RunRecord",
    "build_report",
    "collect_dirs",
    "collect_wandb",
    "write_report",
]
