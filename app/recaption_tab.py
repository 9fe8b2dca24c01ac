"""The Recaption tab: pick a dataset, preview 4 captions, run / stop / resume the job, then review and edit.

The job is ``python -m training.recaption`` in its own process (the job layer of ``training.jobs``, shared with the
Train tab), so the UI stays responsive and a closed browser loses nothing. Everything per user lives in
``gr.State``; nothing is shared.

In ``personal`` mode the person at the machine types folders, a server URL and the name of the key's environment
variable. In ``shared`` mode a visitor picks one of their own uploaded datasets and one of the server's configured
backends by name; captions are written next to the uploaded images, inside the visitor's workspace.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from app.access import Hosting
from app.backends import DEMO_RECAPTION_BACKEND
from app.uploads import (
    IMAGE_SUFFIXES,
    UploadError,
    UploadLimits,
    delete_dataset,
    discard_temporary_upload,
    extract_dataset_zip,
    new_upload_folder,
    save_dataset_files,
)
from app.workspace import WorkspaceError, strip_root
from lens_core.image_io import BadImageError, load_image
from training.jobs import Job, start_recaption
from training.recaption.config import BACKENDS, OUTPUT_FORMATS, PRECISIONS, RecaptionConfig
from training.recaption.progress import report_path
from training.recaption.review import captioned_records, save_caption
from training.recaption.runner import resolve_output_dir
from training.recaption.templates import PRESETS
from training.recaption.writers import sidecar_path

logger = logging.getLogger(__name__)

PREVIEW_IMAGES = 4
DEMO_MAX_NEW_TOKENS = 48
TABLE_HEADERS = ["key", "words", "tokens", "flags", "accepted", "caption"]
_DEMO_MODEL_LOCK = threading.Lock()  # one build of the shared demo model at a time


@dataclass
class RecaptionSession:
    """One browser session's jobs (kept in ``gr.State``). ``confined_to``: on a shared server, the workspace every
    folder and image of this session must lie in."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    job: Job | None = None
    config: RecaptionConfig | None = None  # the running (or last) job's settings
    output_dir: str | None = None
    confined_to: str | None = None

    def allows(self, path: str | Path | None) -> bool:
        """Whether this session may read or write `path` (always, unless confined to a workspace)."""
        if path is None:
            return False
        return self.confined_to is None or Path(os.path.realpath(path)).is_relative_to(self.confined_to)


def _session(state: RecaptionSession | None) -> RecaptionSession:
    return state if isinstance(state, RecaptionSession) else RecaptionSession()


# ---------------------------------------------------------------------------------------------- settings -> config
def build_config(values: dict[str, Any], **overrides: Any) -> RecaptionConfig:
    """Widget values (by config field name) -> a validated config; user mistakes become ``gr.Error``."""
    folder = (values.get("inputs") or "").strip()
    if not folder:
        raise gr.Error("Pick a dataset folder (or upload a zip) first.")
    if not Path(folder).is_dir():
        raise gr.Error(f"The dataset folder {folder!r} does not exist or is not a folder.")
    output = (values.get("output_dir") or "").strip()
    if output and Path(output).exists() and not (Path(output).is_dir() and os.access(output, os.W_OK)):
        raise gr.Error(f"The output folder {output!r} is not a writable folder.")
    settings = {
        "inputs": [folder],
        "output_dir": (values.get("output_dir") or "").strip() or None,
        "formats": list(values.get("formats") or ["sidecar"]),
        "sidecar_extension": str(values.get("sidecar_extension", RecaptionConfig().sidecar_extension)).strip(),
        "backend": values["backend"],
        "model": (values.get("model") or "").strip(),
        "base_url": (values.get("base_url") or "").strip(),
        "api_key_env": (values.get("api_key_env") or "").strip(),
        "concurrency": int(values["concurrency"]),
        "batch_size": int(values["batch_size"]),
        "precision": values["precision"],
        "max_new_tokens": int(values.get("max_new_tokens") or RecaptionConfig().max_new_tokens),
        "template": values["template"],
        "target_words": int(values["target_words"]) if values.get("target_words") else None,
        "prompt": (values.get("prompt") or "").strip() or None,
        "overwrite": bool(values.get("overwrite")),
        **overrides,
    }
    if not settings["model"]:
        raise gr.Error("Enter a model: a model name for the server, or a local model folder.")
    try:
        return RecaptionConfig.from_dict(settings)
    except ValueError as error:
        raise gr.Error(str(error)) from None


