"""Every default about the Lens model in one place: variants, Hub ids and mirrors, resolutions, sampler constants.

Other modules import from here; nothing else in the project restates these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

# The date the prompt preamble carries. Upstream fills in today's date, so its embeddings change every day; ComfyUI
# and mflux froze it at this date for their reference outputs, and so do we (it stays a setting).
DEFAULT_PROMPT_DATE = "2026-05-23"

# Upstream truncates the whole rendered text (preamble included) to this many tokens.
DEFAULT_MAX_SEQUENCE_LENGTH = 512

# How a too-long prompt is cut: "prompt" (ours) shortens the prompt only and always keeps the template's closing
# tokens; "text" cuts the whole rendered text at max_sequence_length, as upstream does (losing those tokens).
PROMPT_TRUNCATIONS = ("prompt", "text")
DEFAULT_PROMPT_TRUNCATION = "prompt"

# GPT-OSS-20B decoder layers whose outputs are the text features (the denoiser config's `selected_layer_index`).
TEXT_FEATURE_LAYERS = (5, 11, 17, 23)

# The model name that means "build (once) and use the tiny random checkpoint" (offline demos and tests).
TINY_MODEL = "tiny"

# Pixels per image token: VAE downsampling 8 x transformer patch 2.
PIXELS_PER_TOKEN = 16
# The largest image the engine generates (pixels): a little above Lens's 1440 area, where it still generalises.
MAX_IMAGE_PIXELS = 1536 * 1536
# The most sampler steps the engine and the trainer's samples run (Lens-Base's default is 50).
MAX_STEPS = 200


@dataclass(frozen=True)
class VariantPreset:
    """Sampling defaults and download locations of one Lens variant."""

    name: str
    description: str
    num_inference_steps: int
    guidance_scale: float
    repo_ids: tuple[str, ...]  # the official repo first, then public mirrors with the unmodified weights
    comfy_denoiser_file: str | None  # file name in Comfy-Org/Lens/diffusion_models, if one is published
    guidance_has_effect: bool = True


VARIANTS: dict[str, VariantPreset] = {
    "Lens": VariantPreset(
        name="Lens",
        description="RL-tuned, the quality default",
        num_inference_steps=20,
        guidance_scale=5.0,
        repo_ids=("microsoft/Lens", "YuCollection/Lens-Diffusers", "Jinstudio/Lens"),
        comfy_denoiser_file="lens_bf16.safetensors",
    ),
    "Lens-Turbo": VariantPreset(
        name="Lens-Turbo",
        description="distilled to 4 steps; guidance is baked in: at its guidance 1, guidance and negative prompt have no effect",
        num_inference_steps=4,
        guidance_scale=1.0,
        repo_ids=("microsoft/Lens-Turbo", "YuCollection/Lens-Turbo-Diffusers"),
        comfy_denoiser_file="lens_turbo_bf16.safetensors",
        guidance_has_effect=False,
    ),
    "Lens-Base": VariantPreset(
        name="Lens-Base",
        description="supervised pre-train, the natural base for fine-tuning",
        num_inference_steps=50,
        guidance_scale=5.0,
        repo_ids=("microsoft/Lens-Base", "YuCollection/Lens-Base-Diffusers", "Jinstudio/Lens-Base"),
        comfy_denoiser_file=None,
    ),
}

COMFY_REPO_ID = "Comfy-Org/Lens"


def get_variant(name: str) -> VariantPreset:
    """Return the preset called `name` (case-insensitive; "Turbo" and "Base" are accepted as short names)."""
    wanted = name.strip().lower()
    for preset in VARIANTS.values():
        short = preset.name.lower().removeprefix("lens-")
        if wanted in (preset.name.lower(), short):
            return preset
    raise ValueError(f"Unknown Lens variant {name!r}; choose one of {sorted(VARIANTS)}.")


def variant_for_repo_id(repo_id: str) -> VariantPreset | None:
    """Return the variant a Hub id (official or mirror) belongs to, or None for an unknown repo."""
    for preset in VARIANTS.values():
        if repo_id in preset.repo_ids:
            return preset
    return None


# Aspect key W:H -> (width, height). Every size is a multiple of 16.
RESOLUTIONS: dict[int, dict[str, tuple[int, int]]] = {
    1024: {
        "1:2": (736, 1472),
        "9:16": (768, 1376),
        "2:3": (832, 1248),
        "3:4": (864, 1152),
        "1:1": (1024, 1024),
        "4:3": (1152, 864),
        "3:2": (1248, 832),
        "16:9": (1376, 768),
        "2:1": (1472, 736),
    },
    1440: {
        "1:2": (1040, 2080),
        "9:16": (1088, 1936),
        "2:3": (1168, 1760),
        "3:4": (1216, 1616),
        "1:1": (1440, 1440),
        "4:3": (1616, 1216),
        "3:2": (1760, 1168),
        "16:9": (1936, 1088),
        "2:1": (2080, 1040),
    },
}
ASPECT_RATIOS: tuple[str, ...] = tuple(RESOLUTIONS[1024])
DEFAULT_BASE_RESOLUTION = 1024
DEFAULT_ASPECT_RATIO = "1:1"

# Lens's 27 training buckets: areas 512, 768, 1024 x the nine ratios above (W, H).
TRAINING_BUCKETS: dict[int, dict[str, tuple[int, int]]] = {
    512: {
        "1:2": (352, 704),
        "9:16": (384, 672),
        "2:3": (416, 640),
        "3:4": (448, 608),
        "1:1": (512, 512),
        "4:3": (608, 448),
        "3:2": (640, 416),
        "16:9": (672, 384),
        "2:1": (704, 352),
    },
    768: {
        "1:2": (544, 1088),
        "9:16": (576, 1024),
        "2:3": (640, 960),
        "3:4": (672, 896),
        "1:1": (768, 768),
        "4:3": (896, 672),
        "3:2": (960, 640),
        "16:9": (1024, 576),
        "2:1": (1088, 544),
    },
    1024: RESOLUTIONS[1024],
}


def resolve_size(
    height: int | None = None,
    width: int | None = None,
    base_resolution: int | None = None,
    aspect_ratio: str | None = None,
    multiple: int = PIXELS_PER_TOKEN,
) -> tuple[int, int]:
    """Return (height, width) from explicit sizes or from a (base resolution, aspect ratio) preset.

    Explicit `height`/`width` win; a missing one is taken from the preset. Sizes must be positive multiples of
    `multiple`, the model's pixels per token (16 for Lens: VAE downsampling 8 x patch 2).
    """
    if (height is None or width is None) or base_resolution is not None or aspect_ratio is not None:
        base = DEFAULT_BASE_RESOLUTION if base_resolution is None else base_resolution
        if base not in RESOLUTIONS:
            raise ValueError(f"base_resolution must be one of {sorted(RESOLUTIONS)}, got {base_resolution!r}.")
        ratio = DEFAULT_ASPECT_RATIO if aspect_ratio is None else aspect_ratio
        if ratio not in RESOLUTIONS[base]:
            raise ValueError(f"aspect_ratio must be one of {list(ASPECT_RATIOS)} (W:H), got {aspect_ratio!r}.")
        preset_width, preset_height = RESOLUTIONS[base][ratio]
        height = preset_height if height is None else height
        width = preset_width if width is None else width
    for label, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(
                f"{label} must be a positive multiple of {multiple} pixels, got {value!r} "
                f"(the pixels one token covers: VAE downsampling x transformer patch)."
            )
    return height, width


# Sampler constants (LENS_SPEC section 5): mu is linear in the image token count, interpolated between the fits
# at 10 and 200 steps, with a single fit above 4300 tokens.
MU_SLOPE_10_STEPS = 8.73809524e-05
MU_INTERCEPT_10_STEPS = 1.89833333
MU_SLOPE_200_STEPS = 0.00016927
MU_INTERCEPT_200_STEPS = 0.45666666
MU_TOKEN_THRESHOLD = 4300


def compute_mu(image_seq_len: int, num_inference_steps: int) -> float:
    """The exponential time-shift parameter for `image_seq_len` = h*w image tokens and N steps."""
    m200 = MU_SLOPE_200_STEPS * image_seq_len + MU_INTERCEPT_200_STEPS
    if image_seq_len > MU_TOKEN_THRESHOLD:
        return float(m200)
    m10 = MU_SLOPE_10_STEPS * image_seq_len + MU_INTERCEPT_10_STEPS
    return float(m200 + (m200 - m10) / 190.0 * (num_inference_steps - 200))


def guidance_is_identity(guidance_scale: float) -> bool:
    """True when guidance cannot change the result, so the unconditional pass can be skipped: only at exactly 1,
    where uncond + 1 * (cond - uncond) = cond and the norm rescale is then a no-op. Below 1 the official pipeline
    still combines and rescales (at 0 the result is the unconditional velocity at the conditional norm)."""
    return guidance_scale == 1
