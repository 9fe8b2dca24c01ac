"""The Train tab: pick a dataset and a preset, start a training process, watch it, stop / resume, use the LoRA.

The job is `python -m training.train` in its own process (`training.job.TrainingJob`); this tab only writes the
config, launches, and tails `progress.jsonl`. The run folder of the session lives in `gr.State`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from lens_core.presets import TINY_MODEL, VARIANTS
from training.config import PRESET_ORDER, parse_override
from training.job import JobStatus, TrainingJob
from training.memory_estimate import detected_gpu_gib, preset_suggestion

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


def _status_markdown(folder: Path, status: JobStatus) -> str:
    lines = [f"**{folder.name}**: {status.state}, step {status.step} / {status.max_steps or '?'}"]
    if status.losses:
        lines.append(f"loss {status.losses[-1][1]:.4f}")
    if status.validation:
        lines.append(f"validation loss {status.validation[-1][1]:.4f}")
    if status.eta_s is not None and status.state == "running":
        minutes, seconds = divmod(int(status.eta_s), 60)
        lines.append(f"ETA {minutes} min {seconds:02d} s")
    if status.message:
        lines.append(status.message)
    return " | ".join(lines)


def _curve(status: JobStatus) -> pd.DataFrame:
    rows = [{"step": s, "loss": v, "series": "train"} for s, v in status.losses]
    rows += [{"step": s, "loss": v, "series": "validation"} for s, v in status.validation]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def build_train_tab(output_root: Path, engine=None) -> None:
    """Build the tab's widgets and events inside the caller's `with gr.Tab("Train"):`."""
    output_root = Path(output_root)
    folder_state = gr.State("")
    with gr.Row():
        with gr.Column(scale=1):
            dataset = gr.Textbox(label="Dataset folder", placeholder="images with .txt captions or metadata.jsonl")
            # Lens-Base is the natural base; an app running the offline demo model trains that one by default.
            demo = engine is not None and getattr(engine, "model_label", None) == TINY_MODEL
            base = TINY_MODEL if demo else VARIANTS["Lens-Base"].repo_ids[0]
            model = gr.Textbox(label="Base model", value=base, info="Hub id, local folder, or 'tiny'")
            # The preset whose simulated peak (training/memory_table.json) fits this machine's GPU.
            suggested, why = preset_suggestion(detected_gpu_gib())
            preset = gr.Dropdown(list(PRESET_ORDER), value=suggested, label="Card preset", info=why)
            run_name = gr.Textbox(label="Run name", value="my-lora")
            with gr.Row():
                max_steps = gr.Number(label="Steps", value=1000, precision=0, minimum=1)
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
            curve = gr.LinePlot(x="step", y="loss", color="series", label="Loss", height=260)
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
            return "No run yet.", _curve(JobStatus("not started")), [], ""
        job_status = TrainingJob(folder).status()
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
            TrainingJob(folder).start({}, request.overrides())
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return (str(folder), *refresh(str(folder)))

    def on_stop(folder: str):
        if not folder or not TrainingJob(folder).stop():
            raise gr.Error("No training process is running for this session.")
        return refresh(folder)

    def on_resume(run: str, folder: str):
        try:
            folder = folder or str(run_folder(output_root, run))
            TrainingJob(folder).resume()
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return (folder, *refresh(folder))

    def on_load(path: str):
        if not path:
            raise gr.Error("No finished LoRA yet: it appears here when the run is done.")
        if engine is None:
            return f"The LoRA is at `{path}`; no generation engine is running in this app."
        engine.set_loras([(path, 1.0)])
        return f"Loaded `{Path(path).name}` in the Generate tab (weight 1.0)."

    views = [status, curve, samples, lora_path]
    start.click(on_start, inputs, [folder_state, *views], api_name="train_start")
    stop.click(on_stop, folder_state, views, api_name="train_stop")
    resume.click(on_resume, [run_name, folder_state], [folder_state, *views], api_name="train_resume")
    load.click(on_load, lora_path, load_message, api_name="train_load_lora")
    refresh_button = gr.Button("Refresh", size="sm")
    refresh_button.click(refresh, folder_state, views, api_name="train_status")
    gr.Timer(3.0).tick(refresh, folder_state, views, api_visibility="private")
