"""A :class:`flows.report.document.Document` as one self-contained HTML page (inline CSS, inline
SVG figures, base64 PNG images: nothing fetched from anywhere) and as Markdown (figures written
as PNG files beside it, under ``figures/``)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from flows.report import figures
from flows.report.document import Document, Image, Table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1d1d1f;
line-height:1.45;padding:0 1rem}
h1{margin-bottom:.2rem}.sub{color:#555;margin-top:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}th,td{border:1px solid #d0d0d0;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f3f3f3}caption{caption-side:bottom;text-align:left;color:#555;
font-size:.82rem;padding-top:.2rem}figure{margin:1rem 0}figure svg,figure img{max-width:100%;height:auto;display:block}
figcaption{color:#555;font-size:.85rem}nav a{margin-right:.8rem;font-size:.9rem}
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_html(doc: Document) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(doc.title)}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>{e(doc.title)}</h1>", f'<p class="sub">{e(doc.subtitle)}</p>',
           "<nav>" + "".join(f'<a href="#{_slug(s.title)}">{e(s.title)}</a>' for s in doc.sections) + "</nav>"]
    for sec in doc.sections:
        out.append(f'<section id="{_slug(sec.title)}"><h2>{e(sec.title)}</h2>')
        for b in sec.blocks:
            if isinstance(b, str):
                out.append(f"<p>{e(b)}</p>")
            elif isinstance(b, Table):
                rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                head = "" if not any(b.headers) else "<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr>"
                cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
                out.append(f"<table>{cap}{head}{rows}</table>")
            elif isinstance(b, figures.Figure):
                out.append(f'<figure class="plot" data-name="{e(b.name)}">{b.svg}<figcaption>{e(b.caption)}'
                           "</figcaption></figure>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure class="image" data-name="{e(b.name)}"><img alt="{e(b.caption)}" '
                           f'src="data:image/png;base64,{data}"><figcaption>{e(b.caption)}</figcaption></figure>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, fig_dir: Path, rel: str = "figures") -> str:
    """Markdown; figures and images are written to ``fig_dir`` (linked as ``rel/<name>.png``)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = [f"# {doc.title}", "", f"_{doc.subtitle}_", ""]
    for sec in doc.sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, str):
                out += [b, ""]
            elif isinstance(b, Table):
                headers = [h or " " for h in b.headers]
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                out.append("|" + "---|" * len(headers))
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
                out += ([""] + [f"_{b.caption}_"] if b.caption else []) + [""]
            elif isinstance(b, (figures.Figure, Image)):
                (fig_dir / f"{b.name}.png").write_bytes(b.png)
                out += [f"![{_md_cell(b.caption)}]({rel}/{b.name}.png)", "", f"_{b.caption}_", ""]
    return "\n".join(out)
