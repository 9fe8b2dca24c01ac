"""The Train tab: pick a dataset and a preset, start a training process, watch it, stop / resume, use the LoRA.

The job is `python -m training.train` in its own process (the job layer of `training.jobs`, shared with the Recaption
tab); this tab only writes the config, launches, and tails `progress.jsonl`. The run folder of the session lives in
`gr.State`. The preset and step count default to what this machine can run (a CPU gets the `cpu` preset), Stop takes
effect at the next step, and "Load in Generate tab" activates the LoRA in the engine and selects it in the Generate
tab's LoRA slots, where it stays until the user changes it.

On a shared server training is off unless the server runs with `--allow-training`; then a visitor trains on one of
their uploaded datasets, the base model is the server's, runs live in their workspace, and "More settings" accepts
only keys that cannot name a file or folder (`shared_setting_keys`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from app.access import Hosting
from app.generate_tab import select_loras
from app.serving import served_copy
from app.workspace import strip_root
from lens_core.engine import EngineNotReady, list_loras, public_model_name
from lens_core.presets import TINY_MODEL, VARIANTS
from training.config import PRESET_NAMES, PRESETS, TrainConfig, parse_override
from training.jobs import Job, TrainingStatus, resume_training, start_training, training_status
from training.memory_estimate import detected_gpu_gib, preset_suggestion

logger = logging.getLogger(__name__)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Text-valued config keys that are choices or prompts, never paths. Every other text key (output_dir, model.path,
# data.path, data.cache_dir, and any added later) is refused in shared mode until it is reviewed and listed here.
SHARED_TEXT_KEYS = {
    "model.base_precision",
    "data.buckets",
    "data.trigger_word",
    "adapter.method",
    "optimizer.name",
    "optimizer.scheduler",
    "loop.mixed_precision",
}
NOT_FROM_VISITORS = {"preset", "name", "output_dir"}  # set by the tab's own widgets


def shared_setting_keys() -> set[str]:
    """The "More settings" keys a shared server's visitor may set: numbers, booleans and lists of the training config,
    and the reviewed text keys above; never a key that holds a path."""
    keys = set()

    def walk(section, prefix: str) -> None:
        hints = typing.get_type_hints(type(section))
        for item in dataclasses.fields(section):
            value, name = getattr(section, item.name), f"{prefix}{item.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{name}.")
            elif name in SHARED_TEXT_KEYS or str not in typing.get_args(hints[item.name]) + (hints[item.name],):
                keys.add(name)

    walk(TrainConfig(), "")
    return keys - NOT_FROM_VISITORS


@dataclass
class TrainRequest:
    """The tab's widgets, by name."""

    dataset: str
    model: str
    preset: str
    run_name: str
    max_steps: int
    learning_rate: float
    rank: int
    trigger_word: str
    sample_prompts: str
    extra_settings: str

    def __post_init__(self) -> None:
        # An empty text box arrives as None from API callers: it means "".
        for name in ("dataset", "model", "run_name", "trigger_word", "sample_prompts", "extra_settings"):
            if getattr(self, name) is None:
                setattr(self, name, "")

    def overrides(self) -> dict:
        """Dotted config overrides; `extra_settings` holds one key=value per line."""
        if not self.dataset.strip():
            raise ValueError("Choose a dataset folder (e.g. the Recaption tab's output).")
        values = {
            "preset": self.preset,
            "data.path": self.dataset.strip(),
            "model.path": self.model.strip(),
            "name": self.run_name,
            "loop.max_steps": int(self.max_steps),
            "optimizer.learning_rate": float(self.learning_rate),
            "adapter.rank": int(self.rank),
            "adapter.alpha": float(self.rank),
            "data.trigger_word": self.trigger_word.strip(),
        }
        prompts = [line.strip() for line in self.sample_prompts.splitlines() if line.strip()]
        if prompts:
            values["monitor.sample_prompts"] = prompts
        for line in self.extra_settings.splitlines():
            if line.strip():
                key, value = parse_override(line.strip())
                values[key] = value
        return values

    def check_shared(self) -> None:
        """Refuse "More settings" keys a shared server's visitor may not set (paths, the run's own names)."""
        allowed = shared_setting_keys()
        for line in self.extra_settings.splitlines():
            if line.strip():
                key, _ = parse_override(line.strip())
                if key not in allowed:
                    raise ValueError(
                        f"{key!r} cannot be set on this shared server (it names a file or folder, or is set by the "
                        "tab itself); allowed keys are the numbers, switches and choices of the training config."
                    )


