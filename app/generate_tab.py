"""The Generate tab: prompt, variant presets, sizes, seed, batches, memory mode, LoRAs, the prompt rewriter, live
progress with latent previews, cancel, and restoring settings from a dropped PNG.

Handlers receive widget values by component (Gradio's dict inputs), build a typed `GenerationRequest`, and call the
engine; they never touch the pipeline. GPU events share one `concurrency_id` with a limit of 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.session import SessionState, gpu_task
from app.settings import AppSettings
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


def stream_generation(engine: LensEngine, request: GenerationRequest, cancel: threading.Event) -> Iterator:
    """Run `engine.generate` in a worker thread; yield each `ProgressEvent`, then the `GenerationResult`.

    If the consumer stops early (the browser closed), the job is cancelled at its next step."""
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["result"] = engine.generate(request, on_progress=events.put, cancel_event=cancel)
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
    return gr.Error(str(error), title="Cannot do that")


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
        """Widget values that reproduce `settings` (the prompt that was encoded, not the pre-rewrite one)."""
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
            guidance_scale=float(values[self.guidance]),
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


def _lora_choices(engine: LensEngine) -> list[str]:
    return [NO_LORA, *list_loras(engine.config.output_dir)]


def select_loras(tab: GenerateTab, engine: LensEngine) -> dict:
    """Updates that show the engine's active LoRA set in the tab's LoRA slots (the rest cleared) with the panel open:
    what another tab (Train's "Load in Generate tab") returns after changing the set."""
    choices, active = _lora_choices(engine), list(engine.loras)[: len(tab.lora_names)]
    updates: dict = {tab.lora_panel: gr.update(open=True)}
    for slot, (name_box, weight_box) in enumerate(zip(tab.lora_names, tab.lora_weights, strict=True)):
        name, weight = active[slot] if slot < len(active) else (NO_LORA, 1.0)
        updates[name_box] = gr.update(choices=choices, value=name)
        updates[weight_box] = weight
    return updates


def _build_prompt_inputs(settings: AppSettings, preset) -> dict:
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
        rewriter = settings.rewriter
        parts["rewriter_backend"] = gr.Radio(
            [
                (
                    f"Endpoint: {rewriter.model} at {rewriter.base_url} (key from ${rewriter.api_key_env or 'none'})",
                    "openai",
                ),
                (
                    "Local GPT-OSS from the checkpoint (needs the memory of the full 20B encoder, about 13 GB more)",
                    "local",
                ),
            ],
            value="openai",
            label="Backend",
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


def _build_model_inputs(engine: LensEngine) -> dict:
    parts = {"lora_names": [], "lora_weights": []}
    with gr.Accordion("Memory mode and LoRAs", open=False) as parts["lora_panel"]:
        parts["memory_mode"] = gr.Dropdown(_memory_choices(), value=engine.config.memory_mode, label="Memory mode")
        gr.Markdown("LoRAs: `*.safetensors` in `<output-dir>/loras/` and finished training runs.")
        for slot in range(LORA_SLOTS):
            with gr.Row():
                parts["lora_names"].append(gr.Dropdown(_lora_choices(engine), value=NO_LORA, label=f"LoRA {slot + 1}"))
                parts["lora_weights"].append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight"))
        parts["refresh_loras"] = gr.Button("Refresh LoRA list", size="sm")
    parts["restore_file"] = gr.File(
        label="Drop a PNG here to restore its settings (ours or A1111-style)",
        file_types=[".png"],
        type="filepath",
        elem_id="restore-file",
    )
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


def build_generate_tab(engine: LensEngine, settings: AppSettings) -> GenerateTab:
    """Lay out the Generate tab, wire its events and its API endpoints; return its components."""
    preset = engine.variant if engine.ready else VARIANTS["Lens-Turbo"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            parts = _build_prompt_inputs(settings, preset)
            parts.update(_build_sampling_inputs(engine, preset))
            parts.update(_build_model_inputs(engine))
            gr.Examples([[line] for line in example_prompts()], inputs=[parts["prompt"]], label="Example prompts")
        with gr.Column(scale=6):
            parts.update(_build_outputs())
    buttons = {
        name: parts.pop(name) for name in ("generate_btn", "cancel_btn", "rewrite_btn", "refresh_loras", "reuse_seed")
    }
    tab = GenerateTab(state=gr.State(SessionState()), **parts)
    _wire_form_events(tab, engine, buttons)
    _wire_generation(tab, engine, buttons)
    _wire_rewriter(tab, engine, settings, buttons)
    _build_api(tab, engine)
    return tab


# ---------------------------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------------------------


def _wire_form_events(tab: GenerateTab, engine: LensEngine, buttons: dict) -> None:
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

    def restore(path: str | None) -> dict:
        if not path:
            return {}
        try:
            return tab.restore_updates(read_settings(path), "the dropped PNG")
        except ValueError as error:
            raise gr.Error(f"Cannot restore settings from this file: {error}", title="Not a Lens/A1111 PNG") from None

    def reuse_seed(seed) -> dict:
        if seed is None:
            raise gr.Error("No image generated yet: there is no seed to reuse.")
        return {tab.seed_mode: SEED_FIXED, tab.seed: int(seed)}

    def refresh_loras() -> list:
        return [gr.update(choices=_lora_choices(engine)) for _ in tab.lora_names]

    def set_memory_mode(mode: str) -> str:
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
    tab.restore_file.upload(restore, [tab.restore_file], tab.restore_outputs(), api_name="restore_settings")
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
        tab.gallery: [(str(path), f"seed {s.seed}") for path, s in zip(result.paths, result.settings, strict=True)],
        tab.seed_used: result.seed,
        tab.settings_json: result_summary(result),
        tab.status: f"Saved {len(result.paths)} image(s) in {result.elapsed_s:.1f} s (PNG with settings, in the Gallery).",
    }


def _start_job(state: SessionState) -> SessionState:
    # Runs at once (not queued), so a Cancel while the job waits in the queue is not lost.
    state.new_job()
    return state


def _wire_generation(tab: GenerateTab, engine: LensEngine, buttons: dict) -> None:
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
            request = tab.request_from(values)
        except ValueError:
            return 30  # the handler will refuse the request at once
        return estimate_gpu_seconds(
            request.num_inference_steps, request.width, request.height, request.total_images, request.guidance_scale
        )

    @gpu_task(gpu_seconds)
    def generate(values: dict, progress=gr.Progress()):  # noqa: B008 (Gradio's progress injection)
        try:
            request = tab.request_from(values)
        except ValueError as error:
            raise user_error(error) from None
        state: SessionState = values[tab.state]
        yield {tab.status: "Waiting for the GPU..." if engine.busy else "Starting..."}
        try:
            for item in stream_generation(engine, request, state.cancel):
                if isinstance(item, ProgressEvent):
                    yield _progress_update(tab, item, progress)
                else:
                    yield _final_update(tab, item, state)
        except GenerationCancelled as error:
            yield {tab.status: f"Cancelled. {error}"}
        except (ValueError, EngineNotReady, OSError) as error:
            raise user_error(error) from None

    def cancel(state: SessionState) -> str:
        state.cancel.set()  # only this session's job: the event lives in this user's gr.State
        return "Cancelling your job at the next step..."

    start = buttons["generate_btn"].click(_start_job, [tab.state], [tab.state], queue=False, api_visibility="private")
    start.then(generate, inputs, outputs, api_name="generate_stream", concurrency_id=GPU_QUEUE, concurrency_limit=1)
    buttons["cancel_btn"].click(cancel, [tab.state], [tab.status], queue=False, api_name="cancel")


def _wire_rewriter(tab: GenerateTab, engine: LensEngine, settings: AppSettings, buttons: dict) -> None:
    def rewrite(prompt: str, backend: str) -> tuple[str, bool, str]:
        try:
            chosen = dataclasses.replace(settings.rewriter, backend=backend)
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


ACTIVE_LORAS = "active"  # the /generate default: the LoRAs active in the engine


def _parse_api_loras(loras) -> list[tuple[str, float]] | None:
    # "active" (the parameter left out) or null: the engine's active LoRAs, e.g. one the Train tab loaded; [] removes
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


def _api_gpu_seconds(
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
    *rest,
) -> int:
    """ZeroGPU reservation for a `/generate` call, from its raw (not yet validated) arguments."""
    numbers = (width, height, num_inference_steps, guidance_scale, batch_count, batch_size)
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in numbers):
        return 30  # the handler will refuse the request at once
    steps = num_inference_steps if num_inference_steps > 0 else 50  # -1: the variant's default, at most Base's 50
    guidance = guidance_scale if guidance_scale >= 0 else 5.0
    images = max(1, int(batch_count) * int(batch_size))
    return estimate_gpu_seconds(int(steps), int(width), int(height), images, guidance)


def _build_api(tab: GenerateTab, engine: LensEngine) -> None:
    """`/generate`: named parameters, returns the saved PNG files and the settings used (for gradio_client).

    `seed`, `num_inference_steps` and `guidance_scale` take -1 for "random" / "the variant's default"; `loras` left
    out ("active") uses the LoRAs active in the engine (the Generate tab's selection), [] removes them."""
    with gr.Column(visible=False):
        fields = [
            gr.Textbox(value=""),
            gr.Textbox(value=""),
            gr.Number(value=1024),
            gr.Number(value=1024),
            gr.Number(value=-1),
            gr.Number(value=-1),
            gr.Number(value=-1),
            gr.Textbox(value="Lens-Turbo"),
            gr.Number(value=1),
            gr.Number(value=1),
            gr.JSON(value=json.dumps(ACTIVE_LORAS)),  # a JSON component reads a string value as JSON text
        ]
        files, info = gr.File(file_count="multiple"), gr.JSON()
        trigger = gr.Button()

    @gpu_task(_api_gpu_seconds)
    def generate(
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
    ):
        try:
            # -1 (or None) means: a random seed, the variant's default steps / guidance.
            seed = as_int("seed", seed, allow_none=True)
            steps = as_int("num_inference_steps", num_inference_steps, allow_none=True)
            request = GenerationRequest(
                prompt=prompt,
                negative_prompt=negative_prompt or "",
                variant=variant or "Lens-Turbo",
                width=as_int("width", width),
                height=as_int("height", height),
                num_inference_steps=None if steps is None or steps < 0 else steps,
                guidance_scale=None if guidance_scale is None or guidance_scale < 0 else guidance_scale,
                seed=None if seed is None or seed < 0 else seed,
                batch_count=as_int("batch_count", batch_count),
                batch_size=as_int("batch_size", batch_size),
                loras=_parse_api_loras(loras),
            )
            result = engine.generate(request, cancel_event=state.new_job())
        except GenerationCancelled as error:
            raise gr.Error(f"Cancelled: {error}") from None
        except (ValueError, EngineNotReady, OSError) as error:
            raise user_error(error) from None
        return [str(path) for path in result.paths], result_summary(result)

    trigger.click(
        generate,
        [*fields, tab.state],
        [files, info],
        api_name="generate",
        concurrency_id=GPU_QUEUE,
        concurrency_limit=1,
    )
