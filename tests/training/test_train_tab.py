"""The Train tab through its API (gradio_client against a real server in a subprocess): start a run, stop it,
resume it, see it finish, and get the LoRA path from "Load in Generate tab" (no engine in this app)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_server_support import poll_until
from train_helpers import make_toy_dataset

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    root = tmp_path_factory.mktemp("train-tab")
    port = _free_port()
    env = dict(
        os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests' / 'training'}", GRADIO_ANALYTICS_ENABLED="False"
    )
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "training" / "train_tab_server.py"), str(root), str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None:
                pytest.fail(server.stderr.read().decode()[-3000:])
            time.sleep(0.3)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False), root
    server.terminate()
    server.wait(timeout=30)


def _start_args(dataset, checkpoint, name: str, steps: int, extra: str = ""):
    settings = "\n".join(
        [
            "model.base_precision=fp32",
            "data.buckets=[[64, 64]]",
            "monitor.sample_size=[64, 64]",
            "monitor.sample_steps=2",
            "monitor.sample_every=0",
            "monitor.checkpoint_every=20",
            "monitor.tensorboard=false",
            "loop.gradient_checkpointing=false",
            extra,
        ]
    )
    return (str(dataset), str(checkpoint), "24gb", name, steps, 1e-3, 4, "sks", "", settings)


def test_bad_input_is_reported(client):
    from gradio_client.exceptions import AppError

    api, _root = client
    with pytest.raises(AppError, match="Choose a dataset folder"):
        api.predict("", "m", "24gb", "run", 10, 1e-4, 4, "", "", "", api_name="/train_start")
    with pytest.raises(AppError, match="Run name"):
        api.predict("/data", "m", "24gb", "../escape", 10, 1e-4, 4, "", "", "", api_name="/train_start")


def test_start_stop_resume_and_load(client, tiny_checkpoint, tmp_path):
    api, root = client
    dataset = make_toy_dataset(tmp_path / "data", copies=1)
    api.predict(*_start_args(dataset, tiny_checkpoint, "tab-run", 2000), api_name="/train_start")
    poll_until(api, "/train_status", lambda s: "running, step" in s[0] and "loss" in s[0], "training")
    api.predict(api_name="/train_stop")
    stopped = poll_until(api, "/train_status", lambda s: ": stopped" in s[0], "stopping")
    assert (root / "tab-run" / "checkpoints").is_dir()
    stopped_step = int(stopped[0].split("step ")[1].split(" /")[0])
    assert 0 < stopped_step < 2000

    (root / "tab-run" / "config.yaml").write_text(
        (root / "tab-run" / "config.yaml").read_text().replace("max_steps: 2000", f"max_steps: {stopped_step + 5}")
    )
    api.predict("tab-run", api_name="/train_resume")
    done = poll_until(api, "/train_status", lambda s: ": done" in s[0], "training")
    assert done[3].endswith("tab-run.safetensors") and Path(done[3]).is_file()
    assert done[2], "the samples gallery is empty"
    message = api.predict(done[3], api_name="/train_load_lora")
    assert done[3] in message and "no generation engine" in message


def test_the_loss_plot_draws_numbers_from_its_first_frame():
    import gradio as gr

    from app.train_tab import _curve, default_preset
    from training.jobs import TrainingStatus

    plot = gr.LinePlot(x="step", y="loss", color="series")
    assert _curve(TrainingStatus("not started")) is None  # an empty frame would fix the plot's types for good
    status = TrainingStatus("running", validation=[(0, 0.31)])
    first = plot.postprocess(_curve(status)).model_dump()
    status = TrainingStatus("running", losses=[(1, 0.5), (2, 0.25)], validation=[(0, 0.31), (2, 0.3)])
    full = plot.postprocess(_curve(status)).model_dump()
    for frame in (first, full):  # numbers, not categories: a line ordered by step and loss
        assert frame["datatypes"] == {"step": "quantitative", "loss": "quantitative", "series": "nominal"}
    assert full["data"] == [[1, 0.5, "loss"], [2, 0.25, "loss"], [0, 0.31, "validation"], [2, 0.3, "validation"]]
    if not __import__("torch").cuda.is_available():
        assert default_preset()[0] == "cpu"


def test_the_rank_box_starts_at_the_presets_rank():
    """The box overrides the preset's rank, so it shows the preset's own (the simulated need assumes it)."""
    from app.train_tab import preset_rank
    from training.config import PRESET_NAMES
    from training.memory_estimate import preset_config

    for name in PRESET_NAMES:
        assert preset_rank(name) == preset_config(name).adapter.rank


@pytest.mark.browser
def test_the_loss_plot_draws_loss_and_validation_lines_in_a_browser(client, tiny_checkpoint, tmp_path):
    from browser_support import chromium_page

    api, _root = client
    dataset = make_toy_dataset(tmp_path / "data", copies=2)
    settings = _start_args(dataset, tiny_checkpoint, "plot", 12, "data.validation_count=1\nmonitor.validate_every=4")[
        -1
    ]
    with chromium_page((1400, 1200)) as page:
        page.goto(api.src)
        page.get_by_label("Dataset folder").fill(str(dataset))
        page.get_by_label("Base model").fill(str(tiny_checkpoint))
        page.get_by_label("Run name").fill("plot")
        page.get_by_label("Steps").fill("12")
        page.get_by_label("More settings (key=value per line)").fill(settings)
        page.get_by_label("More settings (key=value per line)").press("Tab")  # Gradio syncs a textbox on blur
        page.get_by_role("button", name="Start").click()
        page.get_by_text("plot: done").first.wait_for(timeout=300_000)
        # Two line marks (loss, validation), each through several points: the plot kept numeric axes and both
        # colours although it was empty when the page opened.
        page.wait_for_function(
            """() => {
                const lines = [...document.querySelectorAll('g.mark-line path')].map(p => p.getAttribute('d') || '');
                return lines.length >= 2 && lines.every(d => (d.match(/L/g) || []).length >= 2);
            }""",
            timeout=30_000,
        )
