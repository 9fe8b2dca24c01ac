"""The Generate tab: prompt, variant presets, sizes, seed, batches, memory mode, LoRAs, the prompt rewriter, live
progress with latent previews, cancel, and restoring settings from a dropped PNG.

Handlers receive widget values by component (Gradio's dict inputs), build a typed `GenerationRequest`, and call the
engine; they never touch the pipeline. GPU events share one `concurrency_id` with a limit of 1. Images go into the
caller's workspace (`Hosting.workspace`); on a shared server only admins may change the model for everyone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.access import Hosting
from app.serving import served_copy
from app.session import SessionState, gpu_task
from app.settings import AppSettings
from app.uploads import discard_temporary_upload
from lens_core.engine import (
    MAX_BATCH_COUNT,
    MAX_BATCH_SIZE,
    MAX_GUIDANCE,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    MAX_STEPS,
    MIN_IMAGE_SIDE,
    EngineNotReady,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    LensEngine,
    ProgressEvent,
    estimate_gpu_seconds,
    list_loras,
)
from lens_core.memory import MEMORY_MODES
from lens_core.metadata import ImageSettings, read_settings
from lens_core.presets import RESOLUTIONS, VARIANTS, get_variant
from lens_core.rewriter import RewriterError

GPU_QUEUE = "gpu"  # the one concurrency group of every event that runs the model
ASPECT_CUSTOM = "Custom size"
LORA_SLOTS = 3
NO_LORA = "(none)"
SEED_RANDOM, SEED_FIXED = "Random", "Fixed"
DEMO_SIZE = 256  # the tiny demo model's default size: its images are noise, so there is no point waiting for more


def aspect_presets() -> dict[str, tuple[int, int]]:
    """Dropdown label -> (width, height) for the 2 x 9 table of LENS_SPEC section 6."""
    return {f"{ratio}  ·  {w}x{h}": (w, h) for base in RESOLUTIONS for ratio, (w, h) in RESOLUTIONS[base].items()}


def aspect_for_size(width: int, height: int) -> str:
    """The preset label of a size, or the custom choice."""
    return next((label for label, size in aspect_presets().items() if size == (width, height)), ASPECT_CUSTOM)


def example_prompts() -> list[str]:
    """One example prompt per line of assets/example_prompts.txt."""
    text = (Path(__file__).resolve().parent.parent / "assets" / "example_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def as_int(name: str, value, allow_none: bool = False) -> int | None:
    """An integer from a widget or API value; a fractional or non-numeric value is an error, not rounded."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    return int(value)


