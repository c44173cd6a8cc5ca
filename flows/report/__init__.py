"""``creditflow report RUN_OR_BENCHMARK_ID [--out DIR] [--format html|md|both]`` (issue 15).

Writes a self-contained HTML page and/or Markdown for a training run (its run directory + MLflow)
or a benchmark (``<home>/benchmarks/<id>/summary.json``, the format of ``creditflow benchmark``):
success-vs-compute curves with 95% bands over seeds, credit heatmaps against ground truth,
identification and gradient-validity tables, the overhead breakdown, the filled Appendix C
checklist and the decision tree's recommendation for the task profile beside what was measured.

    :mod:`flows.report.sources`    reads a run or a benchmark into cells (the summary's format)
    :mod:`flows.report.aggregate`  across-seed means, 95% intervals and bands
    :mod:`flows.report.figures`    matplotlib figures (SVG for HTML, PNG for Markdown)
    :mod:`flows.report.document`   the sections, format-free
    :mod:`flows.report.render`     HTML and Markdown
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

FORMATS = ("html", "md", "both")


def write_report(report_id: str, home: Optional[Path] = None, out: Optional[Path] = None, fmt: str = "both",
                 target: float = 0.5) -> list[Path]:
    """Write the report of ``report_id``; returns the files written (HTML first)
    (:class:`flows.report.sources.UnknownReportId` for an id that is neither a run nor a benchmark)."""
    from flows.report import document, render, sources
    from flows.runtime import creditflow_home

    home = Path(home) if home else creditflow_home()
    data = sources.load(home, report_id)
    doc = document.build(data, target=target)
    out = Path(out) if out else home / "reports" / report_id
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt in ("html", "both"):
        path = out / "report.html"
        path.write_text(render.to_html(doc), encoding="utf-8")
        written.append(path)
    if fmt in ("md", "both"):
        path = out / "report.md"
        path.write_text(render.to_markdown(doc, out / "figures"), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="creditflow report", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("report_id", metavar="RUN_OR_BENCHMARK_ID")
    p.add_argument("--out", type=Path, help="output directory (default: $CREDITFLOW_HOME/reports/<id>)")
    p.add_argument("--format", choices=FORMATS, default="both")
    p.add_argument("--target", type=float, default=0.5, help="success level for 'compute to reach a target' (0..1)")
    args = p.parse_args(argv)
    if not 0.0 <= args.target <= 1.0:
        print(f"creditflow: config error: --target={args.target}: must be between 0 and 1", file=sys.stderr)
        return 2
    from flows.report.sources import UnknownReportId

    try:
        written = write_report(args.report_id, out=args.out, fmt=args.format, target=args.target)
    except UnknownReportId as exc:
        print(f"creditflow: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
