"""Finding and loading Lens checkpoints: Hub ids with mirror fallbacks, local folders, Comfy-Org single files.

`model_index.json` names classes that exist in no released library (`LensGptOssEncoder`, `LensTransformer2DModel`), so
`LensPipeline.from_pretrained` resolves every component name through our own table instead of diffusers' importer.

diffusers' generic `DiffusionPipeline.from_pretrained(folder)` can only find a pipeline or component class as an
attribute of the `diffusers` / `transformers` modules (or as remote code, which needs `trust_remote_code=True`).
`register_lens_classes()` is the explicit, opt-in way to allow it: it adds the three official names to those two
modules (never replacing a name they already have). Nothing here calls it; importing lens_core changes no other
package.
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
# Hub keywords passed on to huggingface_hub.snapshot_download.
HUB_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "force_download", "local_files_only", "proxies")
# diffusers / transformers loading keywords we do not support, and what to use instead.
REFUSED_LOAD_KWARGS = {
    "custom_pipeline": "Lens needs no custom pipeline code; LensPipeline is the pipeline",
    "custom_revision": "Lens needs no custom pipeline code; LensPipeline is the pipeline",
    "trust_remote_code": "Lens runs no remote code; every class is in lens_core",
    "max_memory": "use memory_mode= (lens_core.memory) to fit a GPU",
    "offload_folder": "disk offload is not supported; memory_mode='sequential' streams from CPU memory",
    "offload_state_dict": "disk offload is not supported; memory_mode='sequential' streams from CPU memory",
    "quantization_config": "quantize with memory_mode= or lens_core.apply_memory_mode(..., transformer_precision=)",
    "use_onnx": "ONNX is not supported",
    "provider": "ONNX is not supported",
    "sess_options": "ONNX is not supported",
    "provider_options": "ONNX is not supported",
    "load_connected_pipeline": "Lens has no connected pipelines",
    "use_flashpack": "FlashPack files are not supported",
    "output_loading_info": "not supported; loading errors are raised with the missing tensor names",
}


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
        raise CheckpointError(
            f"{folder} is not a Lens checkpoint: model_index.json names {index.get('_class_name')!r}, expected 'LensPipeline'."
        )
    for name in COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2):
            raise CheckpointError(f"model_index.json in {folder} has no valid entry for the {name!r} component.")
        if entry[1] not in EXPECTED_CLASSES[name]:
            raise CheckpointError(
                f"model_index.json in {folder}: {name} is {entry[1]!r}; expected one of {sorted(EXPECTED_CLASSES[name])}."
            )
    return index


def is_repo_id(text: str) -> bool:
    """'owner/name', the form of a Hub repo id (a path-like string is not one)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def is_hub_source(source: str | Path) -> bool:
    """Whether `source` names a Hub repo: of the form 'owner/name' and not an existing local path."""
    return is_repo_id(str(source)) and not Path(source).expanduser().exists()


def download_snapshot(repo_id: str, allow_patterns: list[str] | None = None, **hub_kwargs) -> Path:
    """A Hub repo (or the `allow_patterns` part of it) in the local cache; `hub_kwargs` are HUB_DOWNLOAD_KWARGS."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, **hub_kwargs))


def resolve_component_folder(source: str | Path, subfolder: str | None, hub_kwargs: dict) -> Path:
    """One component's folder: a local folder (plus `subfolder`), or that subfolder of a Hub repo (only it is
    fetched)."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointError(f"{folder} does not exist.")
        return folder
    if not is_repo_id(str(source)):
        raise CheckpointError(f"{source!r} is neither an existing folder nor a Hub repo id of the form 'owner/name'.")
    root = download_snapshot(str(source), [f"{subfolder}/*"] if subfolder else None, **hub_kwargs)
    return root / subfolder if subfolder else root


