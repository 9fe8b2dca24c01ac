"""Shared helper for browser tests: find Debian's Chromium and launch it headless through Playwright.

Playwright can never download its own browser here, so it is pointed at /usr/bin/chromium. Without one the test is
skipped, unless LENS_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str:
    """The Chromium executable; skip (or fail when LENS_REQUIRE_BROWSER=1) when there is none."""
    for candidate in (*CHROMIUM_CANDIDATES, shutil.which("chromium") or ""):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    message = f"no Chromium found at {', '.join(CHROMIUM_CANDIDATES)} (apt-get install -y chromium)"
    if os.environ.get("LENS_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " and LENS_REQUIRE_BROWSER=1")
    pytest.skip(message)


@contextlib.contextmanager
def chromium_page(viewport: tuple[int, int] = (1400, 1800)) -> Iterator:
    """A Playwright page in a fresh headless Chromium; closed afterwards."""
    executable = find_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()
