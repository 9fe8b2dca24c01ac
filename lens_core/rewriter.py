"""The prompt rewriter (LENS_SPEC section 7): turn a short prompt into one concrete, faithful, visual prompt.

Two backends with one method, `rewrite(prompt) -> str`:
- `OpenAICompatibleRewriter`: any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, llama.cpp, Ollama...).
  The API key is read from the environment variable the settings name, at call time, and is never logged.
- `LocalGptOssRewriter`: the checkpoint's own GPT-OSS (`text_encoder/`) loaded as transformers' `GptOssForCausalLM`
  on first use, generating with low reasoning effort and keeping only the final-channel message. It needs the memory
  of the full encoder (with its LM head) besides the resident pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REWRITE_INSTRUCTION = (
    "You rewrite short image requests into one prompt for a text-to-image model. Keep every object, attribute, "
    "count, relation, text and setting the user gave; add only visual detail consistent with it: colours, materials, "
    "lighting, composition, background, style. When there are several similar subjects, describe each one "
    "distinctly. Turn simple inferences into explicit visuals (say what is seen, not what it means). Answer in the "
    "user's language, as one paragraph of plain prose: no lists, no markup, no quotes, no preamble."
)
BACKENDS = ("openai", "local")
MAX_PROMPT_CHARS = 2000
_FINAL_MESSAGE = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?:<\|return\|>|<\|end\|>|<\|call\|>|$)", re.S)


class RewriterError(RuntimeError):
    """The backend could not produce a rewrite; the message says why (never contains the API key)."""


@dataclass
class RewriterSettings:
    """Where rewrites come from. Server-side settings: a user of the page cannot point the key at another host."""

    backend: str = "openai"  # "openai" or "local"
    base_url: str = "https://api.openai.com/v1"  # OpenAI-compatible API root (the part before /chat/completions)
    model: str = "gpt-4.1-mini"  # model name the endpoint knows
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key ("" for none)
    timeout_s: float = 60.0
    max_new_tokens: int = 512  # local backend: reasoning plus the final answer

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown rewriter backend {self.backend!r}; choose one of {list(BACKENDS)}.")
        if not re.match(r"^https?://[^\s/]+", self.base_url):
            raise ValueError(f"Rewriter base URL must start with http:// or https://, got {self.base_url!r}.")
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, got {self.api_key_env!r}.")
        if not self.timeout_s > 0 or self.max_new_tokens < 1:
            raise ValueError(
                f"timeout_s and max_new_tokens must be positive, got {self.timeout_s}, {self.max_new_tokens}."
            )


def check_prompt(prompt: str) -> str:
    """The prompt to rewrite, stripped; rejects empty or oversized text."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("The prompt is empty: write a few words to rewrite.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt has {len(prompt)} characters; the rewriter takes at most {MAX_PROMPT_CHARS}.")
    return prompt.strip()


def clean_rewrite(text: str) -> str:
    """One plain paragraph: surrounding quotes and whitespace removed, lines joined. Empty output is an error."""
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    text = text.strip().strip('"“”').strip()
    if not text:
        raise RewriterError("The rewriter returned an empty prompt.")
    return text


class OpenAICompatibleRewriter:
    """Rewrites through `POST {base_url}/chat/completions` (standard library HTTP: no extra package)."""

    def __init__(self, settings: RewriterSettings):
        self.settings = settings

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        name = self.settings.api_key_env
        if name:
            key = os.environ.get(name)
            if not key:
                raise RewriterError(f"The environment variable {name} (the rewriter's API key) is not set.")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def rewrite(self, prompt: str) -> str:
        prompt = check_prompt(prompt)
        body = {
            "model": self.settings.model,
            "messages": [{"role": "system", "content": REWRITE_INSTRUCTION}, {"role": "user", "content": prompt}],
            "temperature": 0.7,
        }
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:300]
            raise RewriterError(f"The rewriter endpoint {url} answered HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            raise RewriterError(f"Cannot reach the rewriter endpoint {url}: {error}") from None
        except json.JSONDecodeError:
            raise RewriterError(f"The rewriter endpoint {url} did not answer JSON.") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewriterError(f"The rewriter endpoint {url} answered without choices[0].message.content.") from None
        return clean_rewrite(str(content))


def extract_final_message(generated: str) -> str:
    """The final-channel message of a harmony-format completion (analysis and commentary are dropped)."""
    matches = _FINAL_MESSAGE.findall(generated)
    if not matches:
        raise RewriterError("The local model produced no final-channel answer (only reasoning); try again.")
    return clean_rewrite(matches[-1])


class LocalGptOssRewriter:
    """Rewrites with the checkpoint's GPT-OSS, loaded from `<checkpoint>/text_encoder/` on first use."""

    def __init__(
        self, checkpoint_folder: str | Path, settings: RewriterSettings, device: str = "cpu", torch_dtype=None
    ):
        self.folder = Path(checkpoint_folder)
        self.settings = settings
        self.device = device
        self.torch_dtype = torch_dtype
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        import torch
        from transformers import GptOssForCausalLM, PreTrainedTokenizerFast

        if not (self.folder / "text_encoder" / "config.json").is_file():
            raise RewriterError(f"{self.folder} has no text_encoder/ folder to load GPT-OSS from.")
        logger.info("Loading GPT-OSS from %s for prompt rewriting", self.folder / "text_encoder")
        dtype = self.torch_dtype or (torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32)
        self._model = (
            GptOssForCausalLM.from_pretrained(self.folder / "text_encoder", dtype=dtype).to(self.device).eval()
        )
        self._tokenizer = PreTrainedTokenizerFast.from_pretrained(self.folder / "tokenizer")

    def rewrite(self, prompt: str) -> str:
        import torch

        prompt = check_prompt(prompt)
        if self._model is None:
            self._load()
        messages = [{"role": "system", "content": REWRITE_INSTRUCTION}, {"role": "user", "content": prompt}]
        inputs = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True, reasoning_effort="low"
        ).to(self.device)
        with torch.no_grad():
            output = self._model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False)
        # Keep the special tokens: the channel markers are how the final answer is found.
        generated = self._tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        return extract_final_message("<|start|>assistant" + generated)

    def release(self) -> None:
        """Drop the model (frees its memory)."""
        self._model = None
