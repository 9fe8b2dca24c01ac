"""The shared page in a real browser: it says it is shared, an anonymous visitor's gallery survives a reload (the
browser keeps its signed workspace id), and another browser does not see it."""

from __future__ import annotations

import pytest
from browser_support import chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('ready')", timeout=60_000)


def gallery_text(page) -> str:
    page.get_by_role("tab", name="Gallery").click()
    page.wait_for_function("document.body.innerText.includes('image(s) in your workspace')", timeout=20_000)
    return page.inner_text("body")


def test_an_anonymous_browser_keeps_its_workspace_across_reloads(space_app):
    with chromium_page() as page:
        open_page(page, space_app.url)
        assert "shared" in page.inner_text("#hosting-mode")
        page.fill("#prompt textarea", "kept across reloads")
        page.click("#generate-btn")
        page.wait_for_function("document.querySelector('#job-status').innerText.includes('Saved')", timeout=60_000)
        page.reload()
        open_page(page, space_app.url)
        page.get_by_role("tab", name="Gallery").click()
        page.wait_for_function("document.body.innerText.includes('kept-across-reloads')", timeout=20_000)
    with chromium_page() as stranger:
        open_page(stranger, space_app.url)
        assert "kept-across-reloads" not in gallery_text(stranger)
