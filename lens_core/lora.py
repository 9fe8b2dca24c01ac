"""Lens LoRA files: reading, writing and key conversion between diffusers/PEFT, ComfyUI and kohya names.

One in-memory form, `LensLora`, sits between the formats: adapter tensors keyed by the denoiser's own module names
(`transformer_blocks.0.attn.img_qkv`) with PEFT parameter names (`lora_A.weight`, `lora_B.weight`, `lokr_w1`, ...),
plus the per-module rank and alpha. File formats:

| format    | key of one LoRA factor                                        | alpha                       |
|-----------|---------------------------------------------------------------|-----------------------------|
| diffusers | `transformer.transformer_blocks.0.attn.img_qkv.lora_A.weight` | in the metadata (PEFT config) |
| comfyui   | `diffusion_model.transformer_blocks.0.attn.img_qkv.lora_A.weight` | `<module>.alpha` tensor   |
| kohya     | `lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight` | `<module>.alpha` tensor    |

Plain PEFT keys (no prefix, or `base_model.model.`) are read as diffusers. A file whose modules do not exist in the Lens
denoiser, or whose shapes do not fit it, is refused with a message naming the offending key.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic_io import atomic_build

logger = logging.getLogger(__name__)

LORA_FORMATS = ("diffusers", "comfyui", "kohya")
MODEL_FAMILY = "lens"
METADATA_PREFIX = "lens."
# diffusers >= 0.35 keeps the PEFT config of a saved LoRA under this safetensors metadata key.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
FORMAT_PREFIXES = {"diffusers": "transformer.", "comfyui": "diffusion_model.", "kohya": "lora_unet_"}
# Parameter suffixes per adapter kind, in PEFT naming; kohya calls lora_A / lora_B "lora_down" / "lora_up".
LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KOHYA_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


class LensLoraError(ValueError):
    """A LoRA file that cannot be used with this Lens denoiser (wrong model, bad file, unknown format)."""


@dataclass
class LensLora:
    """Adapter weights keyed by denoiser module, in PEFT parameter names.

    `tensors[module][suffix]`: e.g. tensors["transformer_blocks.0.attn.img_qkv"]["lora_A.weight"] = [r, in].
    `ranks` and `alphas` are per module; the effective scale of a LoRA module is alpha / rank.
    """

    kind: str  # "lora" or "lokr"
    tensors: dict[str, dict[str, torch.Tensor]]
    ranks: dict[str, int]
    alphas: dict[str, float]
    metadata: dict[str, str] = field(default_factory=dict)
    lokr_options: dict = field(default_factory=dict)  # LoKr only: decompose_both, decompose_factor, rank_dropout...

    @property
    def modules(self) -> list[str]:
        return sorted(self.tensors)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as `peft.set_peft_model_state_dict` expects them: `<module>.<suffix>`."""
        return {f"{module}.{suffix}": t for module, params in self.tensors.items() for suffix, t in params.items()}


# ----------------------------------------------------------------------------------------------------------------
# Building from a live model and to a PEFT config
# ----------------------------------------------------------------------------------------------------------------


def lora_from_peft_state_dict(
    state: dict[str, torch.Tensor],
    kind: str,
    rank: int,
    alpha: float,
    metadata: dict[str, str] | None = None,
    lokr_options: dict | None = None,
) -> LensLora:
    """Group a `peft.get_peft_model_state_dict` result (`<module>.<suffix>` keys) into a `LensLora`."""
    suffixes = LORA_SUFFIXES if kind == "lora" else LOKR_SUFFIXES
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            raise LensLoraError(
                f"Unexpected adapter parameter {key!r} for a {kind} adapter; expected suffixes {suffixes}."
            )
        tensors.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor.detach().to("cpu").contiguous()
    modules = sorted(tensors)
    return LensLora(
        kind,
        tensors,
        dict.fromkeys(modules, rank),
        dict.fromkeys(modules, float(alpha)),
        dict(metadata or {}),
        dict(lokr_options or {}),
    )


