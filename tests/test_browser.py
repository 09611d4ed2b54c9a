"""The notebooks as people use them: JupyterLab on localhost, driven in Debian's headless Chromium by Playwright.

Nothing downloads a browser: Playwright is pointed at ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run``
installs it). Without it the tests skip, saying so, except where ``BWL_REQUIRE_BROWSER=1`` (CI), where they fail.
Screenshots of each step are kept under the test's temporary folder (``screenshots/``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SMOKE = {"sweep_pairs": False, "sweep_seeds": [0]}


def _browser_or_skip() -> None:
    if Path(CHROMIUM).is_file():
        return
    reason = f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium chromium-driver)"
    if os.environ.get("BWL_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (BWL_REQUIRE_BROWSER=1: CI must run the browser tests)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on localhost with a notebook folder, and one headless Chromium page on it."""

    def __init__(self, folder: Path, shots: Path, playwright):
        self.folder, self.shots, self.token, self.port = folder, shots, "bwl-test", _free_port()
        self.log = open(shots / "jupyterlab.log", "w")  # noqa: SIM115 (closed in close(), after the server)
        settings = folder.parent / "lab-settings"  # every cell in the DOM (no windowing); no news pop-up
        for plugin, values in (("notebook-extension/tracker", {"windowingMode": "none"}),
                               ("apputils-extension/notification", {"fetchNews": "false"})):
            path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={folder}",
             "--LabApp.expose_app_in_browser=True", "--allow-root", "--LabApp.extension_manager=readonly",
             f"--LabApp.user_settings_dir={settings}"],
            stdout=subprocess.DEVNULL, stderr=self.log, cwd=folder,
        )
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status?token={self.token}", timeout=2)
                break
            except OSError:
                if time.time() > deadline or self.server.poll() is not None:
                    raise RuntimeError(f"JupyterLab did not start; see {shots / 'jupyterlab.log'}") from None
                time.sleep(0.5)
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS[1:], headless=True)
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(m.text) if m.type == "error" else None)
        self.step = 0

    def open(self, notebook: str) -> None:
        self.page.goto(f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?token={self.token}")
        self.page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                    " && window.jupyterapp.shell.currentWidget.context"
                                    f" && window.jupyterapp.shell.currentWidget.context.path === {notebook!r}",
                                    timeout=120_000)
        self.page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.session"
                                    " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                    " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                    ".connectionStatus === 'connected'", timeout=120_000)

    def run_all(self, timeout_s: float = 600) -> None:
        """Clear the outputs (and execution counts) a notebook was saved with, run every cell and wait until the
        kernel is idle with every code cell executed."""
        self.page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
        self.page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets"
                                    ".every(c => c.model.type !== 'code' || c.model.executionCount === null)")
        self.page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        self.page.wait_for_function(
            "() => { const nb = window.jupyterapp.shell.currentWidget; const cells = nb.content.widgets;"
            " return nb.sessionContext.kernelDisplayStatus === 'idle' && cells.every(c => c.model.type !== 'code'"
            " || (c.model.executionCount !== null && !c.node.querySelector('.jp-InputArea-prompt')"
            ".textContent.includes('*'))); }", timeout=timeout_s * 1000)

    def shot(self, name: str) -> Path:
        self.step += 1
        path = self.shots / f"{self.step:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def error_outputs(self) -> list[str]:
        """Error outputs and widget display errors on the page."""
        texts = self.page.locator(".jp-OutputArea-output[data-mime-type*='error'], .jp-RenderedText[data-mime-type="
                                  "'application/vnd.jupyter.stderr']").all_inner_texts()
        body = self.page.inner_text("body")
        return [t for t in texts if "Error" in t] + (["Error displaying widget"] if "Error displaying widget" in body
                                                     else [])

    def front_end_errors(self) -> list[str]:
        """Uncaught page errors, console errors (but a missing static resource), and error outputs on the page."""
        console = [m for m in self.console if not m.startswith("Failed to load resource")]
        return self.errors + console + self.error_outputs()

    def close(self) -> None:
        self.browser.close()
        self.server.terminate()
        self.server.wait(timeout=30)
        self.log.close()


