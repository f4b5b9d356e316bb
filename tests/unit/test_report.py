"""report.html in a real headless browser (Debian's Chromium): rows, sorting, images that render.

The browser comes from `make chromium` (apt-get); where it is missing and cannot be installed the
test is skipped with the reason (BONNERLAB_REQUIRE_BROWSER=1 makes that a failure).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from helpers import TRACEBACK, error_log, fake_sweep

from bonnerlab.cluster.status import sweep_status


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        # a fresh machine's package lists may be empty: update them first
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "-o",
                "DPkg::Lock::Timeout=300",
                "--no-install-recommends",
                "chromium",
            ],
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=900,
        )
        found = shutil.which("chromium")
    if found is None:
        if os.environ.get("BONNERLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "chromium required (BONNERLAB_REQUIRE_BROWSER=1) but not installed: make chromium"
            )
        pytest.skip("chromium is not installed (make chromium)")
    return found


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_report_page_in_headless_chromium(tmp_path):
    from PIL import Image

    browser = _chromium()
    sweep = tmp_path / "sweep"
    fake_sweep(sweep, ["DONE", "FAILED", "DONE"], curves=[[0.5, 0.7], [0.2], [0.6, 0.9, 0.95]])
    error_log(sweep / "logs", "101", TRACEBACK)
    sweep_status(sweep)
    page = sweep / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing to fetch: opens offline

    dom = _headless(browser, "--dump-dom", f"file://{page}#sort=best_val_acc")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = dom.stdout.split('id="results"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.split("<tbody>", 1)[1], re.S)
    first_cells = [re.search(r"<td[^>]*>(.*?)</td>", r).group(1) for r in rows]
    assert first_cells == ["1", "0", "2"]  # sorted by best_val_acc, ascending: 0.2, 0.7, 0.95
    assert 'data-images-loaded="true"' in dom.stdout
    assert "ValueError: data.root /nope holds no images" in dom.stdout.split('id="errors"', 1)[1]
    assert "no GPUs allocated; CPU-hours" in dom.stdout

    shot = tmp_path / "shot.png"
    out = _headless(browser, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{page}")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # plots and table drawn, not a blank page
