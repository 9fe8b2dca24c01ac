"""Finding and loading Lens checkpoints: Hub ids with mirror fallbacks, local folders, Comfy-Org single files.

`model_index.json` names classes that exist in no released library (`LensGptOssEncoder`, `LensTransformer2DModel`), so
we resolve every component name through our own table instead of diffusers' importer, and never patch other packages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .presets import TINY_MODEL, VARIANTS, VariantPreset, get_variant, variant_for_repo_id
from .safetensors_io import iter_checkpoint_tensors

logger = logging.getLogger(__name__)

COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
# model_index.json entry -> the class names we accept for it.
EXPECTED_CLASSES = {
    "scheduler": {"FlowMatchEulerDiscreteScheduler"},
    "text_encoder": {"LensGptOssEncoder", "GptOssForCausalLM", "GptOssModel"},
    "tokenizer": {"PreTrainedTokenizerFast", "GPT2TokenizerFast", "TokenizersBackend"},
    "transformer": {"LensTransformer2DModel"},
    "vae": {"AutoencoderKLFlux2"},
}
# Key prefixes some single-file exports put in front of the official names.
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class CheckpointError(ValueError):
    """A folder or file that is not a loadable Lens checkpoint; the message says what is wrong."""


def read_model_index(folder: Path) -> dict:
    """Parse and validate `model_index.json` of a Lens pipeline folder."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(
            f"{folder} is not a Lens checkpoint: model_index.json is missing (expected the diffusers layout with "
            f"{', '.join(COMPONENTS)})."
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{index_path} is not valid JSON: {error}") from error
    if index.get("_class_name") != "LensPipeline":
        raise CheckpointError(f"{folder} is not a Lens checkpoint: model_index.json names {index.get('_class_name')!r}, expected 'LensPipeline'.")
    for name in COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2):
            raise CheckpointError(f"model_index.json in {folder} has no valid entry for the {name!r} component.")
        if entry[1] not in EXPECTED_CLASSES[name]:
            raise CheckpointError(f"model_index.json in {folder}: {name} is {entry[1]!r}; expected one of {sorted(EXPECTED_CLASSES[name])}.")
    return index


def _download(repo_id: str, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    # The Comfy text encoder and denoiser files are not needed from a diffusers repo; fetch only the layout.
    return Path(snapshot_download(repo_id, local_files_only=local_files_only))


def resolve_checkpoint(source: str | Path, local_files_only: bool = False) -> tuple[Path, VariantPreset | None]:
    """A local folder, a Hub repo id tried with its mirrors in order, or `tiny` (the tiny random checkpoint, built
    once in the cache). Returns (folder, variant if known)."""
    if str(source) == TINY_MODEL:
        from .tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(), VARIANTS["Lens-Turbo"]
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass a checkpoint folder or Hub id, and a single-file denoiser as transformer_file=.")
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{source!r} is neither an existing folder nor a Hub repo id of the form 'owner/name'.")
    variant = variant_for_repo_id(text)
    candidates = [text] + [repo for repo in (variant.repo_ids if variant else ()) if repo != text]
    errors = []
    for repo_id in candidates:
        try:
            folder = _download(repo_id, local_files_only)
        except Exception as error:  # noqa: BLE001 (each mirror may fail for its own reason; report them all)
            errors.append(f"{repo_id}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        if repo_id != text:
            logger.warning("%s is unavailable; using the mirror %s (same weights).", text, repo_id)
        return folder, variant
    raise CheckpointError(
        f"Could not get {text} or any of its mirrors:\n  " + "\n  ".join(errors)
        + "\nDownload it once with network access (or pass a local folder); set HF_HUB_OFFLINE=1 to use the cache."
    )


def load_transformer_single_file(path: str | Path, config: dict, torch_dtype: torch.dtype | None = None):
    """Build `LensTransformer2DModel` from `config` and load a single safetensors file (e.g. Comfy-Org's
    `lens_bf16.safetensors`), whose names are the official ones (a `model.diffusion_model.` prefix is removed)."""
    from .transformer_lens import LensTransformer2DModel

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Denoiser file {path} does not exist.")
    with torch.device("meta"):
        model = LensTransformer2DModel.from_config(config)
    expected = model.state_dict()
    state = {}
    for name, tensor in iter_checkpoint_tensors(path):
        for prefix in SINGLE_FILE_PREFIXES:
            name = name.removeprefix(prefix)
        if name not in expected:
            raise CheckpointError(f"{path} holds {name!r}, which is not a Lens denoiser tensor: is this a Lens checkpoint?")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name].shape)}.")
        state[name] = tensor.to(torch_dtype) if torch_dtype is not None and tensor.is_floating_point() else tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path} is missing {len(missing)} denoiser tensors, e.g. {missing[:3]}.")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def _load_component(name: str, loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 (turn library errors into one clear message per component)
        raise CheckpointError(f"Cannot load the {name} component from {args[0]}: {type(error).__name__}: {error}") from error