def as_number(name: str, value, allow_none: bool = False) -> float | None:
    """A finite number from a widget or API value; anything else (text, true/false, NaN) is an error."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    return float(value)


def as_text(name: str, value, allow_none: bool = True) -> str:
    """Text from an API value (None is empty text); anything else is an error, not stringified."""
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {value!r}.")
    return value


@dataclass
class JobPlace:
    """Where one job runs for whom: the caller's workspace, whether they may reload the model, and how to tell that
    their client went away (checked at every step)."""

    workspace: Path | None = None
    allow_model_reload: bool = True
    still_wanted: Callable[[], bool] = lambda: True

    def engine_options(self) -> dict:
        return {"workspace": self.workspace, "allow_model_reload": self.allow_model_reload}


def stream_generation(
    engine: LensEngine, request: GenerationRequest, cancel: threading.Event, place: JobPlace | None = None
) -> Iterator:
    """Run `engine.generate` in a worker thread; yield each `ProgressEvent`, then the `GenerationResult`.

    If the consumer stops early, or `place.still_wanted()` turns False (the browser closed), the job is cancelled at
    its next step."""
    place = place or JobPlace()
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def on_progress(event: ProgressEvent) -> None:
        events.put(event)
        if not place.still_wanted():
            cancel.set()

    def work() -> None:
        try:
            outcome["result"] = engine.generate(
                request, on_progress=on_progress, cancel_event=cancel, **place.engine_options()
            )
        except BaseException as error:  # noqa: BLE001 (handed to the consumer thread below)
            outcome["error"] = error
        finally:
            events.put(None)

    worker = threading.Thread(target=work, name="lens-generate", daemon=True)
    worker.start()
    try:
        while (event := events.get()) is not None:
            yield event
    finally:
        if worker.is_alive():
            cancel.set()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["result"]


def result_summary(result: GenerationResult) -> dict:
    """The settings a job used, as JSON for the page and the API."""
    return {
        "seed": result.seed,
        "elapsed_s": round(result.elapsed_s, 3),
        "files": [path.name for path in result.paths],
        "images": [dataclasses.asdict(settings) for settings in result.settings],
    }


def user_error(error: Exception) -> gr.Error:
    """A `gr.Error` for mistakes the user can fix (bad values, missing model, rewriter failures)."""
    return gr.Error(str(error), title="Cannot do that", print_exception=False)


@dataclass
class GenerateTab:
    """The tab's components, so other tabs (the gallery) can send settings to it."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    variant: gr.Radio
    aspect: gr.Dropdown
    width: gr.Slider
    height: gr.Slider
    steps: gr.Slider
    guidance: gr.Slider
    seed_mode: gr.Radio
    seed: gr.Number
    batch_count: gr.Slider
    batch_size: gr.Slider
    memory_mode: gr.Dropdown
    lora_names: list
    lora_weights: list
    lora_panel: gr.Accordion  # opened when another tab (Train) selects a LoRA, so the selection is seen
    rewriter_backend: gr.Radio
    rewritten: gr.Textbox
    use_rewritten: gr.Checkbox
    restore_file: gr.File
    restore_message: gr.Markdown
    preview: gr.Image
    gallery: gr.Gallery
    status: gr.Markdown
    seed_used: gr.Number
    settings_json: gr.JSON
    state: gr.State

    def restore_outputs(self) -> list:
        """Components `restore_updates` fills, in a fixed set (handlers return dicts keyed by component)."""
        return [
            self.prompt,
            self.negative_prompt,
            self.variant,
            self.aspect,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.seed_mode,
            self.seed,
            self.rewritten,
            self.use_rewritten,
            self.status,
        ]

    def restore_updates(self, settings: ImageSettings, source: str) -> dict:
        """Widget values that reproduce `settings` (the prompt that was encoded, not the pre-rewrite one). The values
        are checked first by `/generate`'s rules, so a file with impossible settings raises ValueError instead."""
        GenerationRequest.from_image_settings(settings)
        preset = get_variant(settings.variant) if settings.variant else VARIANTS["Lens"]
        return {
            self.prompt: settings.prompt,
            self.negative_prompt: gr.update(value=settings.negative_prompt, visible=preset.guidance_has_effect),
            self.variant: preset.name,
            self.aspect: aspect_for_size(settings.width, settings.height),
            self.width: settings.width,
            self.height: settings.height,
            self.steps: settings.num_inference_steps,
            self.guidance: gr.update(value=settings.guidance_scale, visible=preset.guidance_has_effect),
            self.seed_mode: SEED_FIXED,
            self.seed: settings.seed,
            self.rewritten: "",
            self.use_rewritten: False,
            self.status: f"Restored the settings of {source} (seed {settings.seed}).",
        }

    def request_from(self, values: dict) -> GenerationRequest:
        """A validated request from the widget values (raises ValueError naming the bad value)."""
        prompt, original = values[self.prompt], None
        if values[self.use_rewritten] and values[self.rewritten].strip():
            prompt, original = values[self.rewritten].strip(), values[self.prompt]
        random_seed = values[self.seed_mode] == SEED_RANDOM or values[self.seed] is None
        loras = [
            (name, float(weight))
            for name, weight in zip(
                (values[c] for c in self.lora_names), (values[c] for c in self.lora_weights), strict=True
            )
            if name and name != NO_LORA
        ]
        return GenerationRequest(
            prompt=prompt,
            negative_prompt=values[self.negative_prompt] or "",
            variant=values[self.variant],
            width=as_int("width", values[self.width]),
            height=as_int("height", values[self.height]),
            num_inference_steps=as_int("steps", values[self.steps]),
            guidance_scale=as_number("guidance", values[self.guidance]),
            seed=None if random_seed else as_int("seed", values[self.seed]),
            batch_count=as_int("batch count", values[self.batch_count]),
            batch_size=as_int("batch size", values[self.batch_size]),
            loras=loras,
            original_prompt=original,
            preview_every=max(1, as_int("steps", values[self.steps]) // 5),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------------


def _memory_choices() -> list[tuple[str, str]]:
    modes = [(f"{name}: {mode.description} ({mode.target})", name) for name, mode in MEMORY_MODES.items()]
    return [("auto: the largest mode that fits the free GPU memory", "auto"), *modes]


def _lora_choices(engine: LensEngine, workspace: Path | None = None) -> list[str]:
    return [NO_LORA, *list_loras(engine.config.output_dir, workspace)]


def _rewriter_choices(hosting: Hosting) -> list[tuple[str, str]]:
    labels = {
        "openai": "Endpoint: {model} at {base_url} (key from ${key})",
        "local": "Local GPT-OSS from the checkpoint (needs the memory of the full 20B encoder, about 13 GB more)",
    }
    choices = []
    for name, backend in hosting.backends.rewriter.items():
        if backend.kind == "local":
            label = labels["local"] if name == "local" else f"{name}: {labels['local']}"
        else:
            label = labels["openai"].format(
                model=backend.model, base_url=backend.base_url, key=backend.api_key_env or "none"
            )
            label = label if name == "openai" else f"{name}: {label}"
        choices.append((label, name))
    return choices


def select_loras(tab: GenerateTab, engine: LensEngine, workspace: Path | None = None) -> dict:
    """Updates that show `workspace`'s active LoRA set in the tab's LoRA slots (the rest cleared) with the panel open:
    what another tab (Train's "Load in Generate tab") returns after changing the set."""
    choices, active = _lora_choices(engine, workspace), engine.active_loras(workspace)[: len(tab.lora_names)]
    updates: dict = {tab.lora_panel: gr.update(open=True)}
    for slot, (name_box, weight_box) in enumerate(zip(tab.lora_names, tab.lora_weights, strict=True)):
        name, weight = active[slot] if slot < len(active) else (NO_LORA, 1.0)
        updates[name_box] = gr.update(choices=choices, value=name)
        updates[weight_box] = weight
    return updates


def _build_prompt_inputs(hosting: Hosting, preset) -> dict:
    parts = {}
    parts["prompt"] = gr.Textbox(
        label="Prompt", lines=3, placeholder="A short idea or a dense description...", elem_id="prompt"
    )
    parts["negative_prompt"] = gr.Textbox(
        label="Negative prompt", lines=1, visible=preset.guidance_has_effect, elem_id="negative-prompt"
    )
    with gr.Row():
        parts["generate_btn"] = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
        parts["cancel_btn"] = gr.Button("Cancel my job", variant="stop", elem_id="cancel-btn", scale=1)
    with gr.Accordion("Prompt rewriter: see the expanded prompt before spending GPU time", open=False):
        choices = _rewriter_choices(hosting)
        parts["rewriter_backend"] = gr.Radio(
            choices, value=choices[0][1] if choices else None, label="Backend", elem_id="rewriter-backend"
        )
        parts["rewrite_btn"] = gr.Button("Rewrite prompt", elem_id="rewrite-btn")
        parts["rewritten"] = gr.Textbox(label="Rewritten prompt (edit freely)", lines=4, elem_id="rewritten")
        parts["use_rewritten"] = gr.Checkbox(label="Generate with the rewritten prompt (the original is saved too)")
    return parts


def _build_sampling_inputs(engine: LensEngine, preset) -> dict:
    parts = {}
    size = DEMO_SIZE if engine.is_demo else 1024
    parts["variant"] = gr.Radio(
        list(VARIANTS),
        value=preset.name,
        label="Variant",
        elem_id="variant",
        info="Lens: quality; Turbo: 4 steps, no guidance; Base: for fine-tuning",
    )
    parts["aspect"] = gr.Dropdown(
        [*aspect_presets(), ASPECT_CUSTOM], value=aspect_for_size(size, size), label="Aspect (W:H)"
    )
    with gr.Row():
        parts["width"] = gr.Slider(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE, value=size, step=16, label="Width")
        parts["height"] = gr.Slider(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE, value=size, step=16, label="Height")
    with gr.Row():
        parts["steps"] = gr.Slider(1, MAX_STEPS, value=preset.num_inference_steps, step=1, label="Steps")
        parts["guidance"] = gr.Slider(
            0, MAX_GUIDANCE, value=preset.guidance_scale, step=0.5, label="Guidance", visible=preset.guidance_has_effect
        )
    with gr.Row():
        parts["seed_mode"] = gr.Radio([SEED_RANDOM, SEED_FIXED], value=SEED_RANDOM, label="Seed")
        parts["seed"] = gr.Number(
            value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed value", elem_id="seed-input"
        )
    with gr.Row():
        parts["batch_count"] = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count")
        parts["batch_size"] = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size")
    return parts


def _build_model_inputs(engine: LensEngine, hosting: Hosting) -> dict:
    parts = {"lora_names": [], "lora_weights": []}
    with gr.Accordion("Memory mode and LoRAs", open=False) as parts["lora_panel"]:
        admin_note = " (admins only on this shared server: it reloads the model for everyone)" if hosting.shared else ""
        parts["memory_mode"] = gr.Dropdown(
            _memory_choices(), value=engine.config.memory_mode, label=f"Memory mode{admin_note}"
        )
        where = (
            "the server's `loras/` folder and your finished training runs"
            if hosting.shared
            else ("`*.safetensors` in `<output-dir>/loras/` and finished training runs")
        )
        gr.Markdown(f"LoRAs: {where}.")
        # Shared: only the server's LoRAs until the visitor refreshes the list (their runs are theirs alone).
        choices = _lora_choices(engine)
        if hosting.shared:
            choices = [name for name in choices if not name.startswith("training/")]
        for slot in range(LORA_SLOTS):
            with gr.Row():
                parts["lora_names"].append(gr.Dropdown(choices, value=NO_LORA, label=f"LoRA {slot + 1}"))
                parts["lora_weights"].append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight"))
        parts["refresh_loras"] = gr.Button("Refresh LoRA list", size="sm")
    parts["restore_file"] = gr.File(
        label="Drop a PNG here to restore its settings (ours or A1111-style)",
        file_types=[".png"],
        type="filepath",
        elem_id="restore-file",
    )
    parts["restore_message"] = gr.Markdown(elem_id="restore-message")
    return parts


def _build_outputs() -> dict:
    parts = {}
    parts["status"] = gr.Markdown("Ready.", elem_id="job-status")
    with gr.Row():
        parts["seed_used"] = gr.Number(
            value=None, label="Seed used", precision=0, interactive=False, elem_id="seed-used", scale=2
        )
        parts["reuse_seed"] = gr.Button("Reuse this seed", elem_id="reuse-seed-btn", scale=1)
    with gr.Row(equal_height=False):
        parts["gallery"] = gr.Gallery(
            label="Images", columns=2, height=400, elem_id="result-gallery", scale=3, object_fit="contain"
        )
        parts["preview"] = gr.Image(label="Live preview", interactive=False, height=200, elem_id="preview", scale=1)
    with gr.Accordion("Settings used (embedded in every PNG)", open=False):
        parts["settings_json"] = gr.JSON(label="Settings used", elem_id="settings-used")
    return parts


def build_generate_tab(engine: LensEngine, settings: AppSettings, hosting: Hosting | None = None) -> GenerateTab:
    """Lay out the Generate tab, wire its events and its API endpoints; return its components."""
    hosting = hosting or Hosting.personal(Path(settings.output_dir), settings)
    preset = engine.variant if engine.ready else VARIANTS["Lens-Turbo"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            parts = _build_prompt_inputs(hosting, preset)
            parts.update(_build_sampling_inputs(engine, preset))
            parts.update(_build_model_inputs(engine, hosting))
            gr.Examples([[line] for line in example_prompts()], inputs=[parts["prompt"]], label="Example prompts")
        with gr.Column(scale=6):
            parts.update(_build_outputs())
    buttons = {
        name: parts.pop(name) for name in ("generate_btn", "cancel_btn", "rewrite_btn", "refresh_loras", "reuse_seed")
    }
    tab = GenerateTab(state=gr.State(SessionState()), **parts)
    _wire_form_events(tab, engine, hosting, buttons)
    _wire_restore(tab)
    _wire_generation(tab, engine, hosting, buttons)
    _wire_rewriter(tab, engine, hosting, buttons)
    _build_api(tab, engine, hosting)
    return tab


# ---------------------------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------------------------


def _wire_form_events(tab: GenerateTab, engine: LensEngine, hosting: Hosting, buttons: dict) -> None:
    # Instant form events skip the queue (queue=False) so the page stays responsive behind a long GPU queue.
    def variant_defaults(variant: str) -> dict:
        preset = get_variant(variant)
        visible = preset.guidance_has_effect  # Turbo: guidance and negative prompt do nothing, so hide them
        return {
            tab.steps: preset.num_inference_steps,
            tab.guidance: gr.update(value=preset.guidance_scale, visible=visible),
            tab.negative_prompt: gr.update(visible=visible),
        }

    def aspect_size(label: str) -> dict:
        if label == ASPECT_CUSTOM:
            return {}
        width, height = aspect_presets()[label]
        return {tab.width: width, tab.height: height}

    def reuse_seed(seed) -> dict:
        if seed is None:
            raise gr.Error("No image generated yet: there is no seed to reuse.")
        try:
            return {tab.seed_mode: SEED_FIXED, tab.seed: as_int("seed", seed)}
        except ValueError as error:
            raise user_error(error) from None

    def refresh_loras(request: gr.Request) -> list:
        choices = _lora_choices(engine, hosting.workspace(request).root)
        return [gr.update(choices=choices) for _ in tab.lora_names]

    def set_memory_mode(mode: str, request: gr.Request) -> str:
        hosting.require_admin(request, "Changing the memory mode")
        try:
            return f"Memory mode: **{engine.set_memory_mode(mode)}**."
        except (ValueError, EngineNotReady) as error:
            raise user_error(error) from None

    tab.variant.input(
        variant_defaults,
        [tab.variant],
        [tab.steps, tab.guidance, tab.negative_prompt],
        api_name="variant_defaults",
        queue=False,
    )
    tab.aspect.input(aspect_size, [tab.aspect], [tab.width, tab.height], api_name="aspect_size", queue=False)
    for slider, name in ((tab.width, "width"), (tab.height, "height")):
        slider.input(aspect_for_size, [tab.width, tab.height], [tab.aspect], api_name=f"{name}_to_aspect", queue=False)
    buttons["reuse_seed"].click(
        reuse_seed, [tab.seed_used], [tab.seed_mode, tab.seed], api_name="reuse_seed", queue=False
    )
    buttons["refresh_loras"].click(refresh_loras, None, tab.lora_names, api_name="list_loras", queue=False)
    tab.memory_mode.input(
        set_memory_mode,
        [tab.memory_mode],
        [tab.status],
        api_name="set_memory_mode",
        concurrency_id=GPU_QUEUE,
        concurrency_limit=1,
    )


def _read_dropped_png(upload) -> tuple[ImageSettings, str]:
    """The settings of an uploaded PNG (its text chunks only) and its name; Gradio's temporary copy is removed."""
    from gradio.utils import get_upload_folder

    path = upload.get("path") if isinstance(upload, dict) else upload
    if not isinstance(path, str) or not path:
        raise ValueError("Drop a PNG file (ours or A1111-style) to restore its settings.")
    name = (upload.get("orig_name") if isinstance(upload, dict) else None) or Path(path).name
    try:
        return read_settings(path), Path(str(name)).name
    finally:
        discard_temporary_upload(path, get_upload_folder())


def _wire_restore(tab: GenerateTab) -> None:
    """Dropping a PNG fills the form; a bad file leaves the form as it was and says why next to the drop zone.
    `/restore_settings` does the same for API callers and raises the error instead."""

    def restore(upload) -> dict:
        if not upload:
            return {tab.restore_message: ""}
        try:
            settings, name = _read_dropped_png(upload)
            updates = tab.restore_updates(settings, name)
        except ValueError as error:  # the form keeps its values; the reason shows next to the drop zone
            return {tab.restore_message: f"**Cannot restore settings from this file:** {error}", tab.restore_file: None}
        return {**updates, tab.restore_message: "", tab.restore_file: None}

    def restore_api(upload) -> dict:
        try:
            settings, name = _read_dropped_png(upload)
            return tab.restore_updates(settings, name)
        except ValueError as error:
            raise gr.Error(f"Cannot restore settings from this file: {error}", title="Not a Lens/A1111 PNG") from None

    outputs = [*tab.restore_outputs(), tab.restore_message, tab.restore_file]
    tab.restore_file.upload(restore, [tab.restore_file], outputs, api_visibility="private", preprocess=False)
    with gr.Column(visible=False):
        api_file = gr.File(file_types=[".png"], type="filepath", label="PNG with settings")
        trigger = gr.Button()
    trigger.click(restore_api, [api_file], tab.restore_outputs(), api_name="restore_settings", preprocess=False)


def _progress_update(tab: GenerateTab, event: ProgressEvent, progress: gr.Progress) -> dict:
    eta = f"about {event.eta_s:.0f} s left" if event.step < event.total_steps else "decoding..."
    text = f"Step {event.step} / {event.total_steps}, {eta}"
    progress((event.step, event.total_steps), desc=text)
    update = {tab.status: text}
    if event.preview is not None:
        update[tab.preview] = event.preview
    return update


def _final_update(tab: GenerateTab, result: GenerationResult, state: SessionState) -> dict:
    state.last_seed = result.seed
    return {
        tab.gallery: [
            (served_copy(path), f"seed {s.seed}") for path, s in zip(result.paths, result.settings, strict=True)
        ],
        tab.seed_used: result.seed,
        tab.settings_json: result_summary(result),
        tab.status: f"Saved {len(result.paths)} image(s) in {result.elapsed_s:.1f} s (PNG with settings, in the Gallery).",
    }


def _cancelled_update(tab: GenerateTab, error: GenerationCancelled) -> dict:
    update = {tab.status: f"Cancelled. {error}"}
    if error.saved:
        update[tab.gallery] = [(served_copy(path), path.stem) for path in error.saved]
    return update


def _start_job(state: SessionState) -> SessionState:
    # Runs at once (not queued), so a Cancel while the job waits in the queue is not lost.
    state.new_job()
    return state


def job_place(hosting: Hosting, request: gr.Request | None) -> JobPlace:
    """The caller's workspace and rights, and a check that their client is still connected. A workspace at its
    quota (shared mode) is refused here, before any GPU work."""
    event_id = hosting.queue.current_event_id()
    workspace = hosting.workspace(request)
    hosting.require_room(workspace, "a new image")
    return JobPlace(
        workspace=workspace.root,
        allow_model_reload=hosting.is_admin(request),
        still_wanted=lambda: hosting.queue.still_wanted(event_id),
    )


def _wire_generation(tab: GenerateTab, engine: LensEngine, hosting: Hosting, buttons: dict) -> None:
    inputs = {
        tab.prompt,
        tab.negative_prompt,
        tab.variant,
        tab.width,
        tab.height,
        tab.steps,
        tab.guidance,
        tab.seed_mode,
        tab.seed,
        tab.batch_count,
        tab.batch_size,
        tab.rewritten,
        tab.use_rewritten,
        tab.state,
        *tab.lora_names,
        *tab.lora_weights,
    }
    outputs = [tab.status, tab.preview, tab.gallery, tab.seed_used, tab.settings_json]

    def gpu_seconds(values: dict, *args, **kwargs) -> int:
        try:
            return _gpu_seconds(tab.request_from(values))
        except ValueError:
            return 30  # the handler will refuse the request at once

    @gpu_task(gpu_seconds)
    def generate(values: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio's progress injection)
        try:
            job = tab.request_from(values)
        except ValueError as error:
            raise user_error(error) from None
        state: SessionState = values[tab.state]
        place = job_place(hosting, request)
        yield {tab.status: "Waiting for the GPU..." if engine.busy else "Starting..."}
        state.running = True
        try:
            for item in stream_generation(engine, job, state.cancel, place):
                if isinstance(item, ProgressEvent):
                    yield _progress_update(tab, item, progress)
                else:
                    yield _final_update(tab, item, state)
        except GenerationCancelled as error:
            yield _cancelled_update(tab, error)
        except (ValueError, EngineNotReady, OSError) as error:
            raise user_error(error) from None
        finally:
            state.running = False

    async def cancel(state: SessionState, request: gr.Request) -> str:
        # Only this session's jobs: the waiting ones leave the queue, the running one stops at its next step.
        dropped = await hosting.queue.drop_waiting(
            getattr(request, "session_hash", None), GPU_QUEUE, "Cancelled while waiting for the GPU; nothing was saved."
        )
        running = state.running
        state.cancel.set()
        parts = ["Cancelling your running job at its next step" if running else ""]
        if dropped:
            parts.append(f"removed {dropped} waiting job{'s' if dropped != 1 else ''} from the queue")
        text = "; ".join(part for part in parts if part)
        return (text[0].upper() + text[1:] + ".") if text else "You have no job running or waiting."

    start = buttons["generate_btn"].click(_start_job, [tab.state], [tab.state], queue=False, api_visibility="private")
    start.then(generate, inputs, outputs, api_name="generate_stream", concurrency_id=GPU_QUEUE, concurrency_limit=1)
    buttons["cancel_btn"].click(cancel, [tab.state], [tab.status], queue=False, api_name="cancel")


def _wire_rewriter(tab: GenerateTab, engine: LensEngine, hosting: Hosting, buttons: dict) -> None:
    def rewrite(prompt: str, backend: str) -> tuple[str, bool, str]:
        try:
            # A name among the server's backends: the URL and key never come from the caller.
            chosen = hosting.backends.rewriter_settings(backend)
            text = engine.rewrite_prompt(prompt, chosen)
        except (ValueError, RewriterError, EngineNotReady) as error:
            raise user_error(error) from None
        return text, True, "Rewritten: edit it if you like, then Generate (the original prompt is saved too)."

    buttons["rewrite_btn"].click(
        rewrite,
        [tab.prompt, tab.rewriter_backend],
        [tab.rewritten, tab.use_rewritten, tab.status],
        api_name="rewrite_prompt",
        concurrency_id="rewriter",
        concurrency_limit=2,
    )


ACTIVE_LORAS = "active"  # the /generate default: the caller's active LoRAs


def _parse_api_loras(loras) -> list[tuple[str, float]] | None:
    # "active" (the parameter left out) or null: the caller's active LoRAs, e.g. one the Train tab loaded; [] removes
    # them all.
    if loras is None or loras == ACTIVE_LORAS:
        return None
    if not loras:
        return []
    if not isinstance(loras, list):
        raise ValueError(f"loras must be a list of {{'name': ..., 'weight': ...}}, got {loras!r}.")
    parsed = []
    for item in loras:
        if isinstance(item, dict) and set(item) <= {"name", "weight"} and "name" in item:
            parsed.append((item["name"], item.get("weight", 1.0)))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            parsed.append((item[0], item[1]))
        else:
            raise ValueError(f"Each LoRA must be {{'name': ..., 'weight': ...}} or [name, weight], got {item!r}.")
    return parsed


def _gpu_seconds(request: GenerationRequest) -> int:
    """ZeroGPU reservation for a checked request (None steps / guidance: at most Base's 50 steps with guidance)."""
    steps = request.num_inference_steps or 50
    guidance = 5.0 if request.guidance_scale is None else request.guidance_scale
    return estimate_gpu_seconds(steps, request.width, request.height, request.total_images, guidance)


def api_request(
    prompt,
    negative_prompt,
    width,
    height,
    num_inference_steps,
    guidance_scale,
    seed,
    variant,
    batch_count,
    batch_size,
    loras,
) -> GenerationRequest:
    """A checked request from `/generate`'s raw arguments: -1 (or None) means a random seed and the variant's default
    steps / guidance; a value of the wrong type is refused with its name, never converted."""
    seed = as_int("seed", seed, allow_none=True)
    steps = as_int("num_inference_steps", num_inference_steps, allow_none=True)
    guidance = as_number("guidance_scale", guidance_scale, allow_none=True)
    return GenerationRequest(
        prompt=as_text("prompt", prompt, allow_none=False),
        negative_prompt=as_text("negative_prompt", negative_prompt),
        variant=as_text("variant", variant) or "Lens-Turbo",
        width=as_int("width", width),
        height=as_int("height", height),
        num_inference_steps=None if steps is None or steps < 0 else steps,
        guidance_scale=None if guidance is None or guidance < 0 else guidance,
        seed=None if seed is None or seed < 0 else seed,
        batch_count=as_int("batch_count", batch_count),
        batch_size=as_int("batch_size", batch_size),
        loras=_parse_api_loras(loras),
    )


def _build_api(tab: GenerateTab, engine: LensEngine, hosting: Hosting) -> None:
    """`/generate`: named parameters, returns the saved PNG files and the settings used (for gradio_client).

    `seed`, `num_inference_steps` and `guidance_scale` take -1 for "random" / "the variant's default"; `loras` left
    out ("active") uses the caller's active LoRAs (the Generate tab's selection), [] removes them. The job stops at
    its next step when the caller cancels (`/cancel`, or gradio_client's `Job.cancel()`) or disconnects."""
    with gr.Column(visible=False):
        fields = [
            gr.Textbox(value="", label="prompt"),
            gr.Textbox(value="", label="negative_prompt"),
            gr.Number(value=1024, label="width"),
            gr.Number(value=1024, label="height"),
            gr.Number(value=-1, label="num_inference_steps"),
            gr.Number(value=-1, label="guidance_scale"),
            gr.Number(value=-1, label="seed"),
            gr.Textbox(value="Lens-Turbo", label="variant"),
            gr.Number(value=1, label="batch_count"),
            gr.Number(value=1, label="batch_size"),
            gr.JSON(value=json.dumps(ACTIVE_LORAS), label="loras"),  # a JSON component reads a string as JSON
        ]
        files, info = gr.File(file_count="multiple"), gr.JSON()
        trigger = gr.Button()

    @gpu_task(lambda job, *args, **kwargs: _gpu_seconds(job))
    def run_on_gpu(job: GenerationRequest, cancel: threading.Event, place: JobPlace, progress) -> GenerationResult:
        def on_progress(event: ProgressEvent) -> None:
            progress((event.step, event.total_steps), desc=f"Step {event.step} / {event.total_steps}")
            if not place.still_wanted():
                cancel.set()  # the client went away: stop at the next step

        return engine.generate(job, on_progress=on_progress, cancel_event=cancel, **place.engine_options())

    async def generate(
        prompt,
        negative_prompt,
        width,
        height,
        num_inference_steps,
        guidance_scale,
        seed,
        variant,
        batch_count,
        batch_size,
        loras,
        state: SessionState,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 (Gradio's progress injection)
    ):
        try:
            job = api_request(
                prompt, negative_prompt, width, height, num_inference_steps, guidance_scale, seed, variant,
                batch_count, batch_size, loras,
            )  # fmt: skip
        except ValueError as error:
            raise user_error(error) from None
        cancel, place = state.new_job(), job_place(hosting, request)
        state.running = True
        try:
            result = await asyncio.to_thread(run_on_gpu, job, cancel, place, progress)
        except asyncio.CancelledError:
            cancel.set()  # gradio_client's Job.cancel() cancels this task: the worker stops at its next step
            raise
        except GenerationCancelled as error:
            raise gr.Error(f"Cancelled: {error}", title="Cancelled") from None
        except (ValueError, EngineNotReady, OSError) as error:
            raise user_error(error) from None
        finally:
            state.running = False
        return [served_copy(path) for path in result.paths], result_summary(result)

    trigger.click(
        generate,
        [*fields, tab.state],
        [files, info],
        api_name="generate",
        concurrency_id=GPU_QUEUE,
        concurrency_limit=1,
        preprocess=False,
    )
