"""`jestcurate report` and `jestcurate info`: look at a score set (and a selection) by eye.

The report is one self-contained HTML file: counts per shard and status, errors by reason,
histograms of clip_score and ref_loss (kept vs dropped with a selection) as inline SVG, and
thumbnail grids (inline JPEG data) of the highest, lowest and random samples among kept and
dropped. Only small columns are read for every row; captions and images are read back for the
few samples shown, by position (a header scan of a local tar) or by streaming a remote one.
"""

from jestcurate.pipelines.report.info import describe, print_info
from jestcurate.pipelines.report.page import choose_groups, print_written, render, write_report
from jestcurate.pipelines.report.stats import Stats, gather, kept_mask, quantiles
from jestcurate.pipelines.report.thumbnails import fetch_samples
from jestcurate.pipelines.report.why import print_why

__all__ = [
    "Stats",
    "choose_groups",
    "describe",
    "fetch_samples",
    "gather",
    "kept_mask",
    "print_info",
    "print_why",
    "print_written",
    "quantiles",
    "render",
    "write_report",
]