def extract_zip(
    upload: str | list | None, uploads_root: Path, session: RecaptionSession, limits: UploadLimits | None = None
) -> str:
    """Unpack an uploaded zip (or copy uploaded images) into a new folder under ``uploads_root/uploads`` with the
    limits of ``app.uploads``: all or nothing. Returns the folder; Gradio's temporary copies are removed."""
    from gradio.utils import get_upload_folder

    files = [item for item in (upload if isinstance(upload, list) else [upload]) if item]
    paths = [item.get("path") if isinstance(item, dict) else item for item in files]
    if not paths or not all(isinstance(path, str) for path in paths):
        raise gr.Error("Choose a .zip file or images to upload.")
    destination = new_upload_folder(Path(uploads_root) / "uploads")
    try:
        if len(paths) == 1 and paths[0].lower().endswith(".zip"):
            result = extract_dataset_zip(paths[0], destination, limits)
        else:
            result = save_dataset_files(paths, destination, limits)
    except UploadError as error:
        raise gr.Error(str(error)) from None
    finally:
        for path in paths:
            discard_temporary_upload(path, get_upload_folder())
    logger.info("Uploaded dataset %s: %s", destination.name, result.summary())
    return str(result.folder)


# ---------------------------------------------------------------------------------------------- views of a run
def _thumbnail(record: dict[str, Any], session: RecaptionSession | None = None) -> tuple[Image.Image, str] | None:
    if not record.get("image") or (session is not None and not session.allows(record["image"])):
        return None
    try:  # the pixels the captioner saw: upright, alpha on white, first frame
        thumb = load_image(record["image"], max_side=160).image
    except BadImageError:
        return None
    return thumb, f"{record['key']}: {record.get('caption', '')[:140]}"


def progress_view(
    events: list[dict[str, Any]], running: bool, exit_code: int | None, session: RecaptionSession | None = None
) -> tuple[str, list]:
    """A status line and thumbnails of the latest captions from a run's progress events."""
    if not events:
        return ("Starting..." if running else "No progress yet."), []
    last = events[-1]
    done, total = last.get("done", 0), last.get("total", 0)
    state = (
        "running"
        if running
        else {0: "finished", 1: "finished with failures", 130: "stopped"}.get(exit_code, f"ended (exit {exit_code})")
    )
    text = f"**{state}**: {done} / {total} images, {last.get('captioned', 0)} captioned, {last.get('failed', 0)} failed"
    if last.get("stopped_reason"):
        text += f"  \nStopped: {last['stopped_reason']}"
    items = [event for event in events if event.get("event") == "item" and event.get("status") == "ok"][-8:]
    return text, [thumb for item in reversed(items) if (thumb := _thumbnail(item, session))]


def review_table(output_dir: str | None, flagged_only: bool) -> tuple[list[list[Any]], list[str]]:
    """Rows for the review table and the keys for the editor's dropdown."""
    if not output_dir or not Path(output_dir).is_dir():
        return [], []
    records = captioned_records(Path(output_dir), flagged_only=flagged_only)
    rows = [
        [
            r["key"],
            r.get("words"),
            r.get("tokens"),
            ", ".join(r.get("flags", [])),
            bool(r.get("accepted")),
            r["caption"],
        ]
        for r in records
    ]
    return rows, [r["key"] for r in records]


def statistics(output_dir: str | None) -> tuple[dict | None, Image.Image | None]:
    """The run's report and histogram, when written (the histogram as an image: the folder may not be served)."""
    if not output_dir:
        return None, None
    report = report_path(Path(output_dir))
    histogram = report.with_name("recaption_histogram.png")
    data = json.loads(report.read_text(encoding="utf-8")) if report.exists() else None
    return data, Image.open(histogram).copy() if histogram.exists() else None


# ---------------------------------------------------------------------------------------------- handlers
def _shown(session: RecaptionSession, path: str) -> str:
    """A folder as its owner should see it: relative to their workspace on a shared server."""
    if session.confined_to and Path(os.path.realpath(path)).is_relative_to(session.confined_to):
        return Path(os.path.realpath(path)).relative_to(session.confined_to).as_posix()
    return path