def run_folder(output_root: Path, run_name: str) -> Path:
    if not RUN_NAME.match(run_name or ""):
        raise ValueError(
            f"Run name {run_name!r} must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit."
        )
    return Path(output_root) / run_name


def default_preset() -> tuple[str, str]:
    """(preset, why) for this machine: `cpu` without CUDA, else the largest LoRA preset whose simulated peak
    (training/memory_table.json) fits the GPU; the full fine-tune is never proposed here (the tab trains adapters)."""
    total_gib = detected_gpu_gib()
    suggested, why = preset_suggestion(total_gib, adapters_only=True)
    if total_gib is None and not torch.cuda.is_available():
        return "cpu", f"{why} The cpu preset runs on this machine."
    return suggested, why


def preset_rank(name: str) -> int:
    """The adapter rank preset `name` sets (the rank box starts there: it overrides the preset's rank)."""
    return int(PRESETS.get(name, {}).get("adapter.rank", TrainConfig().adapter.rank))


def without_server_paths(text: str, workspace_root: Path, base: str) -> str:
    """A run's message as a shared server's visitor may read it: paths in their workspace relative to it, and the
    server's base model by its name (a run's error can name either)."""
    text = strip_root(text, workspace_root)
    return text.replace(base, public_model_name(base)) if base else text


def _status_markdown(folder: Path, status: TrainingStatus) -> str:
    lines = [f"**{folder.name}**: {status.state}, step {status.step} / {status.max_steps or '?'}"]
    if status.losses:
        lines.append(f"loss {status.losses[-1][1]:.4f}")
    if status.validation:
        lines.append(f"validation loss {status.validation[-1][1]:.4f}")
    if status.eta_s is not None and status.state == "running":
        minutes, seconds = divmod(int(status.eta_s), 60)
        lines.append(f"ETA {minutes} min {seconds:02d} s")
    if status.data_summary:
        lines.append(status.data_summary)
    if status.message:
        lines.append(status.message)
    return " | ".join(lines)


CURVE_COLORS = {"loss": "#4f46e5", "validation": "#dc2626"}


def _curve(status: TrainingStatus) -> pd.DataFrame | None:
    """Loss and validation loss as two lines, or None before the first value. Gradio's plot keeps the axis types
    and colour domain of the first frame it draws: an empty frame would leave every later update without lines (loss
    values as unordered labels), so nothing is sent until there is a number, in typed columns."""
    rows = [(s, float(v), "loss") for s, v in status.losses]
    rows += [(s, float(v), "validation") for s, v in status.validation]
    if not rows:
        return None
    return pd.DataFrame(
        {
            "step": pd.Series([r[0] for r in rows], dtype="int64"),
            "loss": pd.Series([r[1] for r in rows], dtype="float64"),
            "series": pd.Series([r[2] for r in rows], dtype="object"),
        }
    )


