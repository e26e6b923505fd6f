"""A real browser against `dse ui`: headless Debian Chromium driven by Playwright's Python
package (no browser download: ``executable_path=/usr/bin/chromium``).

Runs a small study (inline evaluator, MLflow tracking on), starts `dse ui` on a free
port, and checks what a person sees: the experiment's training-runs view lists the study
run, the parent run shows ``hypervolume``, the Pareto front table renders, the PNG
artifact loads. Screenshots go to a temporary folder, or to ``$DSE_UI_SCREENSHOTS`` (how
the ones in docs/img/ were made). Skipped, with the reason, where chromium or playwright
is absent (`.ci/run` installs both).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.net import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 60_000  # only to stop a hang: an element normally shows within seconds

pytestmark = pytest.mark.slow


def _dse(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from dse.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def test_ui_shows_the_study_in_a_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} absent (Debian package chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python package playwright absent (dev extra)")
    shots = Path(os.environ.get("DSE_UI_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path / "studies"
    spec = ROOT / "examples" / "zdt1.toml"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from dse.cli import main  # the study runs in this process (a Python start-up less)

    assert main(["run", str(spec), "--n-trials", "8", "--address", "inline", "--dir", str(root),
                 "--progress", "log"]) == 0
    port = free_port()
    ui = subprocess.Popen(
        _dse("ui", "zdt1", "--dir", str(root), "--port", str(port)),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        assert ui.stdout is not None
        lines = [ui.stdout.readline(), ui.stdout.readline()]
        run_url = lines[0].split(": ", 1)[1].split()[0]
        runs_url = lines[1].split(": ", 1)[1].strip()
        assert run_url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "/runs/" in run_url
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 240
        while True:
            assert ui.poll() is None, "dse ui exited"
            try:
                if opener.open(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "dse ui did not answer"
                time.sleep(0.3)
        with sync_api.sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=ARGS, headless=True,
                viewport={"width": 1280, "height": 800},
            )
            try:
                page = ctx.new_page()
                page.set_default_timeout(WAIT_MS)
                # the experiment's training-runs view lists the study run (children folded in)
                page.goto(runs_url)
                grid = page.get_by_role("grid").or_(page.get_by_role("table")).first
                grid.get_by_role("link", name="zdt1", exact=True).wait_for()
                page.screenshot(path=str(shots / "ui_study.png"))
                assert "/runs" in page.url and "workflowType=machine_learning" in page.url
                # the parent run: hypervolume among its metrics
                page.goto(run_url)
                page.get_by_text("hypervolume", exact=True).first.wait_for()
                page.get_by_text("pareto_size", exact=True).first.wait_for()
                page.get_by_text("hypervolume", exact=True).first.scroll_into_view_if_needed()
                page.screenshot(path=str(shots / "ui_run.png"))
                # the Pareto front as a table
                page.goto(run_url.replace("?", "/artifacts/pareto_front.json?"))
                page.get_by_text("values/f1", exact=True).first.wait_for()
                page.get_by_text("params/x/0", exact=True).first.wait_for()
                # cells are filled (a dot in a column name left them blank)
                page.get_by_role("cell").filter(has_text=re.compile(r"^0\.\d+$")).first.wait_for()
                page.screenshot(path=str(shots / "ui_front_table.png"))
                # the PNG artifact loads (decoded by the browser, not only listed)
                page.get_by_text("pareto.png", exact=True).first.click()  # in the artifact tree
                widest = "() => Math.max(0, ...[...document.images].map(i => i.complete ? i.naturalWidth : 0))"
                page.wait_for_function(f"({widest})() >= 500")  # the plot, not an icon
                assert page.evaluate(widest) == 600  # pareto.png of two objectives: one 6-inch panel
                page.screenshot(path=str(shots / "ui_plot.png"))
            finally:
                ctx.close()
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait()
    for name in ("ui_study.png", "ui_run.png", "ui_front_table.png", "ui_plot.png"):
        assert (shots / name).read_bytes()[:4] == b"\x89PNG"
    if not os.environ.get("DSE_UI_SCREENSHOTS"):
        shutil.rmtree(shots)
