"""A local OpenAI-compatible chat-completions server for tests, the benchmark and offline demos.

It answers every request with a deterministic dense caption after ``latency`` seconds, and can inject faults: a
``fault_cycle`` of answers ('ok', '429', '500', 'timeout', 'garbage', 'empty') that each image walks through on its own
(the n-th request for the same prompt and image gets ``fault_cycle[n % len]``, so what an image meets does not depend
on how the requests of other images interleave), and a ``fail_marker`` that makes every request whose prompt contains
it fail with HTTP 500. ``max_in_flight`` records the most requests it served at once. Run it on its own from the
repository root with ``python -m tests.recaption.fake_server --port 8000 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

FAULTS = ("ok", "429", "500", "timeout", "garbage", "empty")
_WORDS = [
    "A",
    "round",
    "red",
    "ceramic",
    "mug",
    "with",
    "a",
    "glossy",
    "glaze",
    "stands",
    "on",
    "a",
    "pale",
    "oak",
    "table",
    "beside",
    "two",
    "small",
    "green",
    "apples.",
    "The",
    "mug",
    "has",
    "a",
    "curved",
    "handle",
    "on",
    "its",
    "right",
    "side",
    "and",
    "a",
    "thin",
    "white",
    "rim,",
    "and",
    "soft",
    "daylight",
    "from",
    "a",
    "window",
    "on",
    "the",
    "left",
    "casts",
    "a",
    "short",
    "grey",
    "shadow",
    "across",
    "the",
    "fine",
    "wood",
    "grain.",
    "Behind",
    "the",
    "table",
    "a",
    "plain",
    "cream",
    "wall",
    "fills",
    "the",
    "upper",
    "half",
    "of",
    "the",
    "frame,",
    "and",
    "a",
    "folded",
    "blue",
    "linen",
    "napkin",
    "with",
    "striped",
    "edges",
    "lies",
    "flat",
    "in",
    "the",
    "lower",
    "left",
    "corner.",
    "Black",
    "block",
    "letters",
    "on",
    "the",
    "mug",
    "read",
    "MORNING",
    "in",
    "capitals,",
    "centred",
    "under",
    "the",
    "rim.",
    "The",
    "apples",
    "are",
    "smooth",
    "and",
    "shiny,",
    "one",
    "slightly",
    "larger",
    "than",
    "the",
    "other,",
    "touching",
    "each",
    "other",
    "near",
    "the",
    "base",
    "of",
    "the",
    "mug.",
]


def fake_caption(prompt: str, image_url: str = "") -> str:
    """A ~110-word caption, stable per prompt and image; it repeats any quoted alt-text so it never contradicts it."""
    digest = hashlib.sha256((prompt + image_url).encode()).hexdigest()
    words = [f"Scene {digest[:6]}:", *_WORDS]
    hint = prompt.split('alt-text was: "', 1)[1].split('"', 1)[0] if 'alt-text was: "' in prompt else ""
    return " ".join(words) + (f" The scene also shows {hint}." if hint else "")


@dataclass
class FakeServerSettings:
    """How the fake server behaves."""

    latency: float = 0.0  # seconds added to every answer
    fault_cycle: list[str] = field(default_factory=lambda: ["ok"])  # answers per image, repeating
    fail_marker: str | None = None  # prompts containing this always get HTTP 500
    timeout_seconds: float = 3.0  # how long a 'timeout' answer stalls
    retry_after: str = "0"  # the Retry-After header sent with 429
    echo_authorization: bool = False  # put the Authorization header in error bodies (tests key redaction)
    gather: int = 0  # hold the first requests until this many are in flight at once (tests concurrency without clocks)
    gather_timeout: float = 30.0  # ... or until this many seconds have passed


class FakeOpenAIServer:
    """``with FakeOpenAIServer(settings) as server: server.base_url`` -- serves on 127.0.0.1, a free port."""

    def __init__(self, settings: FakeServerSettings | None = None, port: int = 0) -> None:
        self.settings = settings or FakeServerSettings()
        unknown = sorted(set(self.settings.fault_cycle) - set(FAULTS))
        if unknown:
            raise ValueError(f"fault_cycle holds {unknown}; allowed: {', '.join(FAULTS)}")
        self._attempts: dict[str, int] = {}  # requests so far per (prompt, image)
        self._lock = threading.Lock()
        self.requests: list[dict] = []  # one entry per request: fault, authorization, model
        self.in_flight = 0
        self.max_in_flight = 0
        self._gathered = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def next_fault(self, prompt: str, image_url: str = "") -> str:
        """The answer for this request: the next entry of the cycle for this prompt and image."""
        identity = hashlib.sha256((prompt + image_url).encode()).hexdigest()
        with self._lock:
            attempt = self._attempts.get(identity, 0)
            self._attempts[identity] = attempt + 1
        if self.settings.fail_marker and self.settings.fail_marker in prompt:
            return "500"
        return self.settings.fault_cycle[attempt % len(self.settings.fault_cycle)]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet: tests read their own output
                logger.debug(format, *args)

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.rfile.read(length)
                    self._send(404, b'{"error": {"message": "unknown endpoint"}}')
                    return
                try:
                    request = json.loads(self.rfile.read(length))
                    prompt = request["messages"][0]["content"][0]["text"]
                    image = request["messages"][0]["content"][1]["image_url"]["url"]
                except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                    self._send(400, b'{"error": {"message": "bad request"}}')
                    return
                fault = server.next_fault(prompt, image)
                with server._lock:
                    server.requests.append(
                        {
                            "fault": fault,
                            "authorization": self.headers.get("Authorization"),
                            "model": request.get("model"),
                            "image_prefix": image[:23],
                        }
                    )
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    if server.in_flight >= server.settings.gather:
                        server._gathered.set()
                try:
                    server._gathered.wait(server.settings.gather_timeout)
                    time.sleep(server.settings.latency)
                    server.answer(self, fault, prompt, image)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler

    def answer(self, handler, fault: str, prompt: str, image_url: str) -> None:
        """Send the answer ``fault`` asks for."""
        auth = handler.headers.get("Authorization", "") if self.settings.echo_authorization else ""
        if fault == "429":
            handler._send(
                429,
                json.dumps({"error": {"message": f"rate limited {auth}"}}).encode(),
                {"Retry-After": self.settings.retry_after},
            )
        elif fault == "500":
            handler._send(500, json.dumps({"error": {"message": f"internal error {auth}"}}).encode())
        elif fault == "timeout":
            time.sleep(self.settings.timeout_seconds)
            handler._send(504, b'{"error": "too slow"}')
        elif fault == "garbage":
            # With echo_authorization the key sits where a 120-character excerpt of the answer cuts it in two.
            handler._send(200, ("<html>{not json at all " + ("x" * 80 + auth if auth else "")).encode())
        else:
            content = "" if fault == "empty" else fake_caption(prompt, image_url)
            body = {
                "id": "fake",
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
            }
            handler._send(200, json.dumps(body).encode())

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main() -> None:
    """Serve until interrupted (for trying the CLI or the tab without a real server)."""
    parser = argparse.ArgumentParser(description="Local fake OpenAI-compatible captioning server.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--faults", nargs="+", default=["ok"], help=f"repeating per-request answers from {FAULTS}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = FakeOpenAIServer(FakeServerSettings(latency=args.latency, fault_cycle=args.faults), port=args.port)
    logger.info("serving on %s", server.base_url)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