def peft_config_for(lora: LensLora):
    """The PEFT config that recreates `lora`'s adapter layers (exact module names, per-module rank and alpha)."""
    from peft import LoKrConfig, LoraConfig

    modules = lora.modules
    rank = max(lora.ranks.values())
    alpha = lora.alphas[modules[0]]
    # An exact full name as the pattern: PEFT matches patterns as `(.*\.)?<key>$`.
    rank_pattern = {m: r for m, r in lora.ranks.items() if r != rank}
    alpha_pattern = {m: a for m, a in lora.alphas.items() if a != alpha}
    if lora.kind == "lokr":
        return LoKrConfig(
            r=rank,
            alpha=alpha,
            target_modules=modules,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            **lora.lokr_options,
        )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=modules,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _format_key(module: str, suffix: str, file_format: str) -> str:
    if file_format == "kohya":
        kohya_suffix = {v: k for k, v in KOHYA_SUFFIXES.items()}.get(suffix, suffix)
        return f"lora_unet_{module.replace('.', '_')}.{kohya_suffix}"
    return f"{FORMAT_PREFIXES[file_format]}{module}.{suffix}"


def lora_to_state_dict(lora: LensLora, file_format: str = "diffusers") -> dict[str, torch.Tensor]:
    """The tensors of `lora` under `file_format`'s key names (ComfyUI and kohya carry an `alpha` tensor per module)."""
    if file_format not in LORA_FORMATS:
        raise ValueError(f"Unknown LoRA format {file_format!r}; choose one of {LORA_FORMATS}.")
    state = {}
    for module, params in lora.tensors.items():
        for suffix, tensor in params.items():
            state[_format_key(module, suffix, file_format)] = tensor
        if file_format != "diffusers":
            alpha_key = _format_key(module, "alpha", file_format)
            state[alpha_key] = torch.tensor(float(lora.alphas[module]))
    return state


def _file_metadata(lora: LensLora, file_format: str) -> dict[str, str]:
    metadata = {k: str(v) for k, v in lora.metadata.items()}
    metadata.update(
        {
            "format": "pt",
            f"{METADATA_PREFIX}model_family": MODEL_FAMILY,
            f"{METADATA_PREFIX}adapter_kind": lora.kind,
            f"{METADATA_PREFIX}key_format": file_format,
            f"{METADATA_PREFIX}ranks": json.dumps(lora.ranks, sort_keys=True),
            f"{METADATA_PREFIX}alphas": json.dumps(lora.alphas, sort_keys=True),
        }
    )
    if lora.kind == "lokr":
        metadata[f"{METADATA_PREFIX}lokr_options"] = json.dumps(lora.lokr_options, sort_keys=True)
    if file_format == "diffusers" and lora.kind == "lora":
        config = peft_config_for(lora).to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps({"transformer": config}, default=str)
    return metadata


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file to a temp file in the same folder, then rename it into place."""
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    atomic_build(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def save_lora(lora: LensLora, path: str | Path, file_format: str = "diffusers") -> Path:
    """Save `lora` as one safetensors file in `file_format` key names (atomically); return the path."""
    path = Path(path)
    atomic_save_safetensors(lora_to_state_dict(lora, file_format), path, _file_metadata(lora, file_format))
    logger.info("Saved %s LoRA (%d modules) to %s", file_format, len(lora.tensors), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _split_key(key: str, kohya_names: dict[str, str]) -> tuple[str, str, str]:
    """key -> (format, module, PEFT suffix or 'alpha')."""
    for suffix in (*LORA_SUFFIXES, *KOHYA_SUFFIXES, *LOKR_SUFFIXES, "alpha"):
        if key.endswith("." + suffix):
            stem, suffix = key[: -len(suffix) - 1], KOHYA_SUFFIXES.get(suffix, suffix)
            break
    else:
        raise LensLoraError(
            f"{key!r} is not a LoRA/LoKr parameter name (expected lora_A/lora_B, lora_down/lora_up, lokr_w*, alpha)."
        )
    if stem.startswith("lora_unet_"):
        flat = stem.removeprefix("lora_unet_")
        if flat not in kohya_names:
            raise LensLoraError(f"{key!r}: the kohya module {flat!r} does not exist in the Lens denoiser.")
        return "kohya", kohya_names[flat], suffix
    for prefix, file_format in (
        ("diffusion_model.", "comfyui"),
        ("transformer.", "diffusers"),
        ("base_model.model.", "diffusers"),
    ):
        if stem.startswith(prefix):
            return file_format, stem.removeprefix(prefix), suffix
    return "diffusers", stem, suffix


def _linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) for every Linear of the denoiser (PEFT wrappers unwrapped)."""
    shapes = {}
    for name, module in transformer.named_modules():
        name = re.sub(r"\.base_layer$", "", name)
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name and ".lokr_" not in name:
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def read_lora(path: str | Path, transformer) -> LensLora:
    """Read a LoRA file in any supported key format and check it against `transformer` (a Lens denoiser)."""
    path = Path(path)
    if not path.is_file():
        raise LensLoraError(f"LoRA file {path} does not exist.")
    from .safetensors_io import read_metadata

    metadata = read_metadata(path)
    family = metadata.get(f"{METADATA_PREFIX}model_family")
    if family is not None and family != MODEL_FAMILY:
        raise LensLoraError(f"{path.name} was made for model family {family!r}, not Lens.")
    state = load_file(str(path))
    if not state:
        raise LensLoraError(f"{path} holds no tensors.")
    shapes = _linear_shapes(transformer)
    kohya_names = {name.replace(".", "_"): name for name in shapes}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        _format, module, suffix = _split_key(key, kohya_names)
        if module not in shapes:
            raise LensLoraError(
                f"{path.name} is not a LoRA for this Lens denoiser: its key {key!r} targets {module!r}, which does not "
                f"exist in Lens (Lens modules look like 'transformer_blocks.0.attn.img_qkv')."
            )
        if suffix == "alpha":
            alphas[module] = float(tensor.float().item())
        else:
            tensors.setdefault(module, {})[suffix] = tensor
    return _assemble(path, tensors, alphas, metadata, shapes)