def start_job(
    state: RecaptionSession | None, values: dict[str, Any], output_root: Path, *, resume: bool = False
) -> tuple:
    """Start (or resume: same settings, never overwrite) a run as a child process."""
    session = _session(state)
    if session.job is not None and session.job.running():
        raise gr.Error("A recaption job is already running; stop it first.")
    config = build_config(values, overwrite=False) if resume else build_config(values)
    try:
        config_dir = output_root / "recaption_jobs" / session.session_id / uuid.uuid4().hex[:8]
        session.job, session.config = start_recaption(config, config_dir), config
    except (OSError, ValueError) as error:
        raise gr.Error(f"Could not start the job: {error}") from None
    session.output_dir = str(resolve_output_dir(config))
    return session, f"Started: captions go to {_shown(session, session.output_dir)}", gr.Timer(active=True)


def poll_job(state: RecaptionSession | None) -> tuple:
    """Timer tick: status, thumbnails, and (once finished) statistics; the timer stops with the job."""
    session = _session(state)
    if session.job is None:
        return "No job started.", [], gr.Timer(active=False), None, None
    running = session.job.running()
    text, thumbs = progress_view(session.job.events(), running, session.job.exit_code(), session)
    if not running and session.job.exit_code() not in (0, 1, 130):
        text += "\n\n" + _crash_log(session, session.job)
    report, histogram = statistics(session.output_dir) if not running else (gr.skip(), gr.skip())
    if not running:
        report = _for_visitor(session, report)
    return _for_visitor(session, text), thumbs, gr.Timer(active=running), report, histogram


def _for_visitor(session: RecaptionSession, value):
    """A text or a report as the session's owner reads it: on a shared server, with the workspace folder left out of
    every path (a failure reason names the file)."""
    if not session.confined_to or value is None:
        return value
    if isinstance(value, str):
        return strip_root(value, session.confined_to)
    return json.loads(strip_root(json.dumps(value), session.confined_to))


def _crash_log(session: RecaptionSession, job: Job) -> str:
    """The end of a crashed job's log for the person at the machine; a shared server's visitor gets a pointer to the
    server's log instead (a traceback names the server's folders and packages)."""
    if session.confined_to is None:
        return f"```\n{job.log_tail(1500)}\n```"
    logger.error("A recaption job ended with exit code %s:\n%s", job.exit_code(), job.log_tail(4000))
    return f"The recaption process ended unexpectedly (exit code {job.exit_code()}); the server's log has the details."


def stop_job(state: RecaptionSession | None) -> str:
    """Stop the running job (its progress is kept; Resume continues it)."""
    session = _session(state)
    if session.job is None or not session.job.running():
        raise gr.Error("No recaption job is running.")
    session.job.stop(grace_seconds=10)  # SIGTERM: the run records 'stopped' and exits; SIGKILL after 10 s
    session.job.wait_quietly(15)
    return "Stopped. Press Resume to continue where it left off."


def preview(state: RecaptionSession | None, values: dict[str, Any], output_root: Path) -> tuple:
    """Caption the first 4 images into a scratch folder (the dataset is not touched) and show them."""
    session = _session(state)
    scratch = output_root / "recaption_jobs" / session.session_id / f"preview-{uuid.uuid4().hex[:8]}"
    config = build_config(
        values, output_dir=str(scratch / "out"), formats=["jsonl"], limit=PREVIEW_IMAGES, overwrite=True
    )
    job = start_recaption(config, scratch)
    try:
        job.wait(timeout=600)
    except subprocess.TimeoutExpired:
        job.stop(grace_seconds=2)
        raise gr.Error("The preview took longer than 10 minutes and was stopped.") from None
    items = [event for event in job.events() if event.get("event") == "item"]
    if not items:
        raise gr.Error(f"The preview produced no captions. {_crash_log(session, job)}")
    lines = [f"**{item['key']}**: " + (item.get("caption") or f"failed: {item.get('reason')}") for item in items]
    thumbs = [thumb for item in items if (thumb := _thumbnail(item, session))]
    return session, _for_visitor(session, "\n\n".join(lines)), thumbs


