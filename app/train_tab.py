"""The Train tab: pick a dataset and a preset, start a training process, watch it, stop / resume, use the LoRA.

The job is `python -m training.train` in its own process (the job layer of `training.jobs`, shared with the Recaption
tab); this tab only writes the config, launches, and tails `progress.jsonl`. The run folder of the session lives in
`gr.State`. The preset and step count default to what this machine can run (a CPU gets the `cpu` preset), Stop takes
effect at the next step, and "Load in Generate tab" activates the LoRA in the engine and selects it in the Generate
tab's LoRA slots, where it stays until the user changes it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from app.generate_tab import select_loras
from lens_core.engine import EngineNotReady
from lens_core.presets import TINY_MODEL, VARIANTS
from training.config import PRESET_NAMES, parse_override
from training.jobs import Job, TrainingStatus, resume_training, start_training, training_status

logger = logging.getLogger(__name__)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


def run_folder(output_root: Path, run_name: str) -> Path:
    if not RUN_NAME.match(run_name or ""):
        raise ValueError(
            f"Run name {run_name!r} must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit."
        )
    return Path(output_root) / run_name


LORA_PRESETS = ("12gb", "16gb", "24gb")  # the 48gb preset is full fine-tuning, not a LoRA: never a default here


def default_preset() -> str:
    """The preset this machine runs: `cpu` without CUDA, else the largest LoRA preset the GPU's memory holds."""
    if not torch.cuda.is_available():
        return "cpu"
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    fitting = [name for name in LORA_PRESETS if int(name.removesuffix("gb")) <= total_gb + 0.5]
    return fitting[-1] if fitting else LORA_PRESETS[0]


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


def build_train_tab(output_root: Path, engine=None, generate_tab=None) -> None:
    """Build the tab's widgets and events inside the caller's `with gr.Tab("Train"):`. With `engine` and
    `generate_tab` (the Generate tab's components), "Load in Generate tab" hands the LoRA over to them."""
    output_root = Path(output_root)
    folder_state = gr.State("")
    with gr.Row():
        with gr.Column(scale=1):
            dataset = gr.Textbox(label="Dataset folder", placeholder="images with .txt captions or metadata.jsonl")
            # Lens-Base is the natural base; an app running the offline demo model trains that one by default.
            demo = engine is not None and getattr(engine, "model_label", None) == TINY_MODEL
            base = TINY_MODEL if demo else VARIANTS["Lens-Base"].repo_ids[0]
            model = gr.Textbox(label="Base model", value=base, info="Hub id, local folder, or 'tiny'")
            preset = gr.Dropdown(
                list(PRESET_NAMES),
                value=default_preset(),
                label="Preset",
                info="12gb / 16gb / 24gb: card sizes (QLoRA below 24 GB); cpu: a machine without CUDA",
            )
            run_name = gr.Textbox(label="Run name", value="my-lora")
            with gr.Row():
                steps = 1000 if torch.cuda.is_available() else 200
                max_steps = gr.Number(label="Steps", value=steps, precision=0, minimum=1)
                learning_rate = gr.Number(label="Learning rate", value=1e-4, minimum=0)
                rank = gr.Number(label="LoRA rank", value=16, precision=0, minimum=1)
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
        return (
            _status_markdown(Path(folder), job_status),
            _curve(job_status),
            job_status.samples,
            job_status.outputs.get("diffusers", ""),
        )

    def on_start(*values):
        request = TrainRequest(*values)
        try:
            folder = run_folder(output_root, request.run_name)
            start_training(folder, {}, request.overrides())
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return (str(folder), *refresh(str(folder)))

    def on_stop(folder: str):
        job = Job.attach(folder) if folder else None
        # SIGTERM now (the run checkpoints and exits at the end of its current step); SIGKILL if it hangs.
        if job is None or not job.stop(grace_seconds=300):
            raise gr.Error("No training process is running for this session.")
        return refresh(folder)

    def on_resume(run: str, folder: str):
        try:
            folder = folder or str(run_folder(output_root, run))
            resume_training(folder)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return (folder, *refresh(folder))

    handoff = []  # the Generate tab's LoRA slots and their panel, which "Load in Generate tab" updates
    if generate_tab is not None:
        handoff = [*generate_tab.lora_names, *generate_tab.lora_weights, generate_tab.lora_panel]

    def on_load(path: str):
        if not path:
            raise gr.Error("No finished LoRA yet: it appears here when the run is done.")
        if engine is None:
            return {load_message: f"The LoRA is at `{path}`; no generation engine is running in this app."}
        try:
            engine.set_loras([(path, 1.0)])  # active until the user changes it in the Generate tab
        except (ValueError, OSError, EngineNotReady) as error:
            raise gr.Error(f"Could not load the LoRA: {error}") from None
        name = engine.loras[0][0]
        updates = {load_message: f"Loaded `{name}` (weight 1.0): it is selected in the Generate tab's LoRA 1 slot."}
        if generate_tab is not None:
            updates.update(select_loras(generate_tab, engine))
        return updates

    views = [status, curve, samples, lora_path]
    start.click(on_start, inputs, [folder_state, *views], api_name="train_start")
    stop.click(on_stop, folder_state, views, api_name="train_stop")
    resume.click(on_resume, [run_name, folder_state], [folder_state, *views], api_name="train_resume")
    load.click(on_load, lora_path, [load_message, *handoff], api_name="train_load_lora")
    refresh_button = gr.Button("Refresh", size="sm")
    refresh_button.click(refresh, folder_state, views, api_name="train_status")
    gr.Timer(2.0).tick(refresh, folder_state, views, api_visibility="private")
