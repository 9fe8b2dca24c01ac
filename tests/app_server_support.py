"""Start `python app.py` in a subprocess for the app and security tests (Chromium is found by `browser_support`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    for name in ("LENS_AUTH", "LENS_ADMINS", "LENS_BACKENDS", "LENS_OUTPUT_DIR", "SPACE_ID", "GRADIO_SERVER_NAME"):
        environment.pop(name, None)  # only what the test passes
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


def poll_until(client, api_name: str, done: Callable, what: str, limit_s: float = 600, **kwargs):
    """Ask an endpoint (a status poll the page itself makes) until `done(answer)`, and return that answer; the cap
    only turns a hang into a failure that shows the last answer, so a slow machine waits longer, never fails."""
    deadline = time.monotonic() + limit_s
    while True:
        answer = client.predict(api_name=api_name, **kwargs)
        if done(answer):
            return answer
        assert time.monotonic() < deadline, f"{what}: last answer {answer!r}"
        time.sleep(0.2)


def wait_until_ready(client, timeout_s: float = 180) -> str:
    """Poll `/model_status` until the model is loaded (the app loads it in the background)."""
    return poll_until(client, "/model_status", lambda status: "ready" in status, "model load", limit_s=timeout_s)


def wait_for_status(job, *codes, timeout_s: float = 120) -> None:
    """Until the gradio_client `job` reports one of `codes`. Its status is what the client's own listener thread last
    received (in memory: reading it sends no request); `Status.PROCESSING` also accepts `PROGRESS` (a running
    /generate job reports its steps). The cap only turns a hang into a failure."""
    from gradio_client.utils import Status

    wanted = set(codes) | ({Status.PROGRESS} if Status.PROCESSING in codes else set())
    deadline = time.monotonic() + timeout_s
    while job.status().code not in wanted:
        assert time.monotonic() < deadline, (
            f"job stayed {job.status().code}, expected one of {sorted(map(str, wanted))}"
        )
        time.sleep(0.02)


class ChatEndpoint:
    """A local OpenAI-compatible chat endpoint (any path, any method) that records every request (path, headers,
    body) and answers `answer(body)` as the first choice's content. Use it as a context manager or `close()` it."""

    def __init__(self, answer: Callable[[dict], str]):
        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    content = answer(json.loads(body) if body else {})
                except (ValueError, KeyError, IndexError, TypeError):
                    content = "unreadable request"
                data = json.dumps({"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ChatEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
