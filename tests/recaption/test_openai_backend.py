"""OpenAI backend details: Retry-After is honoured, answers are parsed strictly, fatal statuses stop the run."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from PIL import Image

from training.recaption.backends.base import BackendUnavailableError, CaptionJob
from training.recaption.backends.openai_backend import OpenAIBackend, RetryableError, answer_text, parse_retry_after

from .fake_server import FakeOpenAIServer, FakeServerSettings

pytestmark = pytest.mark.timeout(60)


def _backend(server: FakeOpenAIServer, **changes) -> OpenAIBackend:
    settings = {
        "base_url": server.base_url,
        "model": "m",
        "api_key_env": "RECAPTION_UNSET_KEY",
        "retry_base_delay": 0.0,
    }
    return OpenAIBackend(**{**settings, **changes})


def _job() -> CaptionJob:
    return CaptionJob(key="k", prompt="Describe.", load_image=lambda: Image.new("RGB", (8, 8), "red"))


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < parse_retry_after(later) <= 30
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_retry_after_is_honoured():
    with FakeOpenAIServer(FakeServerSettings(fault_cycle=["429", "ok"], retry_after="1")) as server:
        started = time.monotonic()
        outcome = _backend(server).caption_one(_job())
        elapsed = time.monotonic() - started
    assert outcome.caption and outcome.attempts == 2
    assert elapsed >= 1.0  # retry_base_delay is 0: only the header can explain the wait


def test_answer_parsing():
    assert answer_text(b'{"choices": [{"message": {"content": "  A cat.  "}}]}') == "A cat."
    assert answer_text(b'{"choices": [{"message": {"content": [{"type": "text", "text": "A dog."}]}}]}') == "A dog."
    for body in (b"<html>", b'{"choices": []}', b'{"choices": [{"message": {"content": ""}}]}'):
        with pytest.raises(RetryableError):
            answer_text(body)


def test_garbage_forever_gives_up_with_reason():
    with FakeOpenAIServer(FakeServerSettings(fault_cycle=["garbage"])) as server:
        outcome = _backend(server, max_retries=2).caption_one(_job())
    assert outcome.caption is None and outcome.attempts == 3
    assert outcome.error.startswith("gave up after 3 attempts: malformed response")


def test_unknown_endpoint_stops_the_run(fake_server):
    backend = _backend(fake_server)
    backend.base_url = fake_server.base_url + "/nothing-here"
    with pytest.raises(BackendUnavailableError, match="not found"):
        list(backend.caption_many([_job()]))