def notebook_copy(name: str, folder: Path, runs: Path) -> str:
    """``name`` from notebooks/, parameterized for the smoke profile writing under ``runs``, as a person would set
    its parameters cell; returns the copy's file name."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    overrides = {**SMOKE, "runs_dir": str(runs), "figures_dir": str(runs / "figures")}
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = f'profile = "smoke"\noverrides = {overrides!r}\ninteractive = True\n'
    nbformat.write(nb, folder / name)
    return name


@pytest.fixture
def lab(tmp_path):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    folder, shots = tmp_path / "lab", tmp_path / "screenshots"
    folder.mkdir()
    shots.mkdir()
    with sync_playwright() as playwright:
        server = Lab(folder, shots, playwright)
        try:
            yield server
        finally:
            server.close()


def smoke_study(runs: Path):
    from bwl.study import Study, load_profile

    study = Study(load_profile("smoke", {**SMOKE, "runs_dir": str(runs), "figures_dir": str(runs / "figures")}))
    study.prepare_data()
    return study


def image_bytes(lab: Lab) -> bytes:
    """The bytes of the explorer's displayed PNG (the widget's blob URL, read in the page)."""
    data = lab.page.evaluate(
        "async () => { const img = document.querySelector('.jp-OutputArea-output .widget-image');"
        " const buf = await (await fetch(img.src)).arrayBuffer(); let s = ''; const b = new Uint8Array(buf);"
        " for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]); return btoa(s); }")
    return base64.b64decode(data)


def set_slider(lab: Lab, adapter_column: int, block: str, value: float) -> None:
    """Type ``value`` into the readout of ``block``'s slider in the explorer's ``adapter_column`` and press Enter."""
    column = lab.page.locator(".jp-OutputArea-output .widget-hbox > .widget-vbox").nth(adapter_column)
    slider = column.locator(".widget-slider", has=lab.page.locator("label", has_text=block)).first
    readout = slider.locator(".widget-readout")
    readout.click()
    lab.page.keyboard.press("Control+A")
    lab.page.keyboard.type(f"{value}")
    lab.page.keyboard.press("Enter")


def wait_for_new_image(lab: Lab, previous: bytes, timeout_s: float = 120) -> bytes:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        current = image_bytes(lab)
        if current != previous:
            return current
        time.sleep(0.5)
    raise AssertionError("the explorer's image did not change")


def test_block_explorer_slider_changes_the_image_and_back(lab, tmp_path):
    runs = tmp_path / "runs"
    study = smoke_study(runs)
    from bwl.study.design.vocabulary import identity, style

    study.train_all([identity("locon"), style("locon")])
    lab.open(notebook_copy("05_block_explorer.ipynb", lab.folder, runs))
    lab.run_all()
    lab.page.wait_for_selector(".jp-OutputArea-output .widget-image", timeout=300_000)
    time.sleep(1)
    lab.shot("explorer-before")
    first = image_bytes(lab)
    set_slider(lab, 1, "OUT3", 0.0)
    changed = wait_for_new_image(lab, first)
    lab.shot("explorer-style-OUT3-at-0")
    set_slider(lab, 1, "OUT3", 1.0)
    back = wait_for_new_image(lab, changed)
    lab.shot("explorer-style-OUT3-back-at-1")
    assert changed != first and back == first
    assert lab.page.locator(".jp-OutputArea-output table", has_text="pixel difference").count() == 1  # the analyzer
    assert not lab.front_end_errors(), lab.front_end_errors()


def _folder_state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_caption_editor_removes_a_tag_and_saves_only_the_captions(lab, tmp_path):
    runs = tmp_path / "runs"
    study = smoke_study(runs)
    folder = study.concept_dir("identity")
    for txt in folder.glob("*.txt"):
        txt.write_text(txt.read_text().strip() + ", sky background, extra tag\n")
    before = _folder_state(folder)
    lab.open(notebook_copy("01_data_preparation.ipynb", lab.folder, runs))
    lab.run_all()
    lab.shot("data-preparation-run")
    lab.page.get_by_role("button", name="save captions").wait_for(timeout=60_000)
    lab.shot("caption-editor")
    lab.page.get_by_placeholder("tag").fill("extra tag")
    lab.page.get_by_role("button", name="remove from all").click()
    lab.page.locator(".jp-OutputArea-output", has_text="removed extra tag from 20 captions").wait_for()
    lab.page.get_by_role("button", name="save captions").click()
    lab.page.locator(".jp-OutputArea-output", has_text="saved 20 caption files").wait_for()
    lab.shot("caption-editor-saved")
    after = _folder_state(folder)
    assert before.keys() == after.keys()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {p.name for p in folder.glob("*.txt")}
    assert all(p.read_text() == "zkc, sky background\n" for p in folder.glob("*.txt"))
    assert not lab.front_end_errors(), lab.front_end_errors()


def open_and_render(lab: Lab, name: str) -> None:
    lab.open(name)
    lab.page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.length > 0"
                               " && window.jupyterapp.shell.currentWidget.context.isReady", timeout=60_000)
    time.sleep(2)  # outputs render, widget views included
    lab.shot(f"open-{Path(name).stem}")


def test_every_notebook_opens_without_a_front_end_error(lab, tmp_path):
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        shutil.copy(notebook, lab.folder / notebook.name)
        lab.page.evaluate("() => window.jupyterapp && window.jupyterapp.commands.execute('application:close-all')")
        open_and_render(lab, notebook.name)
        assert not lab.error_outputs(), (notebook.name, lab.error_outputs())
    assert not lab.front_end_errors(), lab.front_end_errors()
