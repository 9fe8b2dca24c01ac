"""The top-level page: the model status banner and the tabs. `build_ui` builds it; `launch_options` says how to serve
it. The engine is built once in `main()` and handed to every tab builder."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.gallery_tab import build_gallery_tab
from app.generate_tab import GPU_QUEUE, build_generate_tab, user_error
from app.recaption_tab import build_recaption_tab
from app.settings import AppSettings
from app.train_tab import build_train_tab
from lens_core.engine import TINY_MODEL, LensEngine
from lens_core.loading import CheckpointError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _status_outputs(engine: LensEngine) -> tuple:
    loading = engine.status == "loading"
    return engine.status_text(), gr.update(visible=not engine.ready and not loading), gr.Timer(active=loading)


def _build_status_banner(engine: LensEngine) -> None:
    banner = gr.Markdown(engine.status_text(), elem_id="model-status")
    with gr.Row():
        demo_button = gr.Button(
            "Use the tiny random demo model", variant="primary", size="sm", visible=False, elem_id="demo-model-btn"
        )
    timer = gr.Timer(1.0, active=True)

    def use_demo_model() -> tuple:
        try:
            engine.load(TINY_MODEL)
        except (CheckpointError, OSError, ValueError) as error:
            raise user_error(error) from None
        return _status_outputs(engine)

    outputs = [banner, demo_button, timer]
    timer.tick(lambda: _status_outputs(engine), None, outputs, api_visibility="private", show_progress="hidden")
    demo_button.click(
        use_demo_model, None, outputs, api_name="load_demo_model", concurrency_id=GPU_QUEUE, concurrency_limit=1
    )
    gr.api(engine.status_text, api_name="model_status")


def build_ui(engine: LensEngine, settings: AppSettings) -> gr.Blocks:
    """The whole app as a `gr.Blocks` (not launched)."""
    with gr.Blocks(title="Lens studio") as demo:
        gr.Markdown("# Lens studio\nText to image with Microsoft's Lens.", elem_id="title")
        _build_status_banner(engine)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                generate_tab = build_generate_tab(engine, settings)
            with gr.Tab("Gallery", id="gallery") as gallery_tab:
                build_gallery_tab(engine, generate_tab, tabs, gallery_tab)
            with gr.Tab("Recaption", id="recaption"):
                build_recaption_tab(settings.output_dir / "recaption")
            with gr.Tab("Train", id="train"):
                build_train_tab(settings.output_dir / "training", engine, generate_tab)
    return demo


def launch_options(settings: AppSettings) -> dict:
    """Keyword arguments for `demo.launch`."""
    images = settings.output_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "auth": settings.auth or None,
        "allowed_paths": [str(images.resolve())],
        "css_paths": [ASSETS / "style.css"],
        "theme": gr.themes.Soft(primary_hue="indigo"),
    }