def _assemble(path: Path, tensors, alphas, metadata, shapes) -> LensLora:
    kind = "lokr" if any(s.startswith("lokr_") for params in tensors.values() for s in params) else "lora"
    stored_alphas = json.loads(metadata.get(f"{METADATA_PREFIX}alphas", "{}"))
    stored_ranks = json.loads(metadata.get(f"{METADATA_PREFIX}ranks", "{}"))
    ranks, final_alphas = {}, {}
    for module, params in tensors.items():
        in_features, out_features = shapes[module]
        if kind == "lora":
            if set(params) != set(LORA_SUFFIXES):
                raise LensLoraError(f"{path.name}: module {module!r} has {sorted(params)}, a LoRA needs both factors.")
            down, up = params["lora_A.weight"], params["lora_B.weight"]
            if (
                down.ndim != 2
                or up.ndim != 2
                or down.shape[1] != in_features
                or up.shape[0] != out_features
                or up.shape[1] != down.shape[0]
            ):
                raise LensLoraError(
                    f"{path.name}: {module} has factors {tuple(down.shape)} / {tuple(up.shape)}, but this Lens denoiser "
                    f"needs [r, {in_features}] / [{out_features}, r]: the LoRA was made for a different model size."
                )
            ranks[module] = int(down.shape[0])
        else:
            if module not in stored_ranks:
                raise LensLoraError(
                    f"{path.name}: LoKr files are read only when written by this project (rank metadata missing)."
                )
            ranks[module] = int(stored_ranks[module])
        # No alpha anywhere (some tools omit it) means scale 1: alpha = rank.
        final_alphas[module] = float(alphas.get(module, stored_alphas.get(module, ranks[module])))
    options = json.loads(metadata.get(f"{METADATA_PREFIX}lokr_options", "{}"))
    return LensLora(kind, tensors, ranks, final_alphas, metadata, options)


# ----------------------------------------------------------------------------------------------------------------
# Applying to a denoiser
# ----------------------------------------------------------------------------------------------------------------


