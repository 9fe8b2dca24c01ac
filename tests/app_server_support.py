"""Start `python app.py` in a subprocess for the app and security tests (Chromium is found by `browser_support`)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(tmp: Path, *extra: str, timeout_s: float = 180, env: dict | None = None):
    """Run the app with the tiny model on a free port; yield (url, output_dir); stop it afterwards. `env` adds to
    (or, with None values, removes from) the app's environment."""
    port = free_port()
    output_dir = tmp / "outputs"
    environment = {**os.environ, "LENS_CACHE_DIR": str(tmp / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    environment.pop("LENS_AUTH", None)
    environment.pop("SPACE_ID", None)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    log = (tmp / "app.log").open("w")
    command = [
        sys.executable,
        "app.py",
        "--model",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--output-dir",
        str(output_dir),
        *extra,
    ]
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, timeout_s, tmp / "app.log")
        yield f"http://127.0.0.1:{port}/", output_dir
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"app.py did not open port {port} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def wait_until_ready(client, timeout_s: float = 180) -> str:
    """Poll `/model_status` until the model is loaded (the app loads it in the background)."""
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = client.predict(api_name="/model_status")
        if "ready" in status:
            return status
        time.sleep(0.5)
    raise RuntimeError(f"The model did not become ready: {status}")