def build_train_tab(
    output_root: Path, engine=None, hosting: Hosting | None = None, generate_tab=None, train_base: str | None = None
) -> None:
    """Build the tab's widgets and events inside the caller's `with gr.Tab("Train"):`. With `engine` and
    `generate_tab` (the Generate tab's components), "Load in Generate tab" hands the LoRA over to them. `train_base`:
    the server's base model (`--train-base`); visitors of a shared server see its name only."""
    output_root = Path(output_root)
    hosting = hosting or Hosting.personal(output_root.parent)
    folder_state = gr.State("")
    # Lens-Base is the natural base; an app running the offline demo model trains that one by default.
    demo = engine is not None and getattr(engine, "model_label", None) == TINY_MODEL
    base = train_base or (TINY_MODEL if demo else VARIANTS["Lens-Base"].repo_ids[0])
    shown_base = public_model_name(base) if hosting.shared else base
    if hosting.shared and not hosting.allow_training:
        gr.Markdown("Training is off on this shared server; its admin can allow it with `--allow-training`.")
    with gr.Row():
        with gr.Column(scale=1):
            if hosting.shared:
                dataset = gr.Dropdown(
                    [], label="Dataset (your uploads, e.g. from the Recaption tab)", allow_custom_value=True
                )
                model = gr.Textbox(label="Base model (the server's)", value=shown_base, interactive=False)
            else:
                dataset = gr.Textbox(label="Dataset folder", placeholder="images with .txt captions or metadata.jsonl")
                model = gr.Textbox(label="Base model", value=base, info="Hub id, local folder, or 'tiny'")
            suggested, why = default_preset()
            preset = gr.Dropdown(list(PRESET_NAMES), value=suggested, label="Preset", info=why)
            run_name = gr.Textbox(label="Run name", value="my-lora")
            with gr.Row():
                steps = 1000 if torch.cuda.is_available() else 200
                max_steps = gr.Number(label="Steps", value=steps, precision=0, minimum=1)
                learning_rate = gr.Number(label="Learning rate", value=1e-4, minimum=0)
                rank = gr.Number(label="LoRA rank", value=preset_rank(suggested), precision=0, minimum=1)
            trigger_word = gr.Textbox(label="Trigger word")
            sample_prompts = gr.Textbox(label="Sample prompts (one per line)", lines=2)
            extra_settings = gr.Textbox(
                label="More settings (key=value per line)",
                lines=2,
                placeholder="loop.batch_size=2\nmonitor.sample_every=100",
            )
            with gr.Row():
                start = gr.Button("Start", variant="primary")
                stop = gr.Button("Stop")
                resume = gr.Button("Resume")
        with gr.Column(scale=1):
            status = gr.Markdown("No run yet.")
            curve = gr.LinePlot(
                None,
                x="step",
                y="loss",
                color="series",
                color_map=CURVE_COLORS,  # fixes both series from the start: validation may come after the loss
                x_title="step",
                y_title="loss",
                label="Loss",
                height=260,
            )
            samples = gr.Gallery(label="Samples", columns=4, height=260)
            lora_path = gr.Textbox(label="Trained LoRA", interactive=False)
            load = gr.Button("Load in Generate tab")
            load_message = gr.Markdown()
    inputs = [
        dataset,
        model,
        preset,
        run_name,
        max_steps,
        learning_rate,
        rank,
        trigger_word,
        sample_prompts,
        extra_settings,
    ]

    def refresh(folder: str):
        if not folder:
            return "No run yet.", _curve(TrainingStatus("not started")), [], ""
        job_status = training_status(folder)
        lora = job_status.outputs.get("diffusers", "")
        if hosting.shared and lora:
            # The LoRA's name in the caller's workspace (training/<run>/...), as the Generate tab lists it.
            lora = (Path("training") / Path(os.path.relpath(lora, Path(folder).parent))).as_posix()
        samples = [served_copy(path) for path in job_status.samples if Path(path).is_file()]
        text = _status_markdown(Path(folder), job_status)
        if hosting.shared:  # <workspace>/training/<run>: a failed run's message may name server folders
            text = without_server_paths(text, Path(folder).resolve().parent.parent, base)
        return text, _curve(job_status), samples, lora

    def runs_root(request: gr.Request | None) -> Path:
        return hosting.workspace(request).training if hosting.shared else output_root

    def checked_request(values: tuple, request: gr.Request | None) -> TrainRequest:
        """The widgets as a request; in shared mode the dataset is one of the caller's uploads and the base model
        is the server's, whatever the client sent."""
        train = TrainRequest(*values)
        run_folder(runs_root(request), train.run_name)  # a bad name is the first thing to report
        if not hosting.shared:
            if train.dataset.strip() and not Path(train.dataset.strip()).exists():
                raise ValueError(f"The dataset {train.dataset.strip()!r} does not exist.")
            return train
        train.check_shared()
        if train.model.strip() not in ("", shown_base):
            raise ValueError(
                f"The base model is the server's ({shown_base}); it cannot be changed on this shared server."
            )
        return dataclasses.replace(train, dataset=str(hosting.dataset(request, train.dataset)), model=base)

    def on_start(request: gr.Request, *values):
        hosting.require_training()
        hosting.require_room(hosting.workspace(request), "a training run")
        try:
            train = checked_request(values, request)
            folder = run_folder(runs_root(request), train.run_name)
            start_training(folder, {}, train.overrides())
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return (str(folder), *refresh(str(folder)))

    def on_stop(folder: str):
        job = Job.attach(folder) if folder else None
        # SIGTERM now (the run checkpoints and exits at the end of its current step); SIGKILL if it hangs.
        if job is None or not job.stop(grace_seconds=300):
            raise gr.Error("No training process is running for this session.")
        return refresh(folder)

    def on_resume(run: str, folder: str, request: gr.Request):
        hosting.require_training()
        hosting.require_room(hosting.workspace(request), "a training run")
        try:
            folder = folder or str(run_folder(runs_root(request), run))
            resume_training(folder)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return (folder, *refresh(folder))

    handoff = []  # the Generate tab's LoRA slots and their panel, which "Load in Generate tab" updates
    if generate_tab is not None:
        handoff = [*generate_tab.lora_names, *generate_tab.lora_weights, generate_tab.lora_panel]

    def on_load(path: str, request: gr.Request):
        if not path:
            raise gr.Error("No finished LoRA yet: it appears here when the run is done.")
        workspace_root = hosting.workspace(request).root
        if hosting.shared:
            # A LoRA name the Generate tab offers this caller (the text box's value comes from the client).
            offered = list_loras(hosting.output_dir, workspace_root)
            if path not in offered:
                raise gr.Error(f"{path!r} is not one of your LoRAs; yours: {sorted(offered) or 'none yet'}.")
        if engine is None:
            return {load_message: f"The LoRA is at `{path}`; no generation engine is running in this app."}
        try:
            # This caller's active set until they change it in the Generate tab (never another visitor's).
            engine.set_loras([(path, 1.0)], workspace_root)
        except (ValueError, OSError, EngineNotReady) as error:
            raise gr.Error(f"Could not load the LoRA: {error}") from None
        name = engine.active_loras(workspace_root)[0][0]
        updates = {load_message: f"Loaded `{name}` (weight 1.0): it is selected in the Generate tab's LoRA 1 slot."}
        if generate_tab is not None:
            updates.update(select_loras(generate_tab, engine, workspace_root))
        return updates

    # The rank box follows the preset, so starting with the box as it is trains the preset's rank.
    preset.input(preset_rank, preset, rank, api_visibility="private", queue=False, show_progress="hidden")
    views = [status, curve, samples, lora_path]
    start.click(on_start, inputs, [folder_state, *views], api_name="train_start")
    stop.click(on_stop, folder_state, views, api_name="train_stop")
    resume.click(on_resume, [run_name, folder_state], [folder_state, *views], api_name="train_resume")
    load.click(on_load, lora_path, [load_message, *handoff], api_name="train_load_lora")
    refresh_button = gr.Button("Refresh", size="sm")
    refresh_button.click(refresh, folder_state, views, api_name="train_status", queue=False)
    # The poll never takes a queue slot: a busy GPU queue must not refuse (or delay) an idle page's refresh.
    gr.Timer(2.0).tick(refresh, folder_state, views, api_visibility="private", queue=False, show_progress="hidden")
    if hosting.shared:

        def dataset_choices(current, request: gr.Request):
            return gr.update(choices=hosting.dataset_names(request), value=current)

        dataset.focus(dataset_choices, dataset, dataset, api_visibility="private", queue=False, show_progress="hidden")