def load_review(state: RecaptionSession | None, output_dir: str, flagged_only: bool) -> tuple:
    """Fill the review table and the editor's key list from the run's output folder."""
    session = _session(state)
    folder = (output_dir or "").strip() or session.output_dir
    if not folder or not Path(folder).is_dir():
        raise gr.Error("Start a run first, or enter the output folder of an earlier run.")
    if not session.allows(folder):
        raise gr.Error("That folder is outside your workspace; pick one of your datasets.")
    session.output_dir = folder
    rows, keys = review_table(folder, flagged_only)
    report, histogram = statistics(folder)
    keys_update = gr.Dropdown(choices=keys, value=keys[0] if keys else None)
    return session, rows, keys_update, _for_visitor(session, report), histogram


def show_caption(state: RecaptionSession | None, key: str | None) -> tuple:
    """The selected image and its caption in the editor."""
    session = _session(state)
    if not key or not session.output_dir:
        return None, ""
    record = next((r for r in captioned_records(Path(session.output_dir)) if r["key"] == key), None)
    if record is None:
        return None, ""
    thumb = _thumbnail(record, session)
    return (thumb[0] if thumb else None), record["caption"]


def save_edit(state: RecaptionSession | None, key: str | None, caption: str, flagged_only: bool) -> tuple:
    """Save the edited caption (atomically) and mark it accepted."""
    session = _session(state)
    if session.job is not None and session.job.running():
        raise gr.Error("Wait for the job to finish (or stop it) before editing captions.")
    if not key or not session.output_dir:
        raise gr.Error("Load the captions and choose an image first.")
    config = session.config
    extension = config.sidecar_extension if config else ".txt"
    if not session.allows(sidecar_path(Path(session.output_dir), key, extension)):
        raise gr.Error(f"The caption of {key!r} would be written outside your workspace; it was not saved.")
    try:
        save_caption(
            Path(session.output_dir),
            key,
            caption,
            write_sidecar=config is None or "sidecar" in config.formats,
            sidecar_extension=extension,
        )
    except ValueError as error:
        raise gr.Error(str(error)) from None
    rows, _ = review_table(session.output_dir, flagged_only)
    return rows, f"Saved and accepted {key}."


def accept_unflagged(state: RecaptionSession | None, flagged_only: bool) -> tuple:
    """Mark every caption without quality flags as accepted (captions unchanged)."""
    session = _session(state)
    if session.job is not None and session.job.running():
        raise gr.Error("Wait for the job to finish (or stop it) before accepting captions.")
    if not session.output_dir:
        raise gr.Error("Load the captions first.")
    records = [r for r in captioned_records(Path(session.output_dir)) if not r.get("flags") and not r.get("accepted")]
    for record in records:
        save_caption(Path(session.output_dir), record["key"], record["caption"], write_sidecar=False)
    rows, _ = review_table(session.output_dir, flagged_only)
    return rows, f"Accepted {len(records)} unflagged captions."


def demo_model_folder(output_root: Path) -> Path:
    """Build (once, one build at a time) the tiny random offline captioning model; return its folder."""
    from training.recaption.tiny_vlm import build_tiny_vlm  # imports torch/transformers: only when asked

    folder = Path(output_root) / "recaption_demo_model"
    with _DEMO_MODEL_LOCK:
        if not (folder / "config.json").exists():
            build_tiny_vlm(folder)
    return folder


def use_demo_model(output_root: Path) -> tuple:
    """Build (once) the tiny random offline model and select it: try the local backend without any download."""
    folder = demo_model_folder(output_root)
    message = f"Tiny random demo model ready at {folder}: its captions are random words, for trying the workflow only."
    # Random weights rarely emit end-of-sequence: cap the answer so the demo finishes in seconds on a CPU.
    return "local", str(folder), DEMO_MAX_NEW_TOKENS, message


# ---------------------------------------------------------------------------------------------- shared mode
def shared_values(values: dict[str, Any], hosting: Hosting, request: gr.Request | None) -> dict[str, Any]:
    """A shared server's widget values (a dataset name, a backend name) -> the config values: the folder of the
    caller's dataset and the endpoint of the server's backend. Nothing the caller sends names a path or URL."""
    try:
        dataset = hosting.dataset(request, values.get("inputs"))
        backend = hosting.backends.pick("recaption", values.get("backend"))
    except ValueError as error:
        raise gr.Error(str(error)) from None
    model = backend.model
    if backend.name == DEMO_RECAPTION_BACKEND:
        # Random weights rarely stop on their own: cap the answer so the demo finishes in seconds.
        model = str(demo_model_folder(hosting.output_dir / "recaption"))
        values = {
            **values,
            "max_new_tokens": min(values.get("max_new_tokens") or DEMO_MAX_NEW_TOKENS, DEMO_MAX_NEW_TOKENS),
        }
    defaults = RecaptionConfig()
    return {
        **values,
        "inputs": str(dataset),
        "output_dir": "",  # captions next to the uploaded images, inside the workspace
        "backend": backend.kind,
        "model": model,
        "base_url": backend.base_url or defaults.base_url,
        "api_key_env": backend.api_key_env,
    }


