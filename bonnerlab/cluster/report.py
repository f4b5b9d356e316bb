"""report.html: one self-contained static page for a sweep or run folder.

No server and no network: the figures are PNGs inlined as data URIs and the table sorts with a
few lines of inline JavaScript, so the file opens from a cluster file system in any browser.
It holds the results table (click a header to sort), the metric-vs-parameter plot, every task's
validation curves over epochs (from metrics.jsonl), the failed tasks' error lines, and GPU-hours
per task and in total (sacct elapsed time x allocated GPUs; CPU-hours where no GPU was allocated).

Text from the folders (sweep values, folder names, error lines) is untrusted: the page escapes it
(html.escape), the figures draw it as plain text (no mathtext, no LaTeX: a value holding `$...$`
is drawn as typed), and results.csv neutralises cells a spreadsheet would run as a formula
(`spreadsheet_safe`).
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the page's pieces are on the ground floor: the analysis folder's report.html uses them too
from bonnerlab.pages import CSS, SORT_JS, figure_uri, png_uri, table_cell
from bonnerlab.runs import RunPaths, atomic_write_text, read_metrics, save_figure

# OWASP's CSV injection guidance: a text cell starting with one of these is a formula to Excel,
# LibreOffice and Google Sheets (=HYPERLINK(...), +cmd|..., @SUM(...)); a leading ' makes it text
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# ... but a text cell that is only a number (-0.5, +1e-3) is read as that number, not a formula:
# left as is, so it stays a number in the sheet
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def spreadsheet_safe(value: Any) -> Any:
    """A results.csv cell a spreadsheet cannot run: text starting with =, +, -, @, tab or CR gets
    a leading single quote unless it is a plain number; numbers themselves are never changed."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def results_csv(table: Any) -> str:
    """The results table as CSV, every text cell and header through `spreadsheet_safe`."""
    return table.rename(columns=spreadsheet_safe).map(spreadsheet_safe).to_csv(index=False)


@contextlib.contextmanager
def _plain_text() -> Iterator[Any]:
    """pyplot drawing untrusted labels as typed: no mathtext (`$x$` would be parsed, and a value
    like `$\\frac{a$` raises at savefig), no LaTeX."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        yield plt


def spans_decades(values: list[Any], ratio: float = 100.0) -> bool:
    """Positive numbers whose largest is at least `ratio` times the smallest: a log axis."""
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not nums or len(nums) != len(values) or min(nums) <= 0:
        return False
    return max(nums) / min(nums) >= ratio


def _curves(table: Any, metric: str) -> str | None:
    """Every task's validation curves as a data: URI (None when no task has metrics)."""
    with _plain_text() as plt:
        fig = curves_figure(table, metric)
        if fig is None:
            return None
        uri = figure_uri(fig)
        plt.close(fig)
        return uri


