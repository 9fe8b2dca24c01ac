"""The Gallery tab: every PNG in `<output-dir>/images/`, newest first, with the settings embedded in it; one click
sends those settings back to the Generate tab."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from app.generate_tab import GenerateTab
from lens_core.engine import IMAGES_SUBDIR, LensEngine
from lens_core.metadata import read_settings

MAX_GALLERY_IMAGES = 200


def list_images(output_dir: Path, limit: int = MAX_GALLERY_IMAGES) -> list[Path]:
    """The newest `limit` PNGs of the output folder (temporary `.partial` files excluded)."""
    folder = Path(output_dir) / IMAGES_SUBDIR
    paths = [path for path in folder.glob("*.png") if not path.name.startswith(".")]
    return sorted(paths, key=lambda path: path.stat().st_mtime, reverse=True)[:limit]


def describe(path: Path) -> dict:
    """The settings of one image as JSON, or the reason there are none."""
    try:
        return {"file": path.name, **dataclasses.asdict(read_settings(path))}
    except ValueError as error:
        return {"file": path.name, "error": str(error)}


def build_gallery_tab(engine: LensEngine, generate_tab: GenerateTab, tabs: gr.Tabs, tab: gr.Tab) -> None:
    """Lay out the gallery; it refreshes when the tab opens and on its button."""
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", scale=0)
        count = gr.Markdown()
    with gr.Row(equal_height=False):
        gallery = gr.Gallery(label="Past images", columns=5, height=560, allow_preview=True, elem_id="past-images")
        with gr.Column():
            info = gr.JSON(label="Settings of the selected image")
            send = gr.Button("Send these settings to Generate", variant="primary", elem_id="send-to-generate")
    paths = gr.State([])
    selected = gr.State(None)

    def load() -> tuple:
        found = list_images(engine.config.output_dir)
        items = [(str(path), path.stem) for path in found]
        return items, [str(path) for path in found], f"{len(found)} image(s) in `{engine.config.output_dir}`"

    def select(shown: list[str], event: gr.SelectData) -> tuple:
        path = Path(shown[event.index])
        return str(path), describe(path)

    def send_to_generate(path: str | None) -> dict:
        if not path:
            raise gr.Error("Select an image first.")
        try:
            updates = generate_tab.restore_updates(read_settings(path), Path(path).name)
        except ValueError as error:
            raise gr.Error(f"This image has no usable settings: {error}") from None
        return {**updates, tabs: gr.Tabs(selected="generate")}

    refresh.click(load, None, [gallery, paths, count], api_name="list_gallery")
    tab.select(load, None, [gallery, paths, count], api_visibility="private")
    gallery.select(select, [paths], [selected, info], api_visibility="private")
    send.click(send_to_generate, [selected], [*generate_tab.restore_outputs(), tabs], api_name="send_to_generate")