# ---------------------------------------------------------------------------------------------- layout
def _dataset_widgets(hosting: Hosting, widgets: dict) -> gr.File:
    upload_types = [".zip", *IMAGE_SUFFIXES, ".txt", ".jsonl"]
    with gr.Row():
        if hosting.shared:
            widgets["inputs"] = gr.Dropdown([], label="Dataset (your uploads)", allow_custom_value=True, scale=3)
        else:
            widgets["inputs"] = gr.Textbox(label="Dataset folder", placeholder="/data/my_images", scale=3)
        limit = f"{hosting.upload_limits.max_total_bytes / 1024**3:.0f} GiB"
        upload = gr.File(
            label=f"...or upload a zip or images (at most {limit} unpacked)",
            file_types=upload_types,
            file_count="multiple",
            type="filepath",
            scale=1,
        )
    if hosting.shared:
        widgets["_delete"] = gr.Button("Delete this dataset", variant="stop", size="sm", elem_id="delete-dataset")
    else:
        widgets["output_dir"] = gr.Textbox(label="Output folder (empty: sidecars next to the images)")
    return upload


def _settings_widgets(hosting: Hosting) -> dict[str, gr.components.Component]:
    """The run settings, keyed by their ``RecaptionConfig`` field name (handlers read them by name). A shared server
    offers its configured backends by name instead of the model / URL / key-variable fields."""
    defaults = RecaptionConfig()
    widgets: dict[str, gr.components.Component] = {}
    upload = _dataset_widgets(hosting, widgets)
    with gr.Row():
        if hosting.shared:
            names = list(hosting.backends.recaption)
            widgets["backend"] = gr.Dropdown(
                [(backend.describe(), name) for name, backend in hosting.backends.recaption.items()],
                value=names[0],
                label="Backend (set up by the server)",
            )
        else:
            widgets["backend"] = gr.Radio(list(BACKENDS), value=defaults.backend, label="Backend")
            widgets["model"] = gr.Textbox(value=defaults.model, label="Model (server model name or local model folder)")
        widgets["template"] = gr.Dropdown(list(PRESETS), value=defaults.template, label="Template")
        widgets["target_words"] = gr.Number(
            value=PRESETS[defaults.template].target_words, precision=0, label="Target words"
        )
    with gr.Accordion("Backend and output settings", open=False):
        with gr.Row():
            if not hosting.shared:
                widgets["base_url"] = gr.Textbox(value=defaults.base_url, label="Server URL (openai)")
                widgets["api_key_env"] = gr.Textbox(
                    value=defaults.api_key_env, label="Environment variable holding the API key"
                )
            widgets["concurrency"] = gr.Slider(1, 64, value=defaults.concurrency, step=1, label="Concurrent requests")
        with gr.Row():
            widgets["batch_size"] = gr.Slider(1, 64, value=defaults.batch_size, step=1, label="Batch size (local)")
            widgets["precision"] = gr.Dropdown(list(PRECISIONS), value=defaults.precision, label="Precision (local)")
            widgets["max_new_tokens"] = gr.Slider(
                8, 1024, value=defaults.max_new_tokens, step=8, label="Max new tokens"
            )
            widgets["formats"] = gr.CheckboxGroup(list(OUTPUT_FORMATS), value=defaults.formats, label="Outputs")
            widgets["overwrite"] = gr.Checkbox(value=False, label="Overwrite existing captions")
        widgets["prompt"] = gr.Textbox(
            label="Custom prompt (optional; variables {original_caption} {hint} {tags} {file_name} {folder} {target_words})",
            lines=3,
        )
        # Last, so that API callers passing the settings by position keep their order.
        widgets["sidecar_extension"] = gr.Textbox(
            value=defaults.sidecar_extension,
            label="Sidecar extension (.lens.txt keeps the alt-text .txt files; training reads the new captions)",
        )
    widgets["template"].change(
        lambda name: PRESETS[name].target_words, widgets["template"], widgets["target_words"], api_name=False
    )
    widgets["_upload"] = upload
    return widgets