def resolve_checkpoint(
    source: str | Path, local_files_only: bool = False, **hub_kwargs
) -> tuple[Path, VariantPreset | None]:
    """A local folder, a Hub repo id tried with its mirrors in order, or `tiny` (the tiny random checkpoint, built
    once in the cache). Returns (folder, variant if known). `hub_kwargs`: `revision`, `cache_dir`, `token`,
    `force_download`, `proxies`."""
    if str(source) == TINY_MODEL:
        from .tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(), VARIANTS["Lens-Turbo"]
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise CheckpointError(
            f"{source} is a file; pass a checkpoint folder or Hub id, and a single-file denoiser as transformer_file=."
        )
    text = str(source)
    if not is_repo_id(text):
        raise CheckpointError(f"{source!r} is neither an existing folder nor a Hub repo id of the form 'owner/name'.")
    variant = variant_for_repo_id(text)
    candidates = [text] + [repo for repo in (variant.repo_ids if variant else ()) if repo != text]
    errors = []
    for repo_id in candidates:
        try:
            folder = download_snapshot(repo_id, local_files_only=local_files_only, **hub_kwargs)
        except Exception as error:  # noqa: BLE001 (each mirror may fail for its own reason; report them all)
            errors.append(f"{repo_id}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        if repo_id != text:
            logger.warning("%s is unavailable; using the mirror %s (same weights).", text, repo_id)
        return folder, variant
    raise CheckpointError(
        f"Could not get {text} or any of its mirrors:\n  "
        + "\n  ".join(errors)
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
            raise CheckpointError(
                f"{path} holds {name!r}, which is not a Lens denoiser tensor: is this a Lens checkpoint?"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name].shape)}."
            )
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
        raise CheckpointError(
            f"Cannot load the {name} component from {args[0]}: {type(error).__name__}: {error}"
        ) from error


# Weight files a component folder holds for a diffusers `variant` (transformers' naming for the text encoder).
VARIANT_FILE_PATTERNS = {
    "transformer": ("diffusion_pytorch_model.{v}.safetensors", "diffusion_pytorch_model.safetensors.index.{v}.json"),
    "vae": ("diffusion_pytorch_model.{v}.safetensors", "diffusion_pytorch_model.safetensors.index.{v}.json"),
    "text_encoder": ("model.{v}.safetensors", "model.safetensors.index.{v}.json"),
}


def component_variants(folder: Path, variant: str | None) -> dict[str, str | None]:
    """Per weight component, `variant` where its files exist, else None (its default files are used, as diffusers
    does). A variant that no component has is an error."""
    if variant is None:
        return dict.fromkeys(VARIANT_FILE_PATTERNS)
    found = {
        name: variant if any((folder / name / p.format(v=variant)).is_file() for p in patterns) else None
        for name, patterns in VARIANT_FILE_PATTERNS.items()
    }
    if not any(found.values()):
        raise CheckpointError(f"{folder} has no weights for variant={variant!r} in any component.")
    for name, value in found.items():
        if value is None:
            logger.info("No %s weights for variant %r in %s: using its default files.", name, variant, folder)
    return found


def _dtype_for(torch_dtype, name: str) -> torch.dtype:
    """One component's dtype from a torch_dtype that may be a dict {component: dtype, "default": dtype}."""
    if isinstance(torch_dtype, dict):
        unknown = sorted(set(torch_dtype) - {*COMPONENTS, "default"})
        if unknown:
            raise ValueError(f"torch_dtype has unknown components {unknown}; use {list(COMPONENTS)} and 'default'.")
        return torch_dtype.get(name, torch_dtype.get("default", torch.float32))
    return torch_dtype or torch.float32


