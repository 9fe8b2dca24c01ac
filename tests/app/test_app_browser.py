"""A real headless Chromium drives the app like a designer: type a prompt, click Generate, see the image and its
seed; drop a PNG to restore its settings. Also takes the README screenshot: with LENS_UPDATE_SCREENSHOT=1 it is
written to assets/generate_tab.png, otherwise to a temporary folder (so a test run leaves the checkout clean)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from app_server_support import REPO
from browser_support import CHROMIUM_ARGS, find_chromium
from PIL import Image, PngImagePlugin

from lens_core.metadata import ImageSettings, read_settings, save_png

pytestmark = pytest.mark.browser
SCREENSHOT = REPO / "assets" / "generate_tab.png"


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_server[0])
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('ready')", timeout=60_000)
    yield page
    page.close()


def test_type_a_prompt_click_generate_see_the_image_and_seed(page, app_server, tmp_path):
    screenshot = SCREENSHOT if os.environ.get("LENS_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    page.fill("#prompt textarea", "A red fox curled up asleep in fresh snow at dawn")
    page.click("#generate-btn")
    page.wait_for_selector("#result-gallery img", timeout=60_000)
    page.wait_for_function("document.querySelector('#job-status').innerText.includes('Saved')", timeout=60_000)
    seed = page.input_value("#seed-used input")
    assert re.fullmatch(r"\d+", seed)
    saved = sorted((app_server[1] / "images").glob(f"*-{seed}-a-red-fox-*.png"))
    assert saved, f"no saved PNG for seed {seed}"
    page.mouse.move(0, 0)
    page.screenshot(path=str(screenshot))
    assert Image.open(screenshot).size == (1280, 900)

    # One click to reuse the seed: the seed mode switches to Fixed with that value.
    page.click("#reuse-seed-btn")
    page.wait_for_function(f"document.querySelector('#seed-input input').value === '{seed}'", timeout=10_000)


def test_dropping_a_png_restores_its_settings(page, tmp_path: Path):
    png = tmp_path / "restore-me.png"
    save_png(
        Image.new("RGB", (8, 8)),
        png,
        ImageSettings(
            prompt="a blue ceramic teapot",
            seed=4242,
            num_inference_steps=20,
            guidance_scale=4.5,
            width=832,
            height=1248,
            variant="Lens",
        ),
    )
    page.set_input_files("#restore-file input[type=file]", str(png))
    page.wait_for_function(
        "document.querySelector('#prompt textarea').value === 'a blue ceramic teapot'", timeout=20_000
    )
    assert page.input_value("#seed-input input") == "4242"
    assert page.locator("#negative-prompt").is_visible()  # Lens (not Turbo) shows the negative prompt


def test_an_empty_prompt_shows_an_error(page):
    page.fill("#prompt textarea", "")
    page.click("#generate-btn")
    page.get_by_text("The prompt is empty").first.wait_for(timeout=20_000)


def test_rewrite_then_generate_saves_both_prompts(page, app_server):
    page.fill("#prompt textarea", "a lighthouse")
    page.get_by_text("Prompt rewriter").first.click()
    page.click("#rewrite-btn")
    rewritten = "A vivid, detailed a lighthouse."  # the test endpoint's answer
    page.wait_for_function(f"document.querySelector('#rewritten textarea').value === '{rewritten}'", timeout=20_000)
    page.click("#generate-btn")
    page.wait_for_function("document.querySelector('#job-status').innerText.includes('Saved')", timeout=60_000)
    seed = page.input_value("#seed-used input")
    (saved,) = (app_server[1] / "images").glob(f"*-{seed}-a-vivid-detailed-a-lighthouse.png")
    settings = read_settings(saved)
    assert (settings.prompt, settings.original_prompt) == (rewritten, "a lighthouse")


def test_gallery_sends_settings_back_to_generate(page, app_server):
    png = app_server[1] / "images" / "zz-gallery-restore.png"
    save_png(
        Image.new("RGB", (64, 64)),
        png,
        ImageSettings(
            prompt="from the gallery",
            seed=777,
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=1.0,
            variant="Lens-Turbo",
        ),
    )
    page.get_by_role("tab", name="Gallery").click()
    page.wait_for_selector("#past-images img", timeout=20_000)
    page.locator("#past-images img").first.click()  # the newest image: the one just written
    page.wait_for_function("document.body.innerText.includes('from the gallery')", timeout=20_000)
    page.click("#send-to-generate")
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'from the gallery'", timeout=20_000)
    assert page.input_value("#seed-input input") == "777"


def test_a_bad_png_says_why_next_to_the_drop_zone_and_leaves_the_form_alone(page, tmp_path: Path):
    png = tmp_path / "bad-steps.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nSteps: -20, Sampler: Euler, CFG scale: 5, Seed: 9, Size: 512x768")
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    page.fill("#prompt textarea", "keep this prompt")
    page.locator("#prompt textarea").press("Tab")  # Gradio syncs a textbox's value on blur
    page.set_input_files("#restore-file input[type=file]", str(png))
    page.wait_for_function(
        "document.querySelector('#restore-message').innerText.includes('num_inference_steps must be')",
        timeout=20_000,
    )
    assert "Cannot restore settings from this file" in page.inner_text("#restore-message")
    assert page.input_value("#prompt textarea") == "keep this prompt"
    assert page.input_value("#seed-input input") == "0"
