"""The secret scrubber: every text the long jobs write (progress records, reports, logs) passes through it.

A secret (an API key read from the environment) is registered once, when it is read; `scrub` then replaces it in any
text, including an excerpt cut off in the middle of the key (a server that echoes the `Authorization` header into a
malformed answer, of which 120 characters are quoted). Registration is process-wide on purpose: a key read by one
worker thread must be hidden in what every other thread writes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 8  # shorter values would redact ordinary words
MATCH_PREFIX = 8  # a cut-off key is recognised by at least its first 8 characters
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Hide `value` in everything scrubbed from now on (values shorter than 8 characters are not secrets)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _lock:
            _secrets.add(value)


def _redact(text: str, secret: str) -> str:
    # Every run of text that starts like the secret (its first 8 characters) and goes on matching it is replaced:
    # the whole key, and a key cut off anywhere after those 8 characters (an excerpt, a repr with a closing quote).
    probe = secret[:MATCH_PREFIX]
    pieces, start = [], 0
    while (index := text.find(probe, start)) != -1:
        length = len(probe)
        while length < len(secret) and index + length < len(text) and text[index + length] == secret[length]:
            length += 1
        pieces += [text[start:index], REDACTED]
        start = index + length
    return "".join(pieces) + text[start:]


def scrub(text: str) -> str:
    """`text` with every registered secret, whole or cut off after its first 8 characters, replaced by [redacted]."""
    if not _secrets or not isinstance(text, str):
        return text
    for secret in sorted(_secrets, key=len, reverse=True):
        text = _redact(text, secret)
    return text


def scrub_value(value: Any) -> Any:
    """`scrub` applied to every string inside nested dicts, lists and tuples (keys too)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_value(key): scrub_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(item) for item in value)
    return value


class ScrubbingFilter(logging.Filter):
    """A logging filter that scrubs the formatted message and any traceback text before a handler writes them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def install_log_scrubber(logger: logging.Logger | None = None) -> None:
    """Attach `ScrubbingFilter` to every handler of `logger` (default: the root logger), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(existing, ScrubbingFilter) for existing in handler.filters):
            handler.addFilter(ScrubbingFilter())
