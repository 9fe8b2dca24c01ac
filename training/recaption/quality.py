"""Caption quality: word and token counts against the Lens targets, and flags for captions a person should review.

Flags: ``too_long`` (over the 415-token window), ``too_short`` (under 40% of the target), ``repetitive`` (looping
output), ``refusal`` (the model declined) and ``contradicts_original`` (shares none of the original caption's
content words, a cheap stand-in for "names different things").
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

logger = logging.getLogger(__name__)

_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|sorry,|i (?:can ?not|can't|am unable to|won't)|as an ai\b|i apologi[sz]e)"
    r"|\b(?:unable|not able) to (?:see|view|describe|process|help with) (?:the |this )?image",
    re.IGNORECASE,
)
_STOPWORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "of",
        "in",
        "on",
        "at",
        "to",
        "with",
        "for",
        "from",
        "by",
        "is",
        "are",
        "was",
        "were",
        "be",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "there",
        "their",
        "photo",
        "image",
        "picture",
        "stock",
        "close",
        "view",
        "shot",
        "background",
        "foreground",
        "very",
        "some",
    ]
)


class TokenCounter:
    """Counts GPT-OSS tokens with the real tokenizer when one is on disk, else estimates (about 0.75 words/token)."""

    def __init__(self, tokenizer_path: str | None = None) -> None:
        self.tokenizer_path = tokenizer_path

    @cached_property
    def _tokenizer(self):  # loaded on first use only: importing and building cost nothing
        from tokenizers import Tokenizer

        if self.tokenizer_path:
            path = Path(self.tokenizer_path)
            file = path / "tokenizer.json" if path.is_dir() else path
            try:
                return Tokenizer.from_file(str(file))
            except Exception as error:  # noqa: BLE001 - report any load failure as a bad setting
                raise ValueError(
                    f"tokenizer={self.tokenizer_path!r} could not be loaded ({error}); give a folder with tokenizer.json"
                ) from None
        try:  # the Hugging Face cache only: counting tokens must never start a download
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache("openai/gpt-oss-20b", "tokenizer.json")
        except Exception:  # noqa: BLE001 - no hub library or unreadable cache: estimate
            cached = None
        if isinstance(cached, str):
            return Tokenizer.from_file(cached)
        logger.info("GPT-OSS tokenizer not in the local cache; token counts are estimates")
        return None

    @property
    def exact(self) -> bool:
        """True when counts come from the real tokenizer."""
        return self._tokenizer is not None

    def count(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        # o200k averages about 1.3 tokens per English word; punctuation marks are tokens of their own.
        return round(len(text.split()) * 1.3 + len(re.findall(r"[^\w\s]", text)) * 0.5)


def is_repetitive(words: list[str]) -> bool:
    """True for looping output: a 4-word phrase that repeats 3+ times, or very few distinct words in a long text."""
    lowered = [word.lower().strip(".,;:!?\"'") for word in words]
    grams = Counter(tuple(lowered[i : i + 4]) for i in range(len(lowered) - 3))
    if grams and grams.most_common(1)[0][1] >= 3:
        return True
    return len(lowered) >= 30 and len(set(lowered)) / len(lowered) < 0.3


def content_words(text: str) -> set[str]:
    """Lowercase words of 3+ letters that are not stopwords, with a plural 's' removed."""
    words = {word.lower() for word in re.findall(r"[A-Za-z]{3,}", text)}
    return {word[:-1] if word.endswith("s") and len(word) > 3 else word for word in words} - _STOPWORDS


@dataclass
class CaptionQuality:
    """Counts and flags for one caption."""

    words: int
    tokens: int
    flags: list[str] = field(default_factory=list)


def assess(
    caption: str, *, original: str, target_words: int, token_limit: int, counter: TokenCounter
) -> CaptionQuality:
    """Measure ``caption`` and flag anything a reviewer should look at."""
    words = caption.split()
    quality = CaptionQuality(words=len(words), tokens=counter.count(caption))
    if quality.tokens > token_limit:
        quality.flags.append("too_long")
    if quality.words < 0.4 * target_words:
        quality.flags.append("too_short")
    if is_repetitive(words):
        quality.flags.append("repetitive")
    if _REFUSAL.search(caption):
        quality.flags.append("refusal")
    original_words = content_words(original)
    if len(original_words) >= 2 and not original_words & content_words(caption):
        quality.flags.append("contradicts_original")
    return quality


def default_counter(tokenizer: str | None) -> TokenCounter:
    """A counter for ``tokenizer`` (a folder) or the cached GPT-OSS tokenizer; checks the folder exists."""
    if tokenizer and not Path(tokenizer).exists():
        raise ValueError(f"tokenizer={tokenizer!r} does not exist; give a local folder with tokenizer.json")
    return TokenCounter(tokenizer)
