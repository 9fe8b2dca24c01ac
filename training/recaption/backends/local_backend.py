"""Local vision-language models through transformers ``image-text-to-text`` (Qwen2.5-VL, SmolVLM, LLaVA/JoyCaption...).

Models with a chat template get the prompt as a user turn holding the image; models without one (task-prompt models)
get the prompt text as is. Only the tiny LLaVA-style test model is exercised by the test suite.

Images are captioned in batches with greedy or sampled decoding, on the GPU of this process's rank when there is one.
Memory modes: fp32, fp16, bf16, and 8-bit / 4-bit weights through bitsandbytes (CUDA only).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lens_core.image_io import BadImageError

from .base import CaptionJob, CaptionOutcome

if TYPE_CHECKING:
    from ..config import RecaptionConfig

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:<LOCAL_RANK>`` when CUDA is present (one GPU per process under accelerate), else ``cpu``."""
    import torch

    if device == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r} is not allowed; use auto, cpu, cuda or cuda:N")
    return device


def model_loading_arguments(precision: str, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for a memory mode; raise ``ValueError`` for a mode the device cannot run."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    if precision in ("8bit", "4bit"):
        if not device.startswith("cuda"):
            raise ValueError(f"precision={precision!r} needs a CUDA GPU (bitsandbytes); on {device} use fp32 or bf16")
        from transformers import BitsAndBytesConfig

        quantization = (
            BitsAndBytesConfig(load_in_8bit=True)
            if precision == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        )
        return {"quantization_config": quantization, "device_map": {"": device}}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return {"dtype": dtypes[precision]}


@dataclass
class LocalBackend:
    """A transformers ``AutoModelForImageTextToText`` plus its processor, captioning ``batch_size`` images per call."""

    model_path: str
    batch_size: int = 4
    precision: str = "auto"
    device: str = "auto"
    max_new_tokens: int = 320
    temperature: float = 0.0
    name: str = "local"

    @classmethod
    def from_config(cls, config: RecaptionConfig) -> LocalBackend:
        return cls(
            config.model, config.batch_size, config.precision, config.device, config.max_new_tokens, config.temperature
        )

    def __post_init__(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(self.device)
        arguments = model_loading_arguments(self.precision, self.device)
        logger.info("loading %s on %s (%s)", self.model_path, self.device, self.precision)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        # Decoder-only generation needs left padding so every row's answer starts at the same column.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, **arguments)
        if "device_map" not in arguments:
            self.model.to(self.device)
        self.model.eval()

    def _render(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt  # task-prompt models (Florence-2 style) take the text as is

    def _generate(self, jobs: list[CaptionJob], images: list) -> list[str]:
        import torch

        texts = [self._render(job.prompt) for job in jobs]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        sampling = (
            {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        )
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        answers = output[:, inputs["input_ids"].shape[1] :]  # [batch, new_tokens]: drop the prompt columns
        return [text.strip() for text in self.processor.batch_decode(answers, skip_special_tokens=True)]

    def _run_batch(self, batch: list[CaptionJob]) -> Iterator[CaptionOutcome]:
        started = time.monotonic()
        ready: list[CaptionJob] = []
        images = []
        for job in batch:
            try:
                images.append(job.load_image())
                ready.append(job)
            except BadImageError as error:
                yield CaptionOutcome(job, error=error.reason, attempts=0)
        if not ready:
            return
        try:
            answers = self._generate(ready, images)
        except (RuntimeError, ValueError) as error:  # e.g. CUDA out of memory for this batch
            for job in ready:
                yield CaptionOutcome(job, error=f"generation failed: {error}", seconds=time.monotonic() - started)
            return
        seconds = (time.monotonic() - started) / len(ready)
        for job, answer in zip(ready, answers, strict=True):
            if answer:
                yield CaptionOutcome(job, caption=answer, seconds=seconds)
            else:
                yield CaptionOutcome(job, error="empty answer from the model", seconds=seconds)

    def caption_many(self, jobs: Iterable[CaptionJob]) -> Iterator[CaptionOutcome]:
        """Caption in batches of ``batch_size``; a batch is the most a kill can lose."""
        batch: list[CaptionJob] = []
        for job in jobs:
            batch.append(job)
            if len(batch) == self.batch_size:
                yield from self._run_batch(batch)
                batch = []
        if batch:
            yield from self._run_batch(batch)

    def close(self) -> None:
        """Release the model (and its GPU memory)."""
        self.model = None
