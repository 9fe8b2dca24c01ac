"""Build a tiny random ``image-text-to-text`` model (LLaVA layout, the architecture JoyCaption uses) in code.

No download: the tokenizer is a word-level ``tokenizers`` model, the vision tower a one-layer CLIP at 28x28 pixels,
the language model a one-layer Llama. Its captions are random words -- it exists so the local backend, the tests and
an offline demo of the Recaption tab run end to end on a CPU. ``python -m training.recaption.tiny_vlm FOLDER``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "small",
    "large",
    "round",
    "square",
    "wooden",
    "metal",
    "glass",
    "cat",
    "dog",
    "tree",
    "house",
    "sky",
    "cloud",
    "table",
    "cup",
    "on",
    "of",
    "and",
    "with",
    "in",
    "near",
    "left",
    "right",
    "above",
    "below",
    "behind",
]
_SPECIAL = ["<pad>", "<s>", "</s>", "<image>", "[UNK]"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} </s> {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"()-")
    vocab = {token: index for index, token in enumerate(_SPECIAL + _WORDS + letters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    return tokenizer, vocab


def build_tiny_vlm(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-style model + processor into ``folder`` and return it (about 50k parameters)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    tokenizer, vocab = _tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_CHAT_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
            "projection_dim": 32,
        },
        image_token_id=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main() -> None:
    """Build the tiny model into the folder given on the command line."""
    parser = argparse.ArgumentParser(description="Build a tiny random image-text-to-text model for offline tests.")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logger.info("tiny model written to %s", build_tiny_vlm(args.folder))


if __name__ == "__main__":
    main()
