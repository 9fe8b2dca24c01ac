"""lens_core: run Microsoft's Lens text-to-image model from its official checkpoints, without Gradio.

Importing this package loads no weights and touches no files; the heavy modules are imported on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LensPipeline": ".pipeline_lens",
    "LensPipelineOutput": ".pipeline_lens",
    "LensTransformer2DModel": ".transformer_lens",
    "LensGptOssEncoder": ".text_encoder",
    "build_tiny_checkpoint": ".tiny",
    "VARIANTS": ".presets",
    "RESOLUTIONS": ".presets",
    "get_variant": ".presets",
    "render_prompt": ".prompt",
    "CheckpointError": ".loading",
    "MEMORY_MODES": ".memory",
    "apply_memory_mode": ".memory",
    "run_with_oom_guard": ".memory",
    "LensOutOfMemoryError": ".memory",
    "TextFeatureCache": ".text_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'lens_core' has no attribute {name!r}")
