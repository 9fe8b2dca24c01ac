"""OpenAI-compatible chat-completions backend (OpenAI, vLLM, Ollama, LM Studio) with a bounded thread pool.

Images travel as base64 JPEG ``image_url`` data URLs. Each request retries with exponential backoff on 429, 5xx,
timeouts, dropped connections, malformed JSON and empty answers, honouring ``Retry-After``. The API key is read from
the environment variable named by ``api_key_env`` and registered with the secret scrubber (``training.secret_scrubber``),
so it never reaches a log, a progress record or the report, even when a server echoes it into an answer.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from lens_core.image_io import BadImageError

from ...secret_scrubber import register_secret, scrub
from .base import BackendUnavailableError, CaptionJob, CaptionOutcome

if TYPE_CHECKING:
    from ..config import RecaptionConfig

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUSES = {401: "unauthorized (check the key)", 403: "forbidden", 404: "not found (check base_url and model)"}
MAX_BACKOFF_SECONDS = 120.0


class RetryableError(Exception):
    """A failure worth another try; ``retry_after`` is the server's requested wait, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ItemError(Exception):
    """A failure that another try would repeat (e.g. HTTP 400 for this image)."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def encode_image(image) -> str:
    """A ``data:image/jpeg;base64,...`` URL for a PIL image (JPEG keeps requests small)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def answer_text(body: bytes) -> str:
    """The assistant text of a chat-completions response; ``RetryableError`` for malformed or empty answers."""
    try:
        message = json.loads(body)["choices"][0]["message"]
        content = message.get("content") or ""
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError):
        # Scrub before cutting: an excerpt that ends inside an echoed key must not keep its first characters.
        excerpt = scrub(body.decode("utf-8", "replace"))[:120]
        raise RetryableError(f"malformed response (not chat-completions JSON): {excerpt!r}") from None
    if isinstance(content, list):  # some servers return content parts
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str) or not content.strip():
        raise RetryableError("empty answer from the server")
    return content.strip()


@dataclass
class OpenAIBackend:
    """Captions through ``POST {base_url}/chat/completions`` with ``concurrency`` requests in flight."""

    base_url: str
    model: str
    api_key_env: str
    concurrency: int = 4
    request_timeout: float = 120.0
    max_retries: int = 5
    retry_base_delay: float = 1.0
    max_new_tokens: int = 320
    temperature: float = 0.2
    name: str = "openai"

    @classmethod
    def from_config(cls, config: RecaptionConfig) -> OpenAIBackend:
        fields = ("base_url", "model", "api_key_env", "concurrency", "request_timeout", "max_retries")
        extra = ("retry_base_delay", "max_new_tokens", "temperature")
        return cls(**{name: getattr(config, name) for name in fields + extra})

    def __post_init__(self) -> None:
        # Read once, keep private; local servers (vLLM, Ollama) usually need no key at all.
        self._api_key = os.environ.get(self.api_key_env, "")
        register_secret(self._api_key)
        if not self._api_key:
            logger.info("environment variable %s is not set: sending requests without an API key", self.api_key_env)
        self._connection_failures = 0  # images in a row lost to connection errors; shared by the workers
        self._failures_lock = threading.Lock()

    def redact(self, text: str) -> str:
        """``text`` with the API key (and any other registered secret) replaced, so no error message can leak it."""
        return scrub(text)

    # ------------------------------------------------------------------ one HTTP request
    def _post(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            f"{self.base_url.rstrip('/')}/chat/completions", payload, headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                return answer_text(response.read())
        except urllib.error.HTTPError as error:
            detail = self.redact(error.read(300).decode("utf-8", "replace")) if error.fp else ""
            message = f"HTTP {error.code}: {detail.strip()[:200]}"
            if error.code in FATAL_STATUSES:
                raise BackendUnavailableError(f"server answered {FATAL_STATUSES[error.code]}; {message}") from None
            if error.code in RETRY_STATUSES:
                raise RetryableError(message, parse_retry_after(error.headers.get("Retry-After"))) from None
            raise ItemError(message) from None
        except TimeoutError:
            raise RetryableError(f"no answer within {self.request_timeout:g} s (timeout)") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise RetryableError(f"no answer within {self.request_timeout:g} s (timeout)") from None
            raise RetryableError(f"connection failed: {self.redact(str(reason))}") from None

    def _backoff(self, attempt: int, error: RetryableError) -> float:
        if error.retry_after is not None:
            return min(error.retry_after, MAX_BACKOFF_SECONDS)
        # Exponential with jitter so eight workers hit by the same 429 do not all come back at once.
        return min(self.retry_base_delay * 2**attempt * random.uniform(0.75, 1.25), MAX_BACKOFF_SECONDS)

    def caption_one(self, job: CaptionJob) -> CaptionOutcome:
        """Caption one job with retries; never raises except ``BackendUnavailableError``."""
        started = time.monotonic()
        try:
            image_url = encode_image(job.load_image())
        except BadImageError as error:
            return CaptionOutcome(job, error=error.reason, attempts=0)
        content = [{"type": "text", "text": job.prompt}, {"type": "image_url", "image_url": {"url": image_url}}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        body.update(max_tokens=self.max_new_tokens, temperature=self.temperature)
        payload = json.dumps(body).encode("utf-8")
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            try:
                caption = self._post(payload)
                with self._failures_lock:
                    self._connection_failures = 0
                return CaptionOutcome(job, caption=caption, attempts=attempt + 1, seconds=time.monotonic() - started)
            except ItemError as error:
                return CaptionOutcome(job, error=str(error), attempts=attempt + 1, seconds=time.monotonic() - started)
            except RetryableError as error:
                last_error = str(error)
                if attempt < self.max_retries:
                    delay = self._backoff(attempt, error)
                    logger.debug("%s: %s; retry %d in %.2f s", job.key, last_error, attempt + 1, delay)
                    time.sleep(delay)
        if last_error.startswith("connection failed"):
            with self._failures_lock:
                self._connection_failures += 1
        return CaptionOutcome(
            job,
            error=f"gave up after {self.max_retries + 1} attempts: {last_error}",
            attempts=self.max_retries + 1,
            seconds=time.monotonic() - started,
        )

    # ------------------------------------------------------------------ many jobs
    def caption_many(self, jobs: Iterable[CaptionJob]) -> Iterator[CaptionOutcome]:
        """Run jobs with at most ``concurrency`` in flight (so a kill loses only those), yielding as they finish."""
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="recaption-http")
        pending: set[Future] = set()
        try:
            for job in jobs:
                pending.add(pool.submit(self.caption_one, job))
                while len(pending) >= self.concurrency:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from self._results(finished)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from self._results(finished)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _results(self, finished: set[Future]) -> Iterator[CaptionOutcome]:
        for future in finished:
            yield future.result()  # re-raises BackendUnavailableError
        # Server down: after this many images failed only on connections, stop instead of trying every image.
        if self._connection_failures >= max(3, self.concurrency):
            raise BackendUnavailableError(
                f"server at {self.base_url} is unreachable: {self._connection_failures} images failed to connect"
            )

    def close(self) -> None:
        """Nothing to release: connections are per request."""