def load_components(
    folder: Path,
    torch_dtype: torch.dtype | dict | None = None,
    transformer_file: str | Path | None = None,
    variant: str | None = None,
    low_cpu_mem_usage: bool | None = None,
    given: dict | None = None,
) -> dict:
    """Load the five components of a Lens folder; `transformer_file` replaces `transformer/`; `given` components
    (already built) are used as they are. `torch_dtype` may be a dict per component (default float32)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import PreTrainedTokenizerFast

    from .text_encoder import LensGptOssEncoder
    from .transformer_lens import LensTransformer2DModel

    given = dict(given or {})
    read_model_index(folder)
    needed = [name for name in COMPONENTS if name not in given and not (name == "transformer" and transformer_file)]
    for name in needed:
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder} is missing the {name}/ component folder.")
    variants = component_variants(folder, variant)
    diffusers_kwargs = {} if low_cpu_mem_usage is None else {"low_cpu_mem_usage": low_cpu_mem_usage}
    components = dict(given)
    if "transformer" not in given:
        dtype = _dtype_for(torch_dtype, "transformer")
        if transformer_file:
            config_path = folder / "transformer" / "config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}  # {}: the real model's config
            components["transformer"] = _load_component(
                "transformer", load_transformer_single_file, transformer_file, config, dtype
            )
        else:
            components["transformer"] = _load_component(
                "transformer",
                LensTransformer2DModel.from_pretrained,
                folder / "transformer",
                torch_dtype=dtype,
                variant=variants["transformer"],
                **diffusers_kwargs,
            )
    layers = tuple(components["transformer"].config.selected_layer_index)
    loaders = {
        "scheduler": lambda: _load_component(
            "scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained, folder / "scheduler"
        ),
        "tokenizer": lambda: _load_component(
            "tokenizer", PreTrainedTokenizerFast.from_pretrained, folder / "tokenizer"
        ),
        "text_encoder": lambda: _load_component(
            "text_encoder",
            LensGptOssEncoder.from_pretrained,
            folder / "text_encoder",
            selected_layers=layers,
            torch_dtype=_dtype_for(torch_dtype, "text_encoder"),
            variant=variants["text_encoder"],
        ),
        "vae": lambda: _load_component(
            "vae",
            AutoencoderKLFlux2.from_pretrained,
            folder / "vae",
            torch_dtype=_dtype_for(torch_dtype, "vae"),
            variant=variants["vae"],
            **diffusers_kwargs,
        ),
    }
    for name, load in loaders.items():
        if name not in components:
            components[name] = load()
    return {name: components[name] for name in COMPONENTS}


def check_load_kwargs(kwargs: dict) -> None:
    """Refuse the keywords we do not support (REFUSED_LOAD_KWARGS, with the reason) and unknown ones."""
    known = {*HUB_DOWNLOAD_KWARGS, *COMPONENTS, *LOAD_PIPELINE_KEYWORDS}
    refused = [
        f"{key}: {REFUSED_LOAD_KWARGS[key]}"
        for key in kwargs
        if key in REFUSED_LOAD_KWARGS and kwargs[key] not in (None, False)
    ]
    unknown = sorted(key for key in kwargs if key not in known and key not in REFUSED_LOAD_KWARGS)
    if refused or unknown:
        allowed = ", ".join(sorted(known - set(COMPONENTS)))
        raise ValueError(
            "LensPipeline.from_pretrained cannot take "
            + "; ".join(refused + [f"{key}: unknown keyword" for key in unknown])
            + f". Accepted: {allowed}, and components by name ({', '.join(COMPONENTS)})."
        )


LOAD_PIPELINE_KEYWORDS = (
    "torch_dtype",
    "dtype",
    "transformer_file",
    "variant_name",
    "prompt_date",
    "memory_mode",
    "device",
    "device_map",
    "variant",
    "use_safetensors",
    "low_cpu_mem_usage",
)


def _placement(device, device_map, memory_mode) -> tuple[torch.device | None, dict[str, torch.device]]:
    """(one device for everything, or None; per-component devices) from `device` and a diffusers `device_map`."""
    if device_map is None:
        return (torch.device(device) if device is not None else None), {}
    if device is not None or memory_mode is not None:
        raise ValueError("device_map= cannot be combined with device= or memory_mode=; give one of them.")
    if isinstance(device_map, dict):
        unknown = sorted(set(device_map) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"device_map has unknown components {unknown}; use {list(COMPONENTS)}.")
        return None, {name: torch.device(value) for name, value in device_map.items()}
    if str(device_map) in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r} is not supported: choose a memory_mode (lens_core.MEMORY_MODES) to fit a GPU, "
            "or give one device ('cuda') or a dict per component."
        )
    return torch.device(device_map), {}


def load_pipeline(
    pipeline_class,
    source: str | Path,
    torch_dtype: torch.dtype | dict | None = None,
    transformer_file: str | Path | None = None,
    local_files_only: bool = False,
    variant_name: str | None = None,
    prompt_date: str | None = None,
    memory_mode: str | None = None,
    device: str | torch.device | None = None,
    **kwargs,
):
    """Resolve `source`, load its components and return a ready `pipeline_class`: on CPU (move it with `.to()`), or
    placed and quantized by `memory_mode` (a `lens_core.memory.MEMORY_MODES` name or "auto") on `device`.

    Also takes diffusers' loading keywords (see `LensPipeline.from_pretrained`); unsupported ones are refused with
    the reason, unknown ones are an error."""
    check_load_kwargs(kwargs)
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False: Lens checkpoints are read from safetensors files only.")
    if kwargs.get("dtype") is not None:
        if torch_dtype is not None and torch_dtype != kwargs["dtype"]:
            raise ValueError(f"torch_dtype={torch_dtype} and dtype={kwargs['dtype']} disagree; give one of them.")
        torch_dtype = kwargs["dtype"]
    single_device, component_devices = _placement(device, kwargs.get("device_map"), memory_mode)
    hub = {key: kwargs[key] for key in HUB_DOWNLOAD_KWARGS if key in kwargs and key != "local_files_only"}
    folder, variant = resolve_checkpoint(source, local_files_only=local_files_only, **hub)
    given = {name: kwargs[name] for name in COMPONENTS if name in kwargs}
    components = load_components(
        folder, torch_dtype, transformer_file, kwargs.get("variant"), kwargs.get("low_cpu_mem_usage"), given
    )
    pipe = pipeline_class(**components)
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

        apply_memory_mode(pipe, memory_mode, single_device)
    elif single_device is not None:
        pipe.to(single_device)
    for name, component_device in component_devices.items():
        getattr(pipe, name).to(component_device)
    return pipe


def register_lens_classes() -> None:
    """Opt in to diffusers' generic loader: afterwards `diffusers.DiffusionPipeline.from_pretrained(folder)` loads a
    Lens folder (official or saved by `LensPipeline.save_pretrained`) as a `LensPipeline`.

    diffusers finds the classes a model_index.json names only as attributes of `diffusers` (LensPipeline,
    LensTransformer2DModel) and `transformers` (LensGptOssEncoder); this adds those three names there. It adds, never
    replaces: a name the library already has (a future release with its own Lens classes) is left alone and logged.
    `LensPipeline.from_pretrained` never needs this."""
    import diffusers
    import transformers

    from .pipeline_lens import LensPipeline
    from .text_encoder import LensGptOssEncoder
    from .transformer_lens import LensTransformer2DModel

    for module, cls in (
        (diffusers, LensPipeline),
        (diffusers, LensTransformer2DModel),
        (transformers, LensGptOssEncoder),
    ):
        existing = getattr(module, cls.__name__, None)
        if existing is None:
            setattr(module, cls.__name__, cls)
        elif existing is not cls:
            logger.warning(
                "%s.%s already exists; leaving it (not registering lens_core's class).", module.__name__, cls.__name__
            )


def _variant_for_file(path: Path) -> VariantPreset | None:
    """Comfy-Org names its files lens_bf16 / lens_turbo_bf16 / lens_turbo_mxfp8...: longest stem wins."""
    stems = [(p.comfy_denoiser_file.split("_bf16")[0] + "_", p) for p in VARIANTS.values() if p.comfy_denoiser_file]
    for stem, preset in sorted(stems, key=lambda item: -len(item[0])):
        if path.name.startswith(stem):
            return preset
    return None