def load_components(folder: Path, torch_dtype: torch.dtype | None = None, transformer_file: str | Path | None = None) -> dict:
    """Load the five components of a Lens folder; `transformer_file` replaces `transformer/`."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import PreTrainedTokenizerFast

    from .text_encoder import LensGptOssEncoder
    from .transformer_lens import LensTransformer2DModel

    read_model_index(folder)
    needed = [name for name in COMPONENTS if not (name == "transformer" and transformer_file)]
    for name in needed:
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder} is missing the {name}/ component folder.")
    dtype = torch_dtype or torch.float32
    if transformer_file:
        config_path = folder / "transformer" / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}  # {}: the real model's config
        transformer = _load_component("transformer", load_transformer_single_file, transformer_file, config, dtype)
    else:
        transformer = _load_component("transformer", LensTransformer2DModel.from_pretrained, folder / "transformer", torch_dtype=dtype)
    layers = tuple(transformer.config.selected_layer_index)
    return {
        "scheduler": _load_component("scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained, folder / "scheduler"),
        "tokenizer": _load_component("tokenizer", PreTrainedTokenizerFast.from_pretrained, folder / "tokenizer"),
        "text_encoder": _load_component(
            "text_encoder", LensGptOssEncoder.from_pretrained, folder / "text_encoder", selected_layers=layers, torch_dtype=dtype
        ),
        "transformer": transformer,
        "vae": _load_component("vae", AutoencoderKLFlux2.from_pretrained, folder / "vae", torch_dtype=dtype),
    }


def load_pipeline(
    pipeline_class,
    source: str | Path,
    torch_dtype: torch.dtype | None = None,
    transformer_file: str | Path | None = None,
    local_files_only: bool = False,
    variant_name: str | None = None,
    prompt_date: str | None = None,
    memory_mode: str | None = None,
    device: str | torch.device | None = None,
):
    """Resolve `source`, load its components and return a ready `pipeline_class`: on CPU (move it with `.to()`), or
    placed and quantized by `memory_mode` (a `lens_core.memory.MEMORY_MODES` name or "auto") on `device`."""
    folder, variant = resolve_checkpoint(source, local_files_only=local_files_only)
    pipe = pipeline_class(**load_components(folder, torch_dtype, transformer_file))
    if variant_name is not None:
        variant = get_variant(variant_name)
    elif transformer_file is not None:
        variant = _variant_for_file(Path(transformer_file)) or variant
    pipe.variant_preset = variant or VARIANTS["Lens"]
    pipe.checkpoint_folder = folder
    if prompt_date is not None:
        from .prompt import render_prefix

        render_prefix(prompt_date)  # validates the date
        pipe.prompt_date = prompt_date
    if memory_mode is not None:
        from .memory import apply_memory_mode

        apply_memory_mode(pipe, memory_mode, device)
    elif device is not None:
        pipe.to(device)
    return pipe


def _variant_for_file(path: Path) -> VariantPreset | None:
    """Comfy-Org names its files lens_bf16 / lens_turbo_bf16 / lens_turbo_mxfp8...: longest stem wins."""
    stems = [(p.comfy_denoiser_file.split("_bf16")[0] + "_", p) for p in VARIANTS.values() if p.comfy_denoiser_file]
    for stem, preset in sorted(stems, key=lambda item: -len(item[0])):
        if path.name.startswith(stem):
            return preset
    return None
