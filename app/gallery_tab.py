"""The Gallery tab: the PNGs of the caller's workspace (`images/`), newest first, with the settings embedded in each;
one click sends those settings back to the Generate tab, another deletes the image. On a shared server each visitor
sees only their own images, unless the server runs with `--shared-gallery` (then everyone's, deletable by their
owner only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from app.access import Hosting
from app.generate_tab import GenerateTab
from app.serving import served_copy
from app.workspace import WorkspaceError
from lens_core.engine import IMAGES_SUBDIR, LensEngine
from lens_core.metadata import read_settings

MAX_GALLERY_IMAGES = 200


def list_images(folders: list[Path], limit: int = MAX_GALLERY_IMAGES) -> list[Path]:
    """The newest `limit` PNGs of `folders` (temporary `.partial` / hidden files excluded)."""
    paths = [
        path
        for folder in folders
        for path in Path(folder).glob("*.png")
        if not path.name.startswith(".") and path.is_file() and not path.is_symlink()
    ]
    return sorted(paths, key=lambda path: path.stat().st_mtime, reverse=True)[:limit]


def describe(path: Path) -> dict:
    """The settings of one image as JSON, or the reason there are none."""
    try:
        return {"file": path.name, **dataclasses.asdict(read_settings(path))}
    except ValueError as error:
        return {"file": path.name, "error": str(error)}


def delete_image(hosting: Hosting, request: gr.Request | None, file_name) -> str:
    """Delete one PNG of the caller's own gallery, by file name; anything else is refused."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise gr.Error("Select an image first.")
    workspace = hosting.workspace(request)
    try:
        path = workspace.child(IMAGES_SUBDIR, file_name.strip())
    except WorkspaceError as error:
        raise gr.Error(str(error)) from None
    if path.suffix.lower() != ".png" or not path.is_file() or path.parent != workspace.resolve(workspace.images):
        raise gr.Error(f"{file_name!r} is not an image of your gallery.")
    path.unlink()
    return f"Deleted {path.name}."


def build_gallery_tab(
    engine: LensEngine, generate_tab: GenerateTab, tabs: gr.Tabs, tab: gr.Tab, hosting: Hosting | None = None
) -> None:
    """Lay out the gallery; it refreshes when the tab opens and on its button."""
    hosting = hosting or Hosting.personal(engine.config.output_dir)
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", scale=0)
        count = gr.Markdown()
    with gr.Row(equal_height=False):
        gallery = gr.Gallery(label="Past images", columns=5, height=560, allow_preview=True, elem_id="past-images")
        with gr.Column():
            info = gr.JSON(label="Settings of the selected image")
            send = gr.Button("Send these settings to Generate", variant="primary", elem_id="send-to-generate")
            delete = gr.Button("Delete this image", variant="stop", size="sm", elem_id="delete-image")
            message = gr.Markdown()
    paths = gr.State([])  # server-side: the client only ever sends an index into it
    selected = gr.State(None)

    def folders(request: gr.Request | None) -> list[Path]:
        if hosting.shared_gallery:
            return hosting.workspaces.all_image_folders()
        return [hosting.workspace(request).images]

    def load(request: gr.Request) -> tuple:
        found = list_images(folders(request))
        items = [(served_copy(path), path.stem) for path in found]
        where = "the shared gallery" if hosting.shared_gallery else "your workspace"
        if not hosting.shared:
            where = f"`{engine.config.output_dir}`"
        return items, [str(path) for path in found], f"{len(found)} image(s) in {where}"

    def select(shown: list[str], event: gr.SelectData) -> tuple:
        index = event.index if isinstance(event.index, int) else -1
        if not 0 <= index < len(shown):
            return None, None
        path = Path(shown[index])
        return str(path), describe(path)

    def send_to_generate(path: str | None) -> dict:
        if not path:
            raise gr.Error("Select an image first.")
        try:
            updates = generate_tab.restore_updates(read_settings(path), Path(path).name)
        except ValueError as error:
            raise gr.Error(f"This image has no usable settings: {error}") from None
        return {**updates, tabs: gr.Tabs(selected="generate")}

    def delete_selected(path: str | None, request: gr.Request) -> tuple:
        text = delete_image(hosting, request, Path(path).name if path else None)
        return (*load(request), None, None, text)

    def delete_by_name(file_name: str, request: gr.Request) -> str:
        return delete_image(hosting, request, file_name)

    listing = [gallery, paths, count]
    refresh.click(load, None, listing, api_name="list_gallery", queue=False)
    tab.select(load, None, listing, api_visibility="private", queue=False)
    gallery.select(select, [paths], [selected, info], api_visibility="private", queue=False)
    send.click(send_to_generate, [selected], [*generate_tab.restore_outputs(), tabs], api_name="send_to_generate")
    delete.click(delete_selected, [selected], [*listing, selected, info, message], api_visibility="private")
    with gr.Column(visible=False):
        file_name = gr.Textbox(label="file_name")
        trigger = gr.Button()
    trigger.click(delete_by_name, [file_name], [message], api_name="delete_image")