def _selected_key(event: gr.SelectData) -> Any:
    """A click on a table row picks that image in the editor."""
    return event.row_value[0] if event.row_value else gr.skip()


def build_recaption_tab(output_root: Path, hosting: Hosting | None = None) -> None:
    """Build the tab inside an open ``gr.Blocks`` / ``gr.Tab``. Personal mode: job configs, logs and uploads go under
    ``output_root``. Shared mode: under the caller's workspace (``hosting``)."""
    output_root = Path(output_root)
    hosting = hosting or Hosting.personal(output_root.parent)
    state = gr.State(None)
    widgets = _settings_widgets(hosting)
    upload = widgets.pop("_upload")
    delete_button = widgets.pop("_delete", None)
    # One fixed order (state, then the settings by field name) so API callers see stable parameters; handlers
    # turn the values back into a dict by name instead of unpacking dozens of positional arguments.
    setting_names = list(widgets)
    settings = [state, *widgets.values()]

    def place(request: gr.Request | None, state_value) -> tuple[RecaptionSession, Path]:
        """This session and the folder its jobs and uploads go in (the caller's workspace when shared)."""
        session = _session(state_value)
        if not hosting.shared:
            return session, output_root
        workspace = hosting.workspace(request)
        session.confined_to = str(workspace.root)
        return session, workspace.recaption

    def by_name(request: gr.Request | None, values: tuple) -> tuple[RecaptionSession, dict[str, Any], Path]:
        session, root = place(request, values[0])
        named = dict(zip(setting_names, values[1:], strict=True))
        return session, (shared_values(named, hosting, request) if hosting.shared else named), root

    with gr.Row():
        preview_button = gr.Button("Preview on 4 images")
        start_button = gr.Button("Start", variant="primary")
        stop_button = gr.Button("Stop", variant="stop")
        resume_button = gr.Button("Resume")
        demo_button = gr.Button("Use the offline demo model", size="sm")
    status = gr.Markdown(
        "Upload a dataset, pick a backend, then preview or start."
        if hosting.shared
        else "Pick a dataset folder, a backend and a model, then preview or start."
    )
    preview_text = gr.Markdown()
    thumbs = gr.Gallery(label="Latest captions", columns=8, height=220)
    timer = gr.Timer(1.0, active=False)

    with gr.Accordion("Review and statistics", open=True):
        with gr.Row():
            if hosting.shared:
                review_folder = gr.Dropdown(
                    [], label="Dataset to review (empty: this session's run)", allow_custom_value=True, scale=3
                )
            else:
                review_folder = gr.Textbox(label="Output folder to review (empty: this session's run)", scale=3)
            flagged_only = gr.Checkbox(label="Only flagged captions", scale=1)
            review_button = gr.Button("Load captions", scale=1)
        table = gr.Dataframe(
            headers=TABLE_HEADERS,
            datatype=["str", "number", "number", "str", "bool", "str"],
            type="array",
            interactive=False,
            wrap=True,
            max_height=360,
            label="Captions",
        )
        with gr.Row():
            key = gr.Dropdown(label="Image", choices=[], scale=1)
            editor_image = gr.Image(label="Image", type="pil", interactive=False, height=200, scale=1)
            caption = gr.Textbox(label="Caption", lines=7, scale=3)
        with gr.Row():
            save_button = gr.Button("Save & accept caption", variant="primary")
            accept_button = gr.Button("Accept all unflagged")
        review_status = gr.Markdown()
        with gr.Row():
            report = gr.JSON(label="Statistics")
            histogram = gr.Image(label="Caption length histogram", type="pil", interactive=False)

    def dataset_choices(request: gr.Request | None, selected: str | None = None) -> tuple:
        names = hosting.dataset_names(request)
        return gr.update(choices=names, value=selected), gr.update(choices=names)

    def on_upload(current: RecaptionSession | None, files, request: gr.Request) -> tuple:
        session, root = place(request, current)
        workspace = hosting.workspace(request)
        uploads_root = workspace.root if hosting.shared else root
        folder = extract_zip(files, uploads_root, session, hosting.upload_limits_for(workspace))
        if hosting.shared:
            return session, *dataset_choices(request, Path(folder).name)
        return session, folder

    def on_start(request: gr.Request, *values: Any) -> tuple:
        session, named, root = by_name(request, values)
        hosting.require_room(hosting.workspace(request), "a recaption run")
        return start_job(session, named, root)

    def on_resume(request: gr.Request, *values: Any) -> tuple:
        session, named, root = by_name(request, values)
        hosting.require_room(hosting.workspace(request), "a recaption run")
        return start_job(session, named, root, resume=True)

    def on_preview(request: gr.Request, *values: Any) -> tuple:
        session, named, root = by_name(request, values)
        return preview(session, named, root)

    def on_review(current: RecaptionSession | None, folder, only_flagged: bool, request: gr.Request) -> tuple:
        session, _root = place(request, current)
        if hosting.shared and folder:
            try:
                folder = str(hosting.dataset(request, folder))
            except ValueError as error:
                raise gr.Error(str(error)) from None
        return load_review(session, folder or "", only_flagged)

    def refresh_choices(current, request: gr.Request):
        return gr.update(choices=hosting.dataset_names(request), value=current)

    def on_delete(current: RecaptionSession | None, name, request: gr.Request) -> tuple:
        """Shared mode: delete one of the caller's uploaded datasets (the way to make room under the quota)."""
        session, _root = place(request, current)
        workspace = hosting.workspace(request)
        if session.job is not None and session.job.running():
            raise gr.Error("A recaption run of this session is running: stop it before deleting a dataset.")
        try:
            delete_dataset(workspace.uploads, name, workspace.resolve)
        except (UploadError, WorkspaceError) as error:
            raise gr.Error(str(error)) from None
        names = hosting.dataset_names(request)
        message = f"Deleted the dataset {name}."
        return session, gr.update(choices=names, value=None), gr.update(choices=names, value=None), message

    def on_demo() -> tuple:
        if hosting.shared:
            message = "The offline demo backend is selected: its captions are random words, for trying the workflow."
            return DEMO_RECAPTION_BACKEND, DEMO_MAX_NEW_TOKENS, message
        return use_demo_model(output_root)

    if hosting.shared:
        # The dataset lists fill when opened: uploads of an earlier visit (same workspace) show up too.
        for dropdown in (widgets["inputs"], review_folder):
            dropdown.focus(
                refresh_choices, [dropdown], [dropdown], api_visibility="private", queue=False, show_progress="hidden"
            )
        upload_outputs = [state, widgets["inputs"], review_folder]
        delete_button.click(
            on_delete,
            [state, widgets["inputs"]],
            [state, widgets["inputs"], review_folder, status],
            api_name="recaption_delete_dataset",
        )
        demo_outputs = [widgets["backend"], widgets["max_new_tokens"], status]
    else:
        upload_outputs = [state, widgets["inputs"]]
        demo_outputs = [widgets["backend"], widgets["model"], widgets["max_new_tokens"], status]
    upload.upload(on_upload, [state, upload], upload_outputs, api_name="recaption_upload_zip", preprocess=False)
    preview_button.click(on_preview, settings, [state, preview_text, thumbs], api_name="recaption_preview")
    start_button.click(on_start, settings, [state, status, timer], api_name="recaption_start")
    resume_button.click(on_resume, settings, [state, status, timer], api_name="recaption_resume")
    stop_button.click(stop_job, state, status, api_name="recaption_stop")
    demo_button.click(on_demo, None, demo_outputs, api_name="recaption_use_demo_model")
    # The poll never takes a queue slot: a busy GPU queue must not stall (or refuse) the progress view.
    timer.tick(poll_job, state, [status, thumbs, timer, report, histogram], api_name="recaption_poll", queue=False)
    review_button.click(
        on_review,
        [state, review_folder, flagged_only],
        [state, table, key, report, histogram],
        api_name="recaption_load_review",
    )
    key.change(show_caption, [state, key], [editor_image, caption], api_name="recaption_show_caption")
    table.select(_selected_key, None, key, api_name=False)
    save_button.click(
        save_edit, [state, key, caption, flagged_only], [table, review_status], api_name="recaption_save_caption"
    )
    accept_button.click(
        accept_unflagged, [state, flagged_only], [table, review_status], api_name="recaption_accept_unflagged"
    )
