"""Login throttling: after 5 failed logins, each further try must wait twice as long as the one before.

Counted per (login name, client address) and, with a higher threshold, per client address across all names (password
spraying). While a key waits, its logins are refused with HTTP 429 and a Retry-After header *before* the password is
looked at, so even the right password is refused until the wait is over; a successful login clears its counter.
An ASGI middleware around Gradio's `POST /login` (Gradio's `auth=` callable never sees the client address).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import parse_qs

logger = logging.getLogger(__name__)

MAX_LOGIN_BODY = 16 * 1024  # a login form is a few hundred bytes


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class LoginThrottle:
    """The failure counters and the waiting rule (no I/O: the middleware below asks and reports)."""

    def __init__(
        self,
        free_failures: int = 5,
        address_free_failures: int = 20,
        base_delay_s: float = 1.0,
        max_delay_s: float = 900.0,
        clock=time.monotonic,
        capacity: int = 100_000,
    ):
        self.free_failures, self.address_free_failures = free_failures, address_free_failures
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self.clock = clock
        self.capacity = capacity
        self._failures: OrderedDict[tuple, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def _keys(self, user: str, address: str) -> list[tuple[tuple, int]]:
        return [
            (("user", user.lower(), address), self.free_failures),
            (("address", address), self.address_free_failures),
        ]

    def _delay(self, failures: _Failures, free: int) -> float:
        if failures.count < free:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** (failures.count - free))

    def wait_s(self, user: str, address: str) -> float:
        """Seconds this login must still wait (0: it may try now)."""
        now = self.clock()
        with self._lock:
            waits = [
                failures.last + self._delay(failures, free) - now
                for key, free in self._keys(user, address)
                if (failures := self._failures.get(key)) is not None
            ]
        return max([0.0, *waits])

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key, _ in self._keys(user, address):
                failures = self._failures.setdefault(key, _Failures())
                failures.count, failures.last = failures.count + 1, now
                self._failures.move_to_end(key)
            while len(self._failures) > self.capacity:
                self._failures.popitem(last=False)
        logger.warning("Failed login for %r from %s", user[:64], address)

    def succeeded(self, user: str, address: str) -> None:
        with self._lock:
            self._failures.pop(self._keys(user, address)[0][0], None)


class LoginThrottleMiddleware:
    """ASGI middleware: throttles `POST .../login` with a `LoginThrottle`; every other request passes untouched."""

    def __init__(self, app, throttle: LoginThrottle):
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope.get("type") != "http" or scope.get("method") != "POST" or not path.endswith("/login"):
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if not complete:
            await _respond(send, 413, {"detail": "The login form is too large."})
            return
        user = (parse_qs(body.decode("utf-8", "replace")).get("username") or [""])[0].strip()
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_s(user, address)
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            detail = f"Too many failed logins: try again in {seconds} s."
            await _respond(send, 429, {"detail": detail}, [(b"retry-after", str(seconds).encode())])
            return
        status: dict = {}

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, replay, watch)
        if status.get("code") == 200:
            self.throttle.succeeded(user, address)
        elif status.get("code") in (400, 401, 403):
            self.throttle.failed(user, address)


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_LOGIN_BODY:
            return b"", False
        if not message.get("more_body"):
            return b"".join(chunks), True


async def _respond(send, code: int, payload: dict, headers: list | None = None) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
