"""Talk to a Gradio app over plain HTTP, the way an attacker without gradio_client would: log in, read /config, call
any event by its function index (private ones too), follow the queue's server-sent events, upload files."""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx

API = "gradio_api/"


@dataclass
class Outcome:
    """What one call came to: `success`, the outputs (`data`) or the error message (`error`)."""

    success: bool
    data: list | None = None
    error: str | None = None
    status: int = 200


class RawGradio:
    def __init__(self, url: str, user: str | None = None, password: str | None = None, timeout_s: float = 120):
        self.http = httpx.Client(base_url=url, timeout=timeout_s)
        self.session_hash = secrets.token_hex(6)
        if user:
            response = self.login(user, password)
            assert response.status_code == 200, response.text
        self.config = self.http.get("config").json()

    def login(self, user: str, password: str) -> httpx.Response:
        return self.http.post("login", data={"username": user, "password": password})

    def dependency(self, api_name: str) -> dict:
        """The /config entry of the event called `api_name` (for private events: their function's name)."""
        matches = [dep for dep in self.config["dependencies"] if dep.get("api_name") == api_name]
        assert len(matches) == 1, f"{api_name!r}: {len(matches)} dependencies"
        return matches[0]

    def component(self, component_id: int) -> dict:
        return next(c for c in self.config["components"] if c["id"] == component_id)

    def upload(self, path: Path, name: str | None = None) -> dict:
        """Upload a file as the browser does; returns the FileData payload an event takes."""
        with path.open("rb") as stream:
            response = self.http.post(API + "upload", files={"files": (name or path.name, stream)})
        response.raise_for_status()
        (stored,) = response.json()
        return {"path": stored, "orig_name": name or path.name, "meta": {"_type": "gradio.FileData"}}

    def call(self, api_name: str | int, data: list, *, session_hash: str | None = None) -> Outcome:
        """Run one event with raw `data` (one value per input, States included as None) and wait for its end."""
        dep = self.config["dependencies"][api_name] if isinstance(api_name, int) else self.dependency(api_name)
        body = {"data": data, "fn_index": dep["id"], "session_hash": session_hash or self.session_hash}
        if not dep["queue"]:
            response = self.http.post(API + "run/predict", json=body)
            payload = response.json()
            if response.status_code != 200:
                return Outcome(False, error=payload.get("error"), status=response.status_code)
            return Outcome(True, data=payload.get("data"))
        joined = self.http.post(API + "queue/join", json=body)
        if joined.status_code != 200:
            return Outcome(False, error=joined.json().get("detail"), status=joined.status_code)
        return self.follow(joined.json()["event_id"], body["session_hash"])

    def follow(self, event_id: str, session_hash: str | None = None) -> Outcome:
        """Read the queue's event stream until `event_id` completes."""
        return self.follow_all([event_id], session_hash)[0]

    def follow_all(self, event_ids: list[str], session_hash: str | None = None) -> list[Outcome]:
        """Read one event stream until every event of `event_ids` completes (one stream per session at a time:
        a second one would miss the messages the first already took)."""
        outcomes: dict[str, Outcome] = {}
        with contextlib.closing(self.messages(session_hash or self.session_hash)) as messages:
            for message in messages:
                if message.get("event_id") in event_ids and message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    success = bool(message.get("success"))
                    outcomes[message["event_id"]] = Outcome(
                        success,
                        data=output.get("data") if success else None,
                        error=None if success else output.get("error"),
                    )
                    if len(outcomes) == len(event_ids):
                        return [outcomes[event_id] for event_id in event_ids]
        raise AssertionError(f"the stream ended before {set(event_ids) - set(outcomes)} completed")

    def messages(self, session_hash: str):
        with self.http.stream("GET", API + "queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    yield message
                    if message.get("msg") == "close_stream":
                        return

    def join(self, api_name: str, data: list, *, session_hash: str | None = None) -> str:
        """Queue an event without waiting; returns its event id."""
        dep = self.dependency(api_name)
        body = {"data": data, "fn_index": dep["id"], "session_hash": session_hash or self.session_hash}
        response = self.http.post(API + "queue/join", json=body)
        response.raise_for_status()
        return response.json()["event_id"]