def curves_figure(table: Any, metric: str) -> Any:
    """Every task's validation metric (and loss) per epoch, one line per task: integer epoch
    ticks, a log axis for a loss spanning decades. Draw it inside `_plain_text()`."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = [(int(r.task), read_metrics(r.run_dir)) for r in table.itertuples()]
    series = [(t, m) for t, m in series if m]
    if not series:
        return None
    keys = [k for k in (metric, "val_loss") if any(k in rec for _, m in series for rec in m)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        drawn: list[Any] = []
        for task, records in series:
            points = [
                (rec["epoch"], rec[key]) for rec in records if isinstance(rec.get(key), int | float)
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=f"task {task}")
                drawn += [v for _, v in points]
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        if "loss" in key and spans_decades(drawn):
            ax.set_yscale("log")  # 2.3 -> 0.01: a linear axis flattens everything after epoch 1
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if len(series) <= 12:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def render(
    title: str, table: Any, metric: str, plot_png: Path | None, notes: list[str] | None = None
) -> str:
    shown = [c for c in table.columns if c not in ("run_dir",)]
    rows = []
    for record in table.to_dict("records"):
        cls = "best" if record.get("best") == "*" else "failed" if record.get("error") else ""
        rows.append(f'<tr class="{cls}">' + "".join(table_cell(record[c]) for c in shown) + "</tr>")
    gpu_total = float(table["gpu_hours"].sum()) if "gpu_hours" in table else 0.0
    cpu_total = float(table["cpu_hours"].sum()) if "cpu_hours" in table else 0.0
    hours = (
        f"GPU-hours: {gpu_total:.3f} in total"
        if gpu_total
        else f"no GPUs allocated; CPU-hours: {cpu_total:.3f} in total"
    )
    failed = [r for r in table.to_dict("records") if r.get("error")]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(table)} task(s); {html.escape(hours)} "
        "(sacct elapsed time &times; allocated GPUs or CPUs)</p>",
        "<h2>Results</h2><table class='sortable' id='results'><thead><tr>"
        + "".join(f"<th>{html.escape(str(c))}</th>" for c in shown)
        + "</tr></thead><tbody>",
        *rows,
        "</tbody></table>",
    ]
    for note in notes or []:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    if failed:
        parts.append("<h2>Failed tasks</h2><ul id='errors'>")
        parts += [
            f"<li>task {html.escape(str(r['task']))} ({html.escape(r['failure'])}): "
            f"<code>{html.escape(r['error'])}</code></li>"
            for r in failed
        ]
        parts.append("</ul>")
    if plot_png is not None and plot_png.exists():
        uri = png_uri(plot_png)
        parts.append(
            f"<h2>{html.escape(metric)} against each swept value</h2><img id='plot' src='{uri}'>"
        )
    try:
        curves = _curves(table, metric)
    except Exception as e:  # a figure is not worth the page: say why it is missing
        curves = None
        parts.append(f"<p class='note'>{html.escape(_figure_failed('curves', e))}</p>")
    if curves:
        parts.append(f"<h2>Validation curves</h2><img id='curves' src='{curves}'>")
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(parts)


def _figure_failed(what: str, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{what} could not be drawn: {type(e).__name__}: {first}"


def write_report(
    path: Path, table: Any, metric: str, notes: list[str] | None = None, plot: bool = True
) -> Path:
    """report.html of a sweep or run folder; `plot=False`: results.png is not this table's (not
    drawn this time), so it is left off the page."""
    paths = RunPaths(path)
    out = paths.report_html
    title = f"bonnerlab: {paths.root.resolve().name}"
    atomic_write_text(out, render(title, table, metric, paths.results_png if plot else None, notes))
    return out


def write_results(path: Path, table: Any, keys: list[str], metric: str) -> list[str]:
    """results.csv, results.png and report.html of a sweep or run folder, each as far as it goes:
    a figure that cannot be drawn is a note on the page (returned too), never a missing page."""
    paths = RunPaths(path)
    atomic_write_text(paths.results_csv, results_csv(table))
    col = f"best_{metric}"
    notes, plotted = [], False
    if keys and table[col].notna().any():
        try:
            plot_sweep(table, keys, col, paths.results_png)
            plotted = True
        except Exception as e:
            notes.append(_figure_failed("results.png", e))
    write_report(path, table, metric, notes, plot=plotted)
    return notes


def _log_axis(key: str, values: list[Any]) -> bool:
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) != len(values) or min(nums, default=0) <= 0:
        return False
    return key.split(".")[-1] in ("lr", "weight_decay") or spans_decades(nums)


def plot_sweep(table: Any, keys: list[str], col: str, out: Path) -> None:
    """One panel per swept key: the metric of every task against that key's value."""
    with _plain_text() as plt:
        _draw_sweep(plt, table, keys, col, out)


def _draw_sweep(plt: Any, table: Any, keys: list[str], col: str, out: Path) -> None:
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = table[key].tolist()
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        others = [k for k in keys if k != key]
        groups = table.groupby(others, dropna=False) if others else [("", table)]
        for label, group in groups:
            group = group.sort_values(key) if numeric else group
            x = group[key] if numeric else group[key].astype(str)
            ax.plot(x, group[col], "o-", label=str(label) if others else None)
        if numeric and _log_axis(key, values):
            ax.set_xscale("log")
        if "loss" in col and spans_decades(table[col].dropna().tolist()):
            ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(col)
        if others:
            ax.legend(title=",".join(others), fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
