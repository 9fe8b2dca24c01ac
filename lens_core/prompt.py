"""Prompt rendering and tokenization for the GPT-OSS text encoder, byte for byte as the official pipeline does it.

The official pipeline renders the GPT-OSS chat template (a system message, the Lens instruction, the user prompt and an
assistant turn with fixed thinking) and cuts it at `<|return|>`. The result is always PREFIX + prompt + SUFFIX, so we
write those two strings out instead of running a Jinja template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .presets import DEFAULT_MAX_SEQUENCE_LENGTH, DEFAULT_PROMPT_DATE, DEFAULT_PROMPT_TRUNCATION, PROMPT_TRUNCATIONS

PREFIX_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "Current date: {date}\n\n"
    "Reasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>developer<|message|># Instructions\n\n"
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background.\n\n<|end|>"
    "<|start|>user<|message|>"
)
SUFFIX = (
    "<|end|><|start|>assistant<|channel|>analysis<|message|>"
    "Need to generate one image according to the description.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>"
)

# Harmony control markers such as <|start|> or <|end|>; a prompt must not be able to forge template blocks.
CONTROL_MARKER = re.compile(r"<\|[^<>|]*\|>")
PAD_TOKEN = "<|endoftext|>"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def render_prefix(date: str = DEFAULT_PROMPT_DATE) -> str:
    """The fixed preamble before the user's text; `date` is YYYY-MM-DD (always 10 characters)."""
    if not isinstance(date, str) or not _DATE.match(date):
        raise ValueError(f"prompt date must be YYYY-MM-DD, got {date!r}.")
    return PREFIX_TEMPLATE.format(date=date)


def clean_prompt(prompt: str, strip_control_markers: bool = True) -> str:
    """Remove harmony control markers from user text (the only change made to a prompt). With
    `strip_control_markers=False` the text is kept as it is, as upstream does (a prompt can then forge template
    blocks)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}.")
    return CONTROL_MARKER.sub("", prompt) if strip_control_markers else prompt


def render_prompt(prompt: str, date: str = DEFAULT_PROMPT_DATE, strip_control_markers: bool = True) -> str:
    """The full text the encoder reads: PREFIX + cleaned prompt + SUFFIX."""
    return render_prefix(date) + clean_prompt(prompt, strip_control_markers) + SUFFIX


@dataclass
class TokenizedPrompts:
    """Right-padded token ids for a batch of rendered prompts.

    `prefix_length` tokens at the start of every row are the preamble: they run through the encoder as context and are
    then dropped from the features. `truncated` says, per prompt, whether its text was cut to fit.
    """

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64, 1 = real token
    prefix_length: int
    truncated: list[bool]


def pad_token_id(tokenizer) -> int:
    """The pad id: the tokenizer's pad token, else `<|endoftext|>` (what Lens pads with, id 199999 in GPT-OSS)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"The tokenizer has no pad token and no {PAD_TOKEN}; is it the GPT-OSS (harmony) tokenizer?")
    return token_id


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_prompts(
    tokenizer,
    prompts: list[str],
    date: str = DEFAULT_PROMPT_DATE,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    truncation: str = DEFAULT_PROMPT_TRUNCATION,
    strip_control_markers: bool = True,
) -> TokenizedPrompts:
    """Tokenize PREFIX + prompt + SUFFIX for each prompt, at most `max_sequence_length` tokens per row.

    `truncation="prompt"` (ours) cuts only the prompt, so SUFFIX (the template's end) is always kept;
    `truncation="text"` cuts the whole rendered text, as upstream does (a long prompt then loses SUFFIX).
    Every control marker is an added special token, so the three segments tokenize independently: ids of the
    concatenation equal the concatenation of ids, which is what upstream gets from tokenizing the whole string.
    """
    if truncation not in PROMPT_TRUNCATIONS:
        raise ValueError(f"truncation must be one of {PROMPT_TRUNCATIONS}, got {truncation!r}.")
    prefix_ids = _encode(tokenizer, render_prefix(date))
    suffix_ids = _encode(tokenizer, SUFFIX)
    fixed = len(prefix_ids) + (len(suffix_ids) if truncation == "prompt" else 0)
    if max_sequence_length - fixed < 1:
        raise ValueError(
            f"max_sequence_length={max_sequence_length} leaves no room for the prompt: the fixed preamble"
            f"{' and suffix take' if truncation == 'prompt' else ' takes'} {fixed} tokens; use at least {fixed + 1}."
        )
    pad_id = pad_token_id(tokenizer)

    rows, truncated = [], []
    for prompt in prompts:
        prompt_ids = _encode(tokenizer, clean_prompt(prompt, strip_control_markers))
        if truncation == "prompt":
            budget = max_sequence_length - fixed
            truncated.append(len(prompt_ids) > budget)
            rows.append(prefix_ids + prompt_ids[:budget] + suffix_ids)
        else:
            row = prefix_ids + prompt_ids + suffix_ids
            truncated.append(len(row) > max_sequence_length)
            rows.append(row[:max_sequence_length])
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, S]
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return TokenizedPrompts(input_ids, attention_mask, len(prefix_ids), truncated)
