"""The top-level page: the model status banner, the hosting mode, the queue line and the tabs. `build_ui` builds it;
`launch_options` says how to serve it. The engine is built once in `main()` and handed to every tab builder, with the
`Hosting` policy that says whose workspace a request belongs to and what it may do."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from app.access import Hosting
from app.gallery_tab import build_gallery_tab
from app.generate_tab import GPU_QUEUE, build_generate_tab, user_error
from app.input_types import enforce_input_types
from app.login_throttle import LoginThrottle, LoginThrottleMiddleware
from app.recaption_tab import build_recaption_tab
from app.settings import AppSettings
from app.train_tab import build_train_tab
from lens_core.engine import TINY_MODEL, LensEngine
from lens_core.loading import CheckpointError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
STATUS_POLL_S = 1.0  # while the model loads
QUEUE_POLL_S = 2.0  # the "N jobs ahead of you" line
# Gradio's temporary copies (uploads, images shown on the page): every 10 minutes, delete those older than an hour.
DELETE_CACHE = (600, 3600)
BROWSER_ID_KEY = "lens-studio-workspace"  # localStorage key of an anonymous visitor's signed workspace id


def _status_outputs(engine: LensEngine, hosting: Hosting) -> tuple:
    loading = engine.status == "loading"
    return (
        engine.status_text(for_visitors=hosting.shared),
        gr.update(visible=not engine.ready and not loading),
        gr.Timer(active=loading),
    )


def _build_status_banner(engine: LensEngine, hosting: Hosting) -> None:
    banner = gr.Markdown(engine.status_text(for_visitors=hosting.shared), elem_id="model-status")
    gr.Markdown(hosting.mode.banner(), elem_id="hosting-mode")
    queue_line = gr.Markdown("", elem_id="queue-line")
    with gr.Row():
        demo_button = gr.Button(
            "Use the tiny random demo model", variant="primary", size="sm", visible=False, elem_id="demo-model-btn"
        )
    timer = gr.Timer(STATUS_POLL_S, active=True)
    queue_timer = gr.Timer(QUEUE_POLL_S, active=True)

    def use_demo_model(request: gr.Request) -> tuple:
        hosting.require_admin(request, "Loading the demo model")
        try:
            engine.load(TINY_MODEL)
        except (CheckpointError, OSError, ValueError) as error:
            raise user_error(error) from None
        return _status_outputs(engine, hosting)

    def queue_status(request: gr.Request) -> str:
        return hosting.queue.line_for(getattr(request, "session_hash", None), GPU_QUEUE)

    outputs = [banner, demo_button, timer]
    # Polling never takes a queue slot (queue=False): a full GPU queue must not refuse or delay the page's status.
    timer.tick(
        lambda: _status_outputs(engine, hosting),
        None,
        outputs,
        api_visibility="private",
        show_progress="hidden",
        queue=False,
    )
    queue_timer.tick(queue_status, None, queue_line, api_visibility="private", show_progress="hidden", queue=False)
    demo_button.click(
        use_demo_model, None, outputs, api_name="load_demo_model", concurrency_id=GPU_QUEUE, concurrency_limit=1
    )

    def model_status() -> str:
        """What is loaded, or why nothing is (in shared mode without server paths)."""
        return engine.status_text(for_visitors=hosting.shared)

    gr.api(model_status, api_name="model_status", queue=False)


def _remember_anonymous_workspace(hosting: Hosting, demo: gr.Blocks) -> None:
    """Shared mode without a login: the browser keeps its workspace id (signed by the server) in localStorage, so a
    reload finds the same gallery and runs; a forged or foreign id is replaced, never trusted."""
    if not hosting.shared:
        return
    browser_id = gr.BrowserState(None, storage_key=BROWSER_ID_KEY, secret=hosting.workspaces.browser_storage_secret())

    def adopt(token, request: gr.Request):
        if getattr(request, "username", None):
            return gr.skip()  # a login names the workspace
        return hosting.workspaces.adopt(getattr(request, "session_hash", None), token)

    demo.load(adopt, [browser_id], [browser_id], api_visibility="private", queue=False, show_progress="hidden")


def build_ui(engine: LensEngine, settings: AppSettings, hosting: Hosting | None = None) -> gr.Blocks:
    """The whole app as a `gr.Blocks` (not launched)."""
    hosting = hosting or Hosting.from_settings(settings)
    with gr.Blocks(title="Lens studio", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# Lens studio\nText to image with Microsoft's Lens.", elem_id="title")
        _build_status_banner(engine, hosting)
        _remember_anonymous_workspace(hosting, demo)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                generate_tab = build_generate_tab(engine, settings, hosting)
            with gr.Tab("Gallery", id="gallery") as gallery_tab:
                build_gallery_tab(engine, generate_tab, tabs, gallery_tab, hosting)
            with gr.Tab("Recaption", id="recaption"):
                build_recaption_tab(settings.output_dir / "recaption", hosting)
            with gr.Tab("Train", id="train"):
                build_train_tab(settings.output_dir / "training", engine, hosting, generate_tab, settings.train_base)
    hosting.queue.attach(demo)
    enforce_input_types(demo)
    return demo


def queue_options(settings: AppSettings, hosting: Hosting) -> dict:
    """Keyword arguments for `demo.queue`. Shared mode closes the direct REST routes (`/run/<api_name>`) of queued
    events, which would otherwise skip the queue, its size limit and the GPU's concurrency group."""
    return {"max_size": settings.queue_size, "api_open": not hosting.shared}


def launch_options(settings: AppSettings, hosting: Hosting | None = None) -> dict:
    """Keyword arguments for `demo.launch`."""
    hosting = hosting or Hosting.from_settings(settings)
    options = {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "auth": settings.auth or None,
        "css_paths": [ASSETS / "style.css"],
        "theme": gr.themes.Soft(primary_hue="indigo"),
        "max_file_size": hosting.upload_limits.max_total_bytes,
        "show_error": False,  # only gr.Error messages reach the page: no stack traces or server paths
        # Gradio's run history can write visitors' runs to a Hub bucket with the host's own token: not when shared.
        "run_history": not hosting.shared,
    }
    if not hosting.shared:
        # Personal mode: the gallery folder may be linked directly. Shared mode serves images only through the
        # events that return them to their owner (Gradio's temporary copies, removed after an hour).
        images = settings.output_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        options["allowed_paths"] = [str(images.resolve())]
    if settings.auth:
        options["app_kwargs"] = {"middleware": [Middleware(LoginThrottleMiddleware, throttle=LoginThrottle())]}
    return options
