"""report.html: one self-contained static page for a sweep or run folder.

No server and no network: the figures are PNGs inlined as data URIs and the table sorts with a
few lines of inline JavaScript, so the file opens from a cluster file system in any browser.
It holds the results table (click a header to sort), the metric-vs-parameter plot, every task's
validation curves over epochs (from metrics.jsonl), the failed tasks' error lines, and GPU-hours
per task and in total (sacct elapsed time x allocated GPUs; CPU-hours where no GPU was allocated).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

# the page's pieces are on the ground floor: the analysis folder's report.html uses them too
from bonnerlab.pages import CSS, SORT_JS, figure_uri, png_uri, table_cell
from bonnerlab.runs import RunPaths, atomic_write_text, read_metrics, save_figure


def _curves(table: Any, metric: str) -> str | None:
    """Every task's validation metric (and loss) per epoch, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(int(r.task), read_metrics(r.run_dir)) for r in table.itertuples()]
    series = [(t, m) for t, m in series if m]
    if not series:
        return None
    keys = [k for k in (metric, "val_loss") if any(k in rec for _, m in series for rec in m)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for task, records in series:
            points = [
                (rec["epoch"], rec[key]) for rec in records if isinstance(rec.get(key), int | float)
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=f"task {task}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if len(series) <= 12:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    uri = figure_uri(fig)
    plt.close(fig)
    return uri


def render(title: str, table: Any, metric: str, plot_png: Path | None) -> str:
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
    if failed:
        parts.append("<h2>Failed tasks</h2><ul id='errors'>")
        parts += [
            f"<li>task {r['task']} ({html.escape(r['failure'])}): "
            f"<code>{html.escape(r['error'])}</code></li>"
            for r in failed
        ]
        parts.append("</ul>")
    if plot_png is not None and plot_png.exists():
        uri = png_uri(plot_png)
        parts.append(
            f"<h2>{html.escape(metric)} against each swept value</h2><img id='plot' src='{uri}'>"
        )
    curves = _curves(table, metric)
    if curves:
        parts.append(f"<h2>Validation curves</h2><img id='curves' src='{curves}'>")
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(parts)


def write_report(path: Path, table: Any, metric: str) -> Path:
    paths = RunPaths(path)
    out = paths.report_html
    title = f"bonnerlab: {paths.root.resolve().name}"
    atomic_write_text(out, render(title, table, metric, paths.results_png))
    return out


def _log_axis(key: str, values: list[Any]) -> bool:
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) != len(values) or min(nums, default=0) <= 0:
        return False
    return key.split(".")[-1] in ("lr", "weight_decay") or max(nums) / min(nums) >= 100


def plot_sweep(table: Any, keys: list[str], col: str, out: Path) -> None:
    """One panel per swept key: the metric of every task against that key's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_xlabel(key)
        ax.set_ylabel(col)
        if others:
            ax.legend(title=",".join(others), fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
