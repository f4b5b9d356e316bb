"""The pieces of a self-contained HTML page: the sweep's report.html and the analysis folder's.

No server and no network: figures are PNGs inlined as data URIs and tables sort with a few lines
of inline JavaScript, so a page opens from a cluster file system in any browser. Ground floor:
cluster/report.py and analysis/ both build on it, and neither may import the other.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => \
th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const asc = th.dataset.order !== "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const key = tr => { const t = tr.cells[col].dataset.v ?? tr.cells[col].textContent;
                      const n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
// report.html#sort=<column> opens sorted by that column (a link worth sharing)
const wanted = decodeURIComponent(location.hash.replace(/^#sort=/, ""));
document.querySelectorAll("table.sortable th").forEach(th => { \
if (location.hash && th.textContent === wanted) th.click(); });
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.dataset.imagesLoaded = \
String(imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0));
});
"""

CSS = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; cursor: pointer; }
th[data-order="asc"]::after { content: " ▲"; } th[data-order="desc"]::after { content: " ▼"; }
td.text { text-align: left; } tr.best { background: #e8f5e9; } tr.failed { background: #ffebee; }
img { max-width: 100%; border: 1px solid #eee; } code { white-space: pre-wrap; }
p.note { color: #8a4b00; }
"""


def figure_uri(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as a data: URI (it stays open; the caller closes it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_uri(path: str | Path) -> str:
    """A PNG file as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def table_cell(value: Any) -> str:
    """One <td>: numbers carry their exact value for sorting, NaN shows as a dash."""
    if isinstance(value, float):
        if math.isnan(value):
            return '<td data-v="">&ndash;</td>'
        return f'<td data-v="{value!r}">{value:.4g}</td>'
    if isinstance(value, int | bool):
        return f'<td data-v="{value}">{value}</td>'
    return f'<td class="text">{html.escape(str(value))}</td>'


def sortable_table(columns: list[str], rows: list[list[Any]], table_id: str) -> str:
    """A table whose headers sort it when clicked (SORT_JS)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(table_cell(v) for v in row) + "</tr>" for row in rows)
    return (
        f"<table class='sortable' id='{table_id}'><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def page(title: str, body: list[str]) -> str:
    """A whole page: the title, the parts of `body` in order, the sorting script."""
    return "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            *body,
            f"<script>{SORT_JS}</script></body></html>",
        ]
    )
