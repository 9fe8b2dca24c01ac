"""Two real app processes in `shared` mode, shared by the whole security suite:

- `login_app`: `--auth` with two logins (alice is an admin), training allowed, backends from a YAML file;
- `space_app`: what a Hugging Face Space runs (SPACE_ID set, anonymous visitors), with a queue of 2 and no training.

Both run with a canary secret in their environment and a configured endpoint whose key is another secret; an
"attacker" listener records every request that reaches it, so a test can prove no secret left for a client-chosen
URL. Gradio's temporary folder is per app, so tests can check that uploads are cleaned up.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest
from app_server_support import ChatEndpoint, running_app, wait_until_ready

from .raw_gradio import RawGradio

USERS = {"alice": "pw-alice-7", "bob": "pw-bob-7"}
CANARY_ENV = "LENS_SECURITY_CANARY"
ENDPOINT_KEY_ENV = "LENS_SECURITY_ENDPOINT_KEY"
CAPTION = "A small red square on a grey background, seen from the front in flat even light."


@dataclass
class SharedApp:
    """A running app: its URL, output folder, Gradio temp folder, log, and the secrets in its environment."""

    url: str
    output_dir: Path
    temp_dir: Path
    log: Path
    canary: str
    endpoint_key: str
    endpoint: ChatEndpoint
    listener: ChatEndpoint

    def raw(self, user: str | None = None) -> RawGradio:
        """A raw-HTTP client (logged in as `user`)."""
        return RawGradio(self.url, user, USERS.get(user))

    def client(self, user: str | None = None):
        """A fresh gradio_client Client (logged in as `user`)."""
        from gradio_client import Client

        return Client(self.url, auth=(user, USERS[user]) if user else None, verbose=False)

    def secrets_seen_by_listener(self) -> list[dict]:
        return [r for r in self.listener.requests if self.canary in json.dumps(r) or self.endpoint_key in json.dumps(r)]

    @property
    def pid(self) -> int:
        import psutil

        for child in psutil.Process().children(recursive=True):
            command = " ".join(child.cmdline())
            if "app.py" in command and str(self.output_dir) in command:
                return child.pid
        raise AssertionError("the app process is gone")

    def peak_memory_bytes(self) -> int:
        """The app process's peak resident memory so far (VmHWM)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    def workspaces(self) -> Path:
        return self.output_dir / "users"


@pytest.fixture(scope="session")
def endpoints():
    with ChatEndpoint(lambda body: CAPTION) as configured, ChatEndpoint(lambda body: CAPTION) as listener:
        yield configured, listener


def _backends_file(folder: Path, endpoint: ChatEndpoint) -> Path:
    path = folder / "backends.yaml"
    entry = {"base_url": endpoint.url, "model": "test-vlm", "api_key_env": ENDPOINT_KEY_ENV}
    path.write_text(json.dumps({"rewriter": {"house": entry}, "recaption": {"house-vlm": entry}}))  # JSON is YAML
    return path


@pytest.fixture(scope="session")
def login_app(tmp_path_factory, endpoints):
    """`python app.py --shared --auth alice:...,bob:... --admin alice --allow-training --backends FILE`."""
    yield from _start(
        tmp_path_factory.mktemp("login-app"),
        endpoints,
        ["--shared", "--auth", ",".join(f"{u}:{p}" for u, p in USERS.items()), "--admin", "alice", "--allow-training"],
        {},
        users=list(USERS),
    )


@pytest.fixture(scope="session")
def space_app(tmp_path_factory, endpoints):
    """What a Space runs: SPACE_ID set, no logins, `--queue-size 2`; training stays off."""
    yield from _start(tmp_path_factory.mktemp("space-app"), endpoints, ["--queue-size", "2"], {"SPACE_ID": "lens/test"})


def _start(tmp: Path, endpoints, flags: list[str], env: dict, users: list[str] = ()):
    configured, listener = endpoints
    canary, key = f"canary-{secrets.token_hex(8)}", f"sk-endpoint-{secrets.token_hex(8)}"
    temp_dir = tmp / "gradio-temp"
    temp_dir.mkdir()
    environment = {CANARY_ENV: canary, ENDPOINT_KEY_ENV: key, "GRADIO_TEMP_DIR": str(temp_dir), **env}
    flags = [*flags, "--backends", str(_backends_file(tmp, configured))]
    with running_app(tmp, *flags, env=environment) as (url, output_dir):
        app = SharedApp(url, output_dir, temp_dir, tmp / "app.log", canary, key, configured, listener)
        wait_until_ready(app.client(users[0] if users else None))
        yield app


@pytest.fixture(scope="session")
def alice(login_app):
    return login_app.client("alice")


@pytest.fixture(scope="session")
def bob(login_app):
    return login_app.client("bob")
