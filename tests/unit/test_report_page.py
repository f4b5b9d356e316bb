"""report.html, results.png and results.csv from folders holding hostile text, without a browser
(that one: tests/unit/test_report.py): every piece of folder text escaped on the page, `$...$`
drawn as typed, spreadsheet formulas neutralised, integer epoch ticks, log axes for losses."""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser

import pandas as pd
import pytest
from helpers import error_log, fake_sweep

from bonnerlab.cluster.report import (
    _plain_text,
    curves_figure,
    results_csv,
    spreadsheet_safe,
    write_results,
)
from bonnerlab.cluster.status import sweep_status
from bonnerlab.pages import SORT_JS

SCRIPT = "<script>alert('x')</script>"
VALUES = [SCRIPT, "a &lt; b & \"quoted\" 'single'"]
# no "/" in a folder name, so no closing tag: an element with an event handler instead
FOLDER = "<img src=x onerror=alert(1)> & co"
ERROR = f'ValueError: {SCRIPT} & "it\'s" &amp;'


class Page(HTMLParser):
    """Tags, attributes and the text of each element, as a browser's parser reads them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.text: dict[str, list[str]] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if self.stack:
            self.text.setdefault(self.stack[-1], []).append(data)


def _hostile_sweep(tmp_path):
    sweep = tmp_path / FOLDER
    points = [{"data.root": v} for v in VALUES]
    fake_sweep(sweep, ["DONE", "FAILED"], points=points, curves=[[0.5, 0.7], [0.2]])
    error_log(sweep / "logs", "101", f"Traceback (most recent call last):\n  x\n{ERROR}\n")
    return sweep


def test_hostile_text_in_values_folder_names_and_errors_is_escaped_on_the_page(tmp_path):
    sweep = _hostile_sweep(tmp_path)
    sweep_status(sweep)
    page = Page((sweep / "report.html").read_text())
    # the only script is the page's own; no element came from folder text
    scripts = [t for t, _ in page.tags if t == "script"]
    assert scripts == ["script"] and page.text["script"] == [SORT_JS]
    assert not [a for _, attrs in page.tags for a in attrs if a.startswith("on")]
    assert [a.get("id") for t, a in page.tags if t == "img"] == ["plot", "curves"]
    # ... and each shows exactly as written
    assert page.text["title"] == page.text["h1"] == [f"bonnerlab: {FOLDER}"]
    assert set(VALUES) <= set(page.text["td"])
    assert page.text["code"] == [ERROR]


def test_dollar_signs_in_sweep_values_are_drawn_as_typed(tmp_path):
    """`$\\frac{a$` is bad mathtext: pyplot raised at savefig, and neither results.png nor
    report.html was written."""
    sweep = tmp_path / "sweep"
    values = ["$\\frac{a$", "b$x^$", "$10 & $20"]
    fake_sweep(
        sweep,
        ["DONE"] * 3,
        points=[{"data.root": v} for v in values],
        curves=[[0.5], [0.6], [0.7]],
    )
    sweep_status(sweep)
    png = (sweep / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "<img id='plot'" in (sweep / "report.html").read_text()
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"]  # only the report's own figures are plain


def test_a_figure_that_cannot_be_drawn_is_a_note_on_a_page_that_is_still_written(
    tmp_path, monkeypatch
):
    import bonnerlab.cluster.report as report

    sweep = tmp_path / "sweep"
    fake_sweep(sweep, ["DONE", "DONE"], curves=[[0.5], [0.6]])
    table = sweep_status(sweep, write=False)

    def broken(*args):
        raise RuntimeError("no display\nsecond line")

    monkeypatch.setattr(report, "_draw_sweep", broken)
    notes = write_results(sweep, table, ["seed"], "val_acc")
    assert notes == ["results.png could not be drawn: RuntimeError: no display"]
    text = (sweep / "report.html").read_text()
    assert "results.png could not be drawn" in text and "<img id='plot'" not in text
    assert (sweep / "results.csv").is_file()


@pytest.mark.parametrize(
    "value, safe",
    [
        ('=HYPERLINK("http://evil","x")', '\'=HYPERLINK("http://evil","x")'),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("\t=1", "'\t=1"),
        ("-0.5", "-0.5"),  # a number as text is that number to a spreadsheet, not a formula
        ("+1e-3", "+1e-3"),
        ("adamw", "adamw"),
        (-0.5, -0.5),
        (3, 3),
    ],
)
def test_spreadsheet_formulas_are_neutralised_and_numbers_kept(value, safe):
    assert spreadsheet_safe(value) == safe


def test_results_csv_neutralises_text_cells_and_keeps_numeric_columns_numeric():
    table = pd.DataFrame(
        {
            "task": [0, 1, 2],
            "data.root": ["=1+1", "@x", "plain"],
            "optim.lr": [-0.5, 0.1, 1e-3],
            "error": ["", "-x: bad", ""],
        }
    )
    text = results_csv(table)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["data.root"] for r in rows] == ["'=1+1", "'@x", "plain"]
    assert [r["error"] for r in rows] == ["", "'-x: bad", ""]
    back = pd.read_csv(io.StringIO(text))
    assert back["optim.lr"].dtype == float and back["optim.lr"].tolist() == [-0.5, 0.1, 1e-3]
    assert back["task"].tolist() == [0, 1, 2]


def _curves(tmp_path, accs):
    tmp_path.mkdir()
    sweep = tmp_path / "sweep"
    fake_sweep(sweep, ["DONE"] * len(accs), curves=accs)
    table = sweep_status(sweep, write=False)
    with _plain_text() as plt:
        fig = curves_figure(table, "val_acc")
        fig.canvas.draw()
        axes = {ax.get_ylabel(): ax for ax in fig.axes}
        ticks = {k: list(ax.get_xticks()) for k, ax in axes.items()}
        scales = {k: ax.get_yscale() for k, ax in axes.items()}
        plt.close(fig)
    return ticks, scales


def test_epoch_ticks_are_integers_and_a_loss_spanning_decades_is_on_a_log_axis(tmp_path):
    # val_loss = 1 - val_acc: 0.5 down to 0.001, over two decades
    ticks, scales = _curves(tmp_path / "a", [[0.5, 0.9, 0.99, 0.999], [0.5, 0.6, 0.7, 0.8]])
    assert scales == {"val_acc": "linear", "val_loss": "log"}
    for values in ticks.values():
        assert values and all(float(v).is_integer() for v in values), values
    # three epochs: matplotlib's own locator would put ticks at 1.25, 1.5, ...
    ticks, scales = _curves(tmp_path / "b", [[0.5, 0.6, 0.7]])
    assert scales == {"val_acc": "linear", "val_loss": "linear"}
    assert all(float(v).is_integer() for v in ticks["val_acc"]), ticks