def add_lora_to_transformer(transformer, lora: LensLora, adapter_name: str) -> None:
    """Inject `lora` as adapter `adapter_name` into the (PEFT-capable) denoiser and load its weights."""
    from peft import set_peft_model_state_dict

    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"An adapter named {adapter_name!r} is already loaded; unload it or choose another name.")
    transformer.add_adapter(peft_config_for(lora), adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, lora.peft_state_dict(), adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise LensLoraError(f"LoRA weights not used by the denoiser: {unexpected[:3]} ({len(unexpected)} in all).")


def set_adapter_weights(transformer, weights: dict[str, float]) -> None:
    """Activate exactly the adapters in `weights`, each scaled by its weight (1.0 = as trained)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded = set(getattr(transformer, "peft_config", None) or {})
    unknown = sorted(set(weights) - loaded)
    if unknown:
        raise ValueError(f"Unknown adapter names {unknown}; loaded adapters: {sorted(loaded)}.")
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            names = [name for name in weights if name in module.scaling]
            module.set_adapter(names)
            for name in names:
                module.set_scale(name, float(weights[name]))


def remove_all_adapters(transformer) -> None:
    """Replace every PEFT wrapper with its base layer: the denoiser is exactly the base model again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, module.get_base_layer())
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config  # PEFT warns about "multiple adapters" when an empty config is left behind
    transformer._hf_peft_config_loaded = False


# ----------------------------------------------------------------------------------------------------------------
# Finding trained LoRAs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraFileInfo:
    """One Lens LoRA file found on disk, for pickers."""

    path: Path
    key_format: str
    trigger_word: str
    base_model: str
    modified: float


def list_loras(root: str | Path, key_format: str | None = "diffusers") -> list[LoraFileInfo]:
    """Lens LoRA files under `root` (newest first), recognised by their metadata; `key_format=None` lists every
    format. Checkpoint folders and temp files are skipped."""
    from .safetensors_io import read_metadata

    root = Path(root)
    found = []
    for path in root.rglob("*.safetensors") if root.is_dir() else []:
        if path.name.startswith(".") or any(
            part.startswith((".tmp", "checkpoint")) for part in path.relative_to(root).parts[:-1]
        ):
            continue
        try:
            metadata = read_metadata(path)
        except ValueError:
            continue
        if metadata.get(f"{METADATA_PREFIX}model_family") != MODEL_FAMILY:
            continue
        file_format = metadata.get(f"{METADATA_PREFIX}key_format", "diffusers")
        if key_format is not None and file_format != key_format:
            continue
        found.append(
            LoraFileInfo(
                path,
                file_format,
                metadata.get(f"{METADATA_PREFIX}trigger_word", ""),
                metadata.get(f"{METADATA_PREFIX}base_model", ""),
                path.stat().st_mtime,
            )
        )
    return sorted(found, key=lambda info: -info.modified)


# ----------------------------------------------------------------------------------------------------------------
# Pipeline methods
# ----------------------------------------------------------------------------------------------------------------


class LensLoraLoaderMixin:
    """`load_lora_weights` / `set_adapters` / `unload_lora_weights` for `LensPipeline` (adapters on the denoiser)."""

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, weight: float = 1.0) -> str:
        """Load a Lens LoRA (diffusers/PEFT, ComfyUI or kohya key names) as `adapter_name` (default: the file
        stem) and activate it at `weight` beside the adapters already active. Returns the adapter name."""
        path = Path(path)
        adapter_name = adapter_name or re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
        lora = read_lora(path, self.transformer)
        add_lora_to_transformer(self.transformer, lora, adapter_name)
        weights = dict(getattr(self, "_lora_weights", {}))
        weights[adapter_name] = float(weight)
        self.set_adapters(list(weights), list(weights.values()))
        logger.info(
            "Loaded LoRA %s as %r (weight %.2f, %d modules)", path.name, adapter_name, weight, len(lora.tensors)
        )
        return adapter_name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate exactly `adapter_names`, with one weight each (default 1.0)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"Got {len(weights)} adapter weights for {len(names)} adapters {names}; give one each.")
        set_adapter_weights(self.transformer, dict(zip(names, weights, strict=True)))
        self._lora_weights = dict(zip(names, weights, strict=True))

    def get_active_adapters(self) -> dict[str, float]:
        """Active adapter names and their weights."""
        return dict(getattr(self, "_lora_weights", {}))

    def unload_lora_weights(self) -> None:
        """Remove every LoRA: the denoiser computes exactly the base model again."""
        remove_all_adapters(self.transformer)
        self._lora_weights = {}
