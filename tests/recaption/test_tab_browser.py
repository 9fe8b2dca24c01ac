"""Drive the Recaption tab in headless Chromium: preview, run against the fake server, review, edit, save."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

try:  # tests/ is on sys.path when it is not a package (pytest's rootdir insertion)
    from browser_support import chromium_page, find_chromium
except ImportError:  # tests/ became a package
    from tests.browser_support import chromium_page, find_chromium
from training.recaption.config import RecaptionConfig

from .conftest import REPO_ROOT, write_images
from .fake_server import FakeOpenAIServer, FakeServerSettings

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]
SERVE_SCRIPT = Path(__file__).with_name("serve_recaption_tab.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tab_url(tmp_path):
    find_chromium()  # skip before starting anything when there is no browser
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("OPENAI_API_KEY", None)
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(SERVE_SCRIPT), str(port), str(tmp_path / "app_out")],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"the tab server exited: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=20)
    log.close()


def tab_url_log(tmp_path: Path) -> Path:
    return tmp_path / "serve.log"


def test_tab_preview_run_review_edit_save(tmp_path, tab_url):
    data = tmp_path / "data"
    write_images(data, 5)
    with (
        FakeOpenAIServer(FakeServerSettings(latency=0.05, fault_cycle=["ok", "429", "ok"])) as server,
        chromium_page() as page,
    ):
        expect = pytest.importorskip("playwright.sync_api").expect
        page.goto(tab_url)
        # Open the accordion first and wait until its server-URL box shows its default: the box is mounted when the
        # accordion opens, and a value typed before that settles is replaced by the default (the preview then went
        # to api.openai.com). Every value is checked in the page before the click that sends it.
        page.get_by_text("Backend and output settings").click()
        url_box, folder_box = page.get_by_label("Server URL (openai)"), page.get_by_label("Dataset folder")
        expect(url_box).to_have_value(RecaptionConfig().base_url, timeout=30_000)
        for box, value in ((folder_box, str(data)), (url_box, server.base_url)):
            box.fill(value)
            box.press("Tab")  # Gradio syncs a textbox's value on blur
            expect(box).to_have_value(value)

        page.get_by_role("button", name="Preview on 4 images").click()
        try:
            page.get_by_text("img003: Scene", exact=False).first.wait_for(timeout=60_000)
        except Exception as error:  # say what the page and the server showed, not just "timeout"
            log = Path(tab_url_log(tmp_path)).read_text(errors="replace")[-3000:]
            pytest.fail(
                f"no preview after 60 s ({error}).\nPage:\n{page.inner_text('body')[-3000:]}\nServer log:\n{log}"
            )
        assert not list(data.glob("*.txt")), "the preview must not write into the dataset"
        assert page.get_by_text("img000: Scene", exact=False).count() >= 1
        assert page.get_by_text("img004:", exact=False).count() == 0  # 4 images, not 5

        page.get_by_role("button", name="Start").click()
        page.get_by_text("finished: 5 / 5 images, 5 captioned, 0 failed").first.wait_for(timeout=60_000)
        assert sorted(path.name for path in data.glob("*.txt")) == [f"img00{i}.txt" for i in range(5)]

        page.get_by_role("button", name="Load captions").click()
        # Loading fills the editor with the first image's caption...
        page.wait_for_function(
            "() => [...document.querySelectorAll('textarea')].some(t => t.value.startsWith('Scene '))", timeout=30_000
        )
        caption_box = page.get_by_label("Caption", exact=True)
        assert caption_box.input_value() == (data / "img000.txt").read_text().strip()
        # ...and the table with one row per caption (its cells are divs, not <td>).
        page.locator(".cell-wrap").filter(has_text="img001").first.wait_for(timeout=10_000)

        caption_box.fill("A hand-edited caption: a small green square on a pale background.")
        page.get_by_role("button", name="Save & accept caption").click()
        page.get_by_text("Saved and accepted img000").wait_for(timeout=30_000)
    assert (data / "img000.txt").read_text() == "A hand-edited caption: a small green square on a pale background.\n"
    assert (data / "img001.txt").read_text().startswith("Scene ")
