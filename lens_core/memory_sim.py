"""Simulated peak memory of Lens at real size, without a GPU: `python -m lens_core.bench --simulate`.

The real-size components are built and run under `FakeTensorMode`: every tensor has its real shape, dtype and device
but no storage, so the 4.1 B denoiser, the 24-layer GPT-OSS encoder and the FLUX.2 VAE cost nothing to "load", and a
whole generation runs in seconds on a CPU. `LiveBytesTracker` (a `TorchDispatchMode`) sums the bytes of every live
storage per device as the ops run, so parameters, activations, temporaries and everything the memory modes move
between the devices are counted as they happen. The same tracker runs on real tensors too, which is how the simulator
is checked against real CPU runs (`run_calibrations`).

How the simulation stands in for a CUDA machine on a CPU-only build (each is said again where it is done):
- The GPU is the fake `meta` device. A CPU build cannot run autograd or Python indexing on fake *cuda* tensors (no
  CUDA device guard), while fake meta tensors behave like device tensors in every respect that matters here: they
  refuse to mix with CPU tensors, so a memory mode that forgot to move something fails as it would on a GPU.
- Attention runs as CUDA runs it: `F.scaled_dot_product_attention` with bf16 inputs and an additive mask takes the
  memory-efficient kernel on CUDA (flash attention takes no mask), which never materialises the [S, S] scores; the
  CPU build would fall back to the math path, which does. `_CudaKernelChoices` routes the call to that kernel.
- Data-dependent ops (the GPT-OSS router choosing experts, the scheduler looking up its step) have no values to
  look at: `nonzero` answers "everything is selected" (an upper bound: every expert runs with every token), and
  `.item()` answers a harmless constant (see `_DataDependentAnswers`).
- Quantized layers (bitsandbytes NF4 / int8, torchao fp8) are tensor subclasses that cannot wrap fake tensors; they
  are replaced by `StoredQuantizedLinear`, which holds byte buffers of exactly the real storage layout and makes
  the temporaries the real kernels make (a dequantized weight, or int8 activations and int32 accumulators).
- What CUDA adds on top (context, cuBLAS/cuDNN workspaces, allocator rounding and fragmentation) is the margin model
  below, `required_card_gib`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .presets import PIXELS_PER_TOKEN, guidance_is_identity

logger = logging.getLogger(__name__)

GIB = 2**30
SIMULATED_GPU = torch.device("meta")  # see the module docstring: fake meta tensors play the GPU
HOST = torch.device("cpu")

# ----------------------------------------------------------------------------------------------------------------
# The CUDA margin model: what a real GPU needs beyond the live tensor bytes the simulation counts
# ----------------------------------------------------------------------------------------------------------------

# The CUDA context (driver state, the CUDA runtime, and the kernels of torch, cuBLAS and cuDNN that are loaded).
# With lazy module loading (CUDA_MODULE_LOADING=LAZY, the default since CUDA 11.7) it is about 300-500 MiB on
# Ampere / Ada / Hopper with torch 2.x (PyTorch "CUDA semantics" notes; `nvidia-smi` on an idle `torch.cuda.init()`
# process). It is outside torch's allocator, so it counts against the card but not against `mem_get_info`'s free
# memory that `lens_core.memory.usable_vram_gb` reads.
CUDA_CONTEXT_GIB = 0.5
# cuBLAS workspace: PyTorch's default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" is 8.1 MiB per handle and stream, and
# 32 MiB on Hopper (c10/cuda/CUDABlas.cpp `getChosenWorkspaceSize`), plus the cuBLASLt workspace (1 MiB default,
# `TORCH_CUBLASLT_WORKSPACE_SIZE`). cuDNN convolution workspaces (the VAE) are chosen per layer by cuDNN's
# heuristics and bounded by free memory; 128 MiB covers the algorithms cuDNN 9 picks for 3x3 convolutions of 128-512
# channels (cuDNN `cudnnGetConvolutionForwardWorkspaceSize`). Both are allocator blocks, so they do count against
# usable memory.
CUDA_WORKSPACE_GIB = (32 + 1 + 128) / 1024
# The caching allocator rounds every block up (to 512 bytes, and large blocks to 2 MiB segments) and keeps freed
# blocks cached; the reserved memory of diffusion inference runs 5-15% above the allocated peak (PyTorch "CUDA
# semantics: memory management"; `torch.cuda.memory_reserved` vs `max_memory_allocated` in diffusers' memory docs).
ALLOCATOR_OVERHEAD = 0.10


def margin_constants() -> dict:
    """The margin model's constants, as the cached tables record them."""
    return {
        "cuda_context_gib": CUDA_CONTEXT_GIB,
        "cuda_workspace_gib": CUDA_WORKSPACE_GIB,
        "allocator_overhead": ALLOCATOR_OVERHEAD,
    }


def required_free_gib(peak_gib: float) -> float:
    """GPU memory that must be free for torch (what `usable_vram_gb` reports) for a simulated peak of `peak_gib`."""
    return peak_gib * (1 + ALLOCATOR_OVERHEAD) + CUDA_WORKSPACE_GIB


def required_card_gib(peak_gib: float) -> float:
    """Size of the card a simulated peak of `peak_gib` needs: the free memory plus the CUDA context."""
    return required_free_gib(peak_gib) + CUDA_CONTEXT_GIB


# ----------------------------------------------------------------------------------------------------------------
# Counting live bytes
# ----------------------------------------------------------------------------------------------------------------


class LiveBytesTracker(TorchDispatchMode):
    """Sums the bytes of every live tensor storage per device type, and the peak of that sum since `reset_peak()`.

    Every op's outputs are seen as they are made; a storage is counted once however many views it has, and is
    subtracted when it is freed (a weakref finalizer on the storage). Works on fake and on real tensors, so a
    simulated run and a real run are measured by the same code. `track()` adds tensors made before the tracker was
    entered (or by code that does not dispatch, such as safetensors loading).
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[str, int]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.excluded: set[int] = set()  # storages counted apart (e.g. file-mapped weights): see `exclude`

    def track(self, tensors) -> None:
        """Count tensors that already exist (parameters built before the tracker started)."""
        for tensor in tensors:
            self._register(tensor)

    def exclude(self, tensors) -> int:
        """Stop counting these tensors' storages (they are file-mapped, not materialised); returns their bytes."""
        total = 0
        for tensor in tensors:
            key = id(tensor.untyped_storage())
            if key in self._live and key not in self.excluded:
                device, size = self._live[key]
                self.current[device] -= size
                self.excluded.add(key)
                total += size
        return total

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self.peak = dict(self.current)

    def bytes_on(self, device: torch.device | str, peak: bool = False) -> int:
        kind = torch.device(device).type
        return (self.peak if peak else self.current).get(kind, 0)

    def _register(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)  # storages keep one Python object while they live, so the id is stable until freed
        if key in self._live:
            return
        device, size = tensor.device.type, storage.nbytes()
        self._live[key] = (device, size)
        self.current[device] = self.current.get(device, 0) + size
        self.peak[device] = max(self.peak.get(device, 0), self.current[device])
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        device, size = self._live.pop(key)
        if key in self.excluded:
            self.excluded.discard(key)
        else:
            self.current[device] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for item in tree_flatten(output)[0]:
            if isinstance(item, torch.Tensor):
                self._register(item)
        return output


class _DataDependentAnswers(TorchDispatchMode):
    """Fake tensors have no values: `nonzero` says every element is selected (an upper bound: the GPT-OSS router
    then runs every expert over every token slot); `.item()` says 0 for integers (the scheduler's step lookup),
    1.0 for floats (a step counter or a scale: nothing divides by zero) and False for booleans (no inf found)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default:
            source = args[0]
            return torch.zeros((source.numel(), source.dim()), dtype=torch.long, device=source.device)
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return False if dtype == torch.bool else (1.0 if dtype.is_floating_point else 0)
        return func(*args, **kwargs)


class _CudaKernelChoices(TorchFunctionMode):
    """Run attention with the kernel CUDA picks: memory-efficient SDPA (it takes an additive mask and never
    materialises the scores). A CPU build's fallback, the math path, would count [B, heads, S, S] scores that a GPU
    never holds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _efficient_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    batch, heads, length, _dim = query.shape  # [B, heads, S_q, head_dim]
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # as SDPA does: True = attend -> 0, False -> -inf, in the query dtype
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                attn_mask.logical_not(), float("-inf")
            )
        bias = attn_mask.expand(batch, heads, length, key.shape[-2])  # a view: the kernel reads it broadcast
    need_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    output = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, need_grad, dropout_p, is_causal, scale=scale
    )
    return output[0]  # [B, heads, S_q, head_dim]


@contextlib.contextmanager
def simulation(attention_as_cuda: bool = True) -> Iterator[LiveBytesTracker]:
    """A fake-tensor world that counts live bytes: build modules inside on `HOST` (or the meta device and then
    `to_empty`), move what runs on the GPU to `SIMULATED_GPU`, and read the tracker.

    `attention_as_cuda`: route SDPA on the simulated GPU to CUDA's memory-efficient kernel. For inference only: a
    function mode is not active when autograd recomputes checkpointed blocks, so training simulations run on the
    fake CPU device instead, where SDPA takes the CPU flash kernel, which keeps the same tensors as CUDA's
    memory-efficient one (the output and a float32 log-sum-exp per query).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Fake tensors made by ops are memoised with a weak reference; `Module.to()` swaps fake parameters in place,
    # which torch refuses for tensors with weak references. The memo only serves tracing, so it is switched off.
    fake_mode.fake_tensor_converter.set_tensor_memo = lambda tensor, value: None
    tracker = LiveBytesTracker()
    with contextlib.ExitStack() as stack:
        for mode in (fake_mode, _DataDependentAnswers(), tracker):
            stack.enter_context(mode)
        if attention_as_cuda:
            stack.enter_context(_CudaKernelChoices())
        yield tracker


# ----------------------------------------------------------------------------------------------------------------
# Quantized layers by their storage layout
# ----------------------------------------------------------------------------------------------------------------

NF4_BLOCK = 64  # bitsandbytes Params4bit default blocksize
NF4_NESTED_BLOCK = 256  # compress_statistics=True (the default): absmax quantized to uint8 in blocks of 256
NF4_CODE_ENTRIES = 16
NESTED_CODE_ENTRIES = 256


def quantized_weight_bytes(precision: str, out_features: int, in_features: int) -> int:
    """Bytes one quantized Linear weight occupies, from the storage layout of the library that makes it.

    nf4 (bitsandbytes `Params4bit`, blocksize 64, nested statistics): packed 4-bit codes (2 per byte), one uint8
    absmax per 64 weights, one float32 absmax per 256 of those, and the float32 code tables (16 and 256 entries).
    int8 (bitsandbytes `Int8Params`): int8 weights and one float32 scale per output row (`SCB`).
    fp8 / fp8-compute (torchao `Float8Tensor`, per-row): float8 weights and one float32 scale per output row.
    """
    count = out_features * in_features
    if precision == "nf4":
        blocks = math.ceil(count / NF4_BLOCK)
        return (
            math.ceil(count / 2)
            + blocks
            + 4 * (math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_CODE_ENTRIES + NESTED_CODE_ENTRIES + 1)
        )
    if precision in ("int8", "fp8", "fp8-compute"):
        return count + 4 * out_features
    raise ValueError(f"No storage layout for precision {precision!r}; known: nf4, int8, fp8, fp8-compute.")


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W made from its stored bytes for the matmul and dropped right after, in the forward and
    again in the backward (bitsandbytes' MatMul4Bit / MatMul8bitLt keep only the quantized weight for backward)."""

    @staticmethod
    def forward(ctx, x, stored, bias, layer):
        ctx.layer = layer
        ctx.save_for_backward(stored)
        return layer.quantized_matmul(x, bias)

    @staticmethod
    def backward(ctx, grad_output):
        layer = ctx.layer
        weight = layer.dequantized_weight(grad_output.dtype, grad_output.device)  # [out, in] temporary
        return grad_output @ weight, None, None, None


class StoredQuantizedLinear(nn.Linear):
    """Stands in for a quantized Linear (bitsandbytes NF4 / int8, torchao fp8) in the simulation.

    `weight` is a uint8 buffer of exactly the bytes the real layer stores (`quantized_weight_bytes`); the forward
    makes the temporaries the real kernel makes: NF4, fp8 weight-only and the int8 backward dequantize the weight
    to the compute dtype for the matmul; int8 quantizes the activations to int8 and accumulates in int32; fp8-compute
    quantizes the activations to fp8. Still an `nn.Linear`, so PEFT wraps it as it wraps the real layers.
    """

    def __init__(self, linear: nn.Linear, precision: str, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.precision, self.compute_dtype = precision, compute_dtype
        size = quantized_weight_bytes(precision, linear.out_features, linear.in_features)
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty(size, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)  # [out, in]

    def quantized_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else self.compute_dtype
        bias = None if bias is None else bias.to(dtype)
        if self.precision == "int8":  # LLM.int8: int8 activations with row scales, int32 accumulation
            rows = x.reshape(-1, self.in_features)  # [T, in]
            activations = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
            scales = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
            accumulated = torch.empty(rows.shape[0], self.out_features, dtype=torch.int32, device=x.device)
            del activations, scales
            out = accumulated.to(dtype).reshape(*x.shape[:-1], self.out_features)
            return out if bias is None else out + bias
        if self.precision == "fp8-compute":  # dynamic fp8 activations, one scale per row; fp8 matmul into bf16
            activations = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
            del activations
            out = torch.empty(*x.shape[:-1], self.out_features, dtype=dtype, device=x.device)
            return out if bias is None else out + bias
        return F.linear(x, self.dequantized_weight(dtype, x.device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantizedLinear.apply(x, self.weight, self.bias, self)
        return self.quantized_matmul(x, self.bias)


def replace_with_stored_quantized(model: nn.Module, names: list[str], precision: str, dtype: torch.dtype) -> int:
    """Swap the Linear layers called `names` for `StoredQuantizedLinear`s of `precision`; returns how many."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StoredQuantizedLinear(getattr(parent, child), precision, dtype))
    return len(names)


def quantize_transformer_as_stored(model: nn.Module, precision: str, device: torch.device | None = None) -> nn.Module:
    """`lens_core.quantization.quantize_transformer` for the simulation: the same layers (its keep list), stored
    as `StoredQuantizedLinear`s on `device`."""
    from .quantization import get_precision, quantizable_linear_names

    spec = get_precision(precision)
    if spec.name == "none":
        return model
    compute_dtype = model.time_text_embed.timestep_embedder.linear_1.weight.dtype
    names = quantizable_linear_names(model)
    if device is not None:
        for name in names:
            model.get_submodule(name).to(device)
    replace_with_stored_quantized(model, names, spec.name, compute_dtype)
    model.lens_precision = spec.name
    return model


# ----------------------------------------------------------------------------------------------------------------
# The real-size components, as the loader leaves them
# ----------------------------------------------------------------------------------------------------------------

# GPT-OSS-20B as LENS_SPEC section 3 states it (the denoiser's and the VAE's defaults are already the real ones).
REAL_ENCODER_CONFIG = {
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
}
# The real tokenizer renders PREFIX as its first 97 tokens (LENS_SPEC 3.1); the window is 512 tokens, so at most
# 512 - 97 = 415 text tokens reach the denoiser. The simulation uses the full window: a long prompt is the worst case.
REAL_PREFIX_TOKENS = 97


def build_modules_on_meta(
    encoder_config: dict, transformer_config: dict | None = None, vae_config: dict | None = None
) -> tuple:
    """(encoder, transformer, vae) built on the meta device (no memory): the encoder with MXFP4 expert bytes, as
    the official `text_encoder/` stores them. Materialise with `to_empty` and `cast_as_loaded`."""
    from diffusers import AutoencoderKLFlux2
    from transformers import GptOssConfig

    from .text_encoder import GPT_OSS_ROPE_PARAMETERS, LensGptOssEncoder
    from .transformer_lens import LensTransformer2DModel

    settings = {"rope_parameters": GPT_OSS_ROPE_PARAMETERS, "pad_token_id": 0, "eos_token_id": 0, **encoder_config}
    config = GptOssConfig(**settings)
    transformer_config = transformer_config or {}
    selected = tuple(transformer_config.get("selected_layer_index", (5, 11, 17, 23)))
    with torch.device("meta"):
        encoder = LensGptOssEncoder(config, selected, mxfp4=True)
        transformer = LensTransformer2DModel(**transformer_config)  # the defaults are the real config
        vae = AutoencoderKLFlux2(**(vae_config or {}))  # FLUX.2 VAE defaults: 32 latent channels, downsampling 8
    return encoder, transformer, vae


def cast_as_loaded(encoder: nn.Module, transformer: nn.Module, vae: nn.Module, dtype: torch.dtype) -> None:
    """The dtypes `lens_core.loading.load_components` gives: float weights in `dtype`, the encoder's layer norms in
    float32 (`text_encoder.FP32_MODULE_NAMES`), MXFP4 bytes untouched."""
    encoder.model.to(dtype)
    for layer in encoder.model.layers:
        layer.input_layernorm.float()
        layer.post_attention_layernorm.float()
    for model in (transformer, vae):  # nn.Module.to: diffusers' `to` only adds a warning about fp32 modules (none)
        nn.Module.to(model, dtype)


def build_simulated_pipeline(
    encoder_config: dict | None = None,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
):
    """A `LensPipeline` of fake components in host memory, as `load_pipeline` leaves it (call inside
    `simulation()`). Without a tokenizer: `simulate_mode` gives it `_WindowTokenizer`, which only counts tokens."""
    encoder, transformer, vae = build_modules_on_meta(
        encoder_config or REAL_ENCODER_CONFIG, transformer_config, vae_config
    )
    encoder, transformer, vae = (module.to_empty(device=HOST) for module in (encoder, transformer, vae))
    cast_as_loaded(encoder, transformer, vae, dtype)
    for module in (encoder, transformer, vae):
        module.eval().requires_grad_(False)
    pipe = pipeline_of(encoder, transformer, vae)
    pipe.__class__ = _simulated_pipeline_class()
    return pipe


def pipeline_of(text_encoder, transformer, vae):
    """A quiet `LensPipeline` around these components with the official scheduler and no tokenizer (the simulations
    feed text features or count tokens themselves)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .pipeline_lens import LensPipeline
    from .tiny import SCHEDULER_CONFIG

    pipe = LensPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder=text_encoder,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _simulated_pipeline_class():
    from .pipeline_lens import LensPipeline

    class SimulatedLensPipeline(LensPipeline):
        """diffusers' `_execution_device` prefers any non-CPU, non-meta component; on a GPU that is the CUDA device
        the denoiser sits on. The simulated GPU *is* the meta device, so it is named here."""

        @property
        def _execution_device(self):
            return SIMULATED_GPU

    return SimulatedLensPipeline


class _WindowTokenizer:
    """Token counts of the real GPT-OSS tokenizer for the three segments `tokenize_prompts` encodes: PREFIX is 97
    tokens, the prompt is longer than any window (the worst case: the window is full)."""

    pad_token_id = 199999  # <|endoftext|>
    prefix_tokens = REAL_PREFIX_TOKENS
    suffix_tokens = 28  # the SUFFIX segment; with a full window its length only moves tokens between prompt and suffix

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        from .prompt import SUFFIX, render_prefix

        if text == render_prefix():
            count = self.prefix_tokens
        elif text == SUFFIX:
            count = self.suffix_tokens
        else:
            count = 100_000
        return {"input_ids": [0] * count}


# ----------------------------------------------------------------------------------------------------------------
# One whole generation per mode
# ----------------------------------------------------------------------------------------------------------------

SIMULATED_STEPS = 2  # every denoising step allocates and frees the same tensors: two steps show the steady state


@dataclass(frozen=True)
class GenerationCase:
    """One image to simulate: the variant gives the guidance (Lens: 5.0 with the unconditional batch; Lens-Turbo:
    1.0 without it)."""

    variant: str
    width: int
    height: int


@dataclass
class GenerationPeak:
    """Simulated GPU peaks of one generation, GiB. `peak_gib` is the whole generation's (the largest phase);
    `card_gib` adds the CUDA margin (`required_card_gib`)."""

    mode: str
    variant: str
    width: int
    height: int
    guidance_scale: float
    encode_peak_gib: float
    denoise_peak_gib: float
    decode_peak_gib: float
    peak_gib: float = 0.0
    card_gib: float = 0.0

    def __post_init__(self):
        self.peak_gib = max(self.encode_peak_gib, self.denoise_peak_gib, self.decode_peak_gib)
        self.card_gib = required_card_gib(self.peak_gib)


@dataclass
class HostMemory:
    """System RAM of loading a mode from the official float32 shards and placing it, GiB.

    `load_gib`: materialised right after loading (float32 weights cast to bf16 are new memory; tensors already in
    their loaded dtype, such as the encoder's MXFP4 bytes and bf16 layers, stay mapped from the safetensors files).
    `mapped_gib`: those file-mapped bytes (page cache: evictable, but read from disk again when evicted).
    `placed_gib`: what the mode keeps in CPU memory after placement, pinned copies included (CUDA pins what it
    swaps or streams; a pinned copy of a mapped tensor is new memory). `peak_gib`: the larger of the two, plus
    what generation adds on the host.
    """

    load_gib: float
    mapped_gib: float
    placed_gib: float
    peak_gib: float


@dataclass
class ModeReport:
    """Everything the simulation says about one memory mode."""

    mode: str
    resident_gib: float  # on the GPU after placement, before anything runs
    host: HostMemory
    cases: list[GenerationPeak] = field(default_factory=list)


def _mapped_encoder_tensors(encoder: nn.Module) -> list[torch.Tensor]:
    """The encoder tensors the loader leaves file-mapped: stored in the file in the dtype they are loaded in (MXFP4
    bytes and bf16 weights). The expert biases are float32 in the file and the layer norms are loaded as float32
    from bf16, so those are materialised copies."""
    tensors = []
    for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]:
        if "rotary_emb" in name or name.endswith("_bias") or tensor.dtype == torch.float32:
            continue
        tensors.append(tensor)
    return tensors


def _pinned_extra_bytes(pipe, tracker: LiveBytesTracker) -> int:
    """Bytes CUDA's pinning adds: a pinned copy of every swapped / streamed tensor whose home is file-mapped (a
    materialised home is replaced by its pinned copy, so it costs nothing extra)."""
    offloads = [
        *getattr(pipe.text_encoder, "lens_offloads", []),
        *getattr(pipe.transformer, "lens_pinned_offloads", []),
    ]
    total = 0
    for offload in offloads:
        for _tensor, home in offload.tensors:
            if id(home.untyped_storage()) in tracker.excluded:
                total += home.numel() * home.element_size()
    return total


def _simulated_model_offload(pipe, device: torch.device) -> None:
    """diffusers' model CPU offload: one whole component on the GPU at a time. The encoder and the denoiser are
    swapped with the project's own offload hooks (same peak: diffusers keeps a model on the GPU until the next one
    runs; accelerate does not pin, so nothing is counted as pinned). The VAE decodes through `decode()`, not
    `forward()`, which diffusers hooks separately: here it stays on the GPU (0.16 GiB more than diffusers)."""
    from .memory import _attach_offload

    _attach_offload(pipe.text_encoder, device)
    _attach_offload(pipe.transformer, device)
    pipe.vae.to(device)


def _simulated_block_offload(transformer: nn.Module, device: torch.device) -> None:
    """diffusers' block-level group offload with CUDA streams: one block on the GPU while it runs, plus the next one
    being prefetched on the side stream (held here as one block's worth of bytes); the CPU copies are pinned, as
    diffusers pins them for streams. The small modules around the blocks (input / output projections, time
    embedding) stay on the GPU (diffusers onloads them as one more group; an upper bound of about 0.1 GiB)."""
    from .memory import _attach_offload

    offloads = [_attach_offload(block, device) for block in transformer.transformer_blocks]
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(device)
    block_bytes = max(offload.num_bytes() for offload in offloads)
    transformer.lens_prefetched_block = torch.empty(block_bytes, dtype=torch.uint8, device=device)
    transformer.lens_pinned_offloads = offloads


def simulate_mode(
    mode: str,
    cases: list[GenerationCase],
    encoder_config: dict | None = None,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    steps: int = SIMULATED_STEPS,
    precision: str | None = None,
) -> ModeReport:
    """Load (fake), place as `mode` places, encode one full-window prompt, then generate each case; GPU and host
    bytes are counted throughout. The defaults are the real-size model. `precision` overrides the mode's denoiser
    precision (as `apply_memory_mode(..., transformer_precision=...)` / `--precision` do)."""
    from .memory import PlacementBackend, get_memory_mode, place_components
    from .presets import VARIANTS

    spec = get_memory_mode(mode)
    backend = PlacementBackend(
        quantize_transformer_as_stored, _simulated_model_offload, _simulated_block_offload, dense_experts=False
    )
    with simulation() as tracker:
        pipe = build_simulated_pipeline(encoder_config, transformer_config, vae_config)
        pipe.tokenizer = _WindowTokenizer()
        mapped = tracker.exclude(_mapped_encoder_tensors(pipe.text_encoder))
        load = tracker.bytes_on(HOST)
        place_components(pipe, spec, precision or spec.transformer_precision, SIMULATED_GPU, backend)
        resident = tracker.bytes_on(SIMULATED_GPU)
        placed = tracker.bytes_on(HOST) + _pinned_extra_bytes(pipe, tracker)
        tracker.reset_peak()
        embeds, mask, _, _ = pipe.encode_prompt(
            "a long prompt", device=SIMULATED_GPU, do_classifier_free_guidance=False
        )
        encode_peak = tracker.bytes_on(SIMULATED_GPU, peak=True)
        host_peak = tracker.bytes_on(HOST, peak=True) - tracker.bytes_on(HOST) + placed
        report_cases = []
        for case in cases:
            guidance = VARIANTS[case.variant].guidance_scale
            peaks = _generate(pipe, tracker, embeds, mask, case, guidance, steps)
            host_peak = max(host_peak, tracker.bytes_on(HOST, peak=True) - tracker.bytes_on(HOST) + placed)
            report_cases.append(
                GenerationPeak(mode, case.variant, case.width, case.height, guidance, encode_peak / GIB, *peaks)
            )
    host = HostMemory(load / GIB, mapped / GIB, placed / GIB, max(load, host_peak) / GIB)
    return ModeReport(mode_key(mode, precision), resident / GIB, host, report_cases)


def _generate(pipe, tracker: LiveBytesTracker, embeds, mask, case: GenerationCase, guidance: float, steps: int):
    """One `pipe(...)` call from the encoded features; returns (denoise peak, decode peak) in GiB."""
    marks = {}

    def end_of_step(_pipe, step, _timestep, _tensors):
        if step == steps - 1:  # denoising is over: the rest of the call is decoding
            marks["denoise"] = tracker.bytes_on(SIMULATED_GPU, peak=True)
            tracker.reset_peak()
        return {}

    tracker.reset_peak()
    images = pipe(
        prompt_embeds=embeds,
        prompt_mask=mask,
        width=case.width,
        height=case.height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="pt",
        callback_on_step_end=end_of_step,
    ).images
    decode = tracker.bytes_on(SIMULATED_GPU, peak=True)
    del images
    return marks["denoise"] / GIB, decode / GIB


# ----------------------------------------------------------------------------------------------------------------
# The VAE alone: decode peaks tiled and untiled
# ----------------------------------------------------------------------------------------------------------------


def simulate_vae_decode(width: int, height: int, tile_px: int | None, vae_config: dict | None = None) -> float:
    """GiB the bf16 FLUX.2 VAE needs on the GPU to decode one `width` x `height` image (weights included), in tiles
    of `tile_px` pixels as the memory modes set them (None: in one piece)."""
    from diffusers import AutoencoderKLFlux2

    from .latents import LatentLayout, decode_tokens
    from .memory import _enable_vae_tiling

    with simulation() as tracker:
        with torch.device("meta"):
            vae = AutoencoderKLFlux2(**(vae_config or {}))
        vae = vae.to_empty(device=SIMULATED_GPU).to(torch.bfloat16).eval().requires_grad_(False)
        if tile_px:
            _enable_vae_tiling(vae, tile_px)
        layout = LatentLayout.from_vae(vae)  # the token grid and channels from the VAE's own config
        height_tokens, width_tokens = height // layout.pixels_per_token, width // layout.pixels_per_token
        tokens = torch.empty(1, height_tokens * width_tokens, layout.packed_channels, device=SIMULATED_GPU)  # float32
        tracker.reset_peak()
        with torch.no_grad():
            image = decode_tokens(vae, tokens, height_tokens, width_tokens)
        del image
        return tracker.bytes_on(SIMULATED_GPU, peak=True) / GIB


# ----------------------------------------------------------------------------------------------------------------
# The table: every mode x variant x size, the VAE, and host memory; cached in the package
# ----------------------------------------------------------------------------------------------------------------

TABLE_FILE = "memory_table.json"
REGENERATE_COMMAND = "python -m lens_core.bench --simulate --write-table"
# 1024 and 1440 squares, and the largest preset (1:2 at the 1440 area, 8450 tokens; 2:1 has the same count).
REAL_SIZES = ((1024, 1024), (1440, 1440), (1040, 2080))
TABLE_VARIANTS = ("Lens", "Lens-Turbo")
VAE_TILES = (None, 1024, 512)
# Denoiser precision overrides worth a row: what `--precision` makes of the 8 GB mode.
PRECISION_OVERRIDES = (("minimal", "fp8"), ("minimal", "int8"))


def mode_key(mode: str, precision: str | None = None) -> str:
    """The table's key for a mode, or for a mode with its denoiser precision overridden ("minimal/fp8")."""
    return mode if precision is None else f"{mode}/{precision}"


# The small configuration the test suite simulates again and compares with the cached table (seconds on a CPU):
# real layer types, toy widths.
CHECK_ENCODER_CONFIG = {
    **REAL_ENCODER_CONFIG,
    "num_hidden_layers": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 64,
    "head_dim": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CHECK_TRANSFORMER_CONFIG = {
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "inner_dim": 64,
    "enc_hidden_dim": 64,
    "axes_dims_rope": [4, 6, 6],
    "selected_layer_index": [0, 1, 2, 3],
}
CHECK_VAE_CONFIG = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}
CHECK_SIZES = ((256, 256), (256, 512))
CHECK_MODES = ("full", "low", "minimal")


def simulate_table(
    modes=None,
    sizes=REAL_SIZES,
    variants=TABLE_VARIANTS,
    encoder_config=None,
    transformer_config=None,
    vae_config=None,
    overrides=PRECISION_OVERRIDES,
) -> dict:
    """Simulate every mode x variant x size (and the precision overrides) and the VAE decode sizes; returns the
    table as plain data (GiB)."""
    from .memory import MEMORY_MODES

    cases = [GenerationCase(variant, width, height) for width, height in sizes for variant in variants]
    reports = {}
    for mode, precision in [(mode, None) for mode in modes or MEMORY_MODES] + list(overrides):
        logger.info("Simulating memory mode %s (%d cases)", mode_key(mode, precision), len(cases))
        report = simulate_mode(mode, cases, encoder_config, transformer_config, vae_config, precision=precision)
        reports[report.mode] = asdict(report)
    vae = [
        {
            "width": width,
            "height": height,
            "tile_px": tile,
            "peak_gib": simulate_vae_decode(width, height, tile, vae_config),
        }
        for width, height in sizes
        for tile in VAE_TILES
    ]
    return {"modes": reports, "vae_decode": vae}


def build_memory_table() -> dict:
    """The cached table: the real-size simulation, the margin constants, and the small check configuration."""
    return {
        "regenerate": REGENERATE_COMMAND,
        "torch": torch.__version__.split("+")[0],
        "steps_simulated": SIMULATED_STEPS,
        "text_tokens": 512 - REAL_PREFIX_TOKENS,
        "margin": margin_constants(),
        "real": simulate_table(),
        "check": simulate_check_table(),
    }


def simulate_check_table() -> dict:
    """The small configuration of the cached table (see CHECK_*), simulated now."""
    return simulate_table(
        CHECK_MODES, CHECK_SIZES, ("Lens",), CHECK_ENCODER_CONFIG, CHECK_TRANSFORMER_CONFIG, CHECK_VAE_CONFIG, ()
    )


def table_path():
    from pathlib import Path

    return Path(__file__).with_name(TABLE_FILE)


def write_memory_table(table: dict) -> None:
    import json

    from .atomic_io import atomic_write_text

    atomic_write_text(table_path(), json.dumps(table, indent=1, sort_keys=True) + "\n")


@functools.cache
def load_memory_table() -> dict:
    """The cached table shipped with the package (regenerate with REGENERATE_COMMAND)."""
    import json

    path = table_path()
    if not path.is_file():
        raise ValueError(f"The simulated memory table {path} is missing; regenerate it with: {REGENERATE_COMMAND}")
    return json.loads(path.read_text())


def _tokens(width: int, height: int) -> int:
    return (width // PIXELS_PER_TOKEN) * (height // PIXELS_PER_TOKEN)


def generation_peak_gib(
    mode: str, width: int, height: int, guidance_scale: float, precision: str | None = None, table: dict | None = None
) -> float:
    """Simulated peak GiB of one generation in `mode`, from the cached table: the case with the same unconditional
    batch (every guidance but exactly 1) and the fewest image tokens at or above this image's; beyond the largest case, extended
    along the line through the two largest (activations grow linearly in the token count: attention never holds
    the scores)."""
    table = table or load_memory_table()
    key = mode_key(mode, precision)
    if key not in table["real"]["modes"]:
        if mode not in table["real"]["modes"]:
            raise ValueError(f"The simulated memory table has no mode {mode!r}; regenerate it: {REGENERATE_COMMAND}")
        # An override the table does not have: the mode's own peak, moved by the difference in denoiser weights.
        from .memory import get_memory_mode

        own = get_memory_mode(mode).transformer_precision
        shift = denoiser_weight_gib(precision) - denoiser_weight_gib(own)
        return generation_peak_gib(mode, width, height, guidance_scale, None, table) + shift
    cfg = not guidance_is_identity(guidance_scale)
    points = sorted(
        (_tokens(case["width"], case["height"]), case["peak_gib"])
        for case in table["real"]["modes"][key]["cases"]
        if (not guidance_is_identity(case["guidance_scale"])) == cfg
    )
    tokens = _tokens(width, height)
    for case_tokens, peak in points:
        if case_tokens >= tokens:
            return peak
    (tokens_a, peak_a), (tokens_b, peak_b) = points[-2], points[-1]
    return peak_b + (peak_b - peak_a) / (tokens_b - tokens_a) * (tokens - tokens_b)


@functools.cache
def denoiser_weight_gib(precision: str) -> float:
    """GiB of the real-size denoiser's weights in `precision` (quantized layers by their storage layout, the
    layers `lens_core.quantization` keeps in bf16 as bf16)."""
    from .quantization import get_precision, quantizable_linear_names
    from .transformer_lens import LensTransformer2DModel

    name = get_precision(precision).name
    with torch.device("meta"):
        model = LensTransformer2DModel()
    quantized = set(quantizable_linear_names(model)) if name != "none" else set()
    total = 0
    for module_name, module in model.named_modules():
        for tensor_name, tensor in module.named_parameters(recurse=False):
            if module_name in quantized and tensor_name == "weight":
                total += quantized_weight_bytes(name, *tensor.shape)
            else:
                total += tensor.numel() * 2  # bf16
    return total / GIB


def host_peak_gib(mode: str, table: dict | None = None) -> float:
    """Simulated system-RAM peak (GiB, materialised memory) of loading and placing `mode`, from the cached table."""
    table = table or load_memory_table()
    return table["real"]["modes"][mode]["host"]["peak_gib"]


# ----------------------------------------------------------------------------------------------------------------
# Markdown for BENCHMARKS.md and the README
# ----------------------------------------------------------------------------------------------------------------


def _size(width: int, height: int) -> str:
    return f"{width}x{height}"


def format_generation_table(table: dict) -> str:
    """Every mode x variant x size: resident weights, the phase peaks, the whole generation's peak and the card it
    needs, next to an empty measured column."""
    lines = [
        "| mode | variant | size | resident GiB | encode peak GiB | denoise peak GiB | decode peak GiB "
        "| **simulated peak GiB** | card needed GiB | measured peak GiB |",
        "|" + "---|" * 10,
    ]
    for mode, report in table["real"]["modes"].items():
        for case in report["cases"]:
            lines.append(
                f"| {mode} | {case['variant']} | {_size(case['width'], case['height'])} | {report['resident_gib']:.2f} "
                f"| {case['encode_peak_gib']:.2f} | {case['denoise_peak_gib']:.2f} | {case['decode_peak_gib']:.2f} "
                f"| **{case['peak_gib']:.2f}** | {case['card_gib']:.1f} | |"
            )
    return "\n".join(lines) + "\n"


def format_host_table(table: dict) -> str:
    """System RAM of loading and placing each mode from the official float32 shards."""
    lines = [
        "| mode | materialised after loading GiB | file-mapped (page cache) GiB | held after placement GiB "
        "| **simulated RAM peak GiB** | measured GiB |",
        "|---|---|---|---|---|---|",
    ]
    for mode, report in table["real"]["modes"].items():
        host = report["host"]
        lines.append(
            f"| {mode} | {host['load_gib']:.2f} | {host['mapped_gib']:.2f} | {host['placed_gib']:.2f} "
            f"| **{host['peak_gib']:.2f}** | |"
        )
    return "\n".join(lines) + "\n"


def format_vae_table(table: dict) -> str:
    """The bf16 VAE alone decoding one image, in one piece and in the memory modes' tiles."""
    lines = ["| size | tiles | simulated peak GiB (weights included) |", "|---|---|---|"]
    for row in table["real"]["vae_decode"]:
        tiles = f"{row['tile_px']} px" if row["tile_px"] else "none"
        lines.append(f"| {_size(row['width'], row['height'])} | {tiles} | {row['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Calibration: the simulator against real runs on this machine's CPU
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def real_tracking() -> Iterator[LiveBytesTracker]:
    """The simulator's tracker on real tensors: what a real run allocates, counted the same way."""
    tracker = LiveBytesTracker()
    with tracker:
        yield tracker


@dataclass
class Calibration:
    """A simulated run next to the real run of the same thing (GiB): the peak over the weights ("activations")."""

    what: str
    simulated_gib: float
    real_gib: float

    @property
    def difference(self) -> float:
        """(simulated - real) / real."""
        return (self.simulated_gib - self.real_gib) / self.real_gib


def denoiser_activation_peak(
    transformer_config: dict,
    width: int,
    height: int,
    text_tokens: int,
    dtype: torch.dtype,
    backward: bool,
    fake: bool,
    batch: int = 1,
) -> float:
    """Peak bytes over the weights of one denoiser forward (and backward with gradient checkpointing when
    `backward`), on fake tensors or on real CPU tensors; GiB."""
    from .transformer_lens import LensTransformer2DModel

    with simulation(attention_as_cuda=False) if fake else real_tracking() as tracker:
        with torch.device("meta"):
            model = LensTransformer2DModel(**transformer_config)
        model = nn.Module.to(model.to_empty(device=HOST), dtype)
        if not fake:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.normal_(0.0, 0.02)
        model.requires_grad_(backward).train(backward)
        if backward:
            model.enable_gradient_checkpointing()
        grid = (height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)
        tokens = torch.randn(batch, grid[0] * grid[1], model.config.in_channels, dtype=dtype)  # [B, L, 128]
        text = [torch.randn(batch, text_tokens, model.config.enc_hidden_dim, dtype=dtype) for _ in range(4)]
        mask = torch.ones(batch, text_tokens, dtype=torch.bool)
        timestep = torch.full((batch,), 0.5)
        weights = tracker.bytes_on(HOST)
        tracker.reset_peak()
        with torch.set_grad_enabled(backward):
            output = model(tokens, text, mask, timestep, (1, *grid), return_dict=False)[0]  # [B, L, 128]
            if backward:
                output.float().square().mean().backward()
        del output
        return (tracker.bytes_on(HOST, peak=True) - weights) / GIB


def calibrate_denoiser(
    transformer_config: dict, width: int, height: int, text_tokens: int, dtype: torch.dtype, backward: bool
) -> Calibration:
    """The simulated activation peak of a denoiser pass next to a real CPU run of the same pass."""
    args = (transformer_config, width, height, text_tokens, dtype, backward)
    blocks = transformer_config.get("num_layers", 48)
    width_dim = transformer_config.get("num_attention_heads", 24) * transformer_config.get("attention_head_dim", 64)
    what = (
        f"{blocks} blocks of width {width_dim}, {width}x{height}, {text_tokens} text tokens, "
        f"{str(dtype).removeprefix('torch.')}, {'forward + backward (checkpointing)' if backward else 'forward'}"
    )
    return Calibration(what, denoiser_activation_peak(*args, fake=True), denoiser_activation_peak(*args, fake=False))


# Two real-width blocks at 512x512 (1024 image tokens and the full text window), as LENS_SPEC section 2 builds them.
CALIBRATION_TRANSFORMER_CONFIG = {"num_layers": 2}


def run_calibrations() -> list[Calibration]:
    """`python -m lens_core.bench --calibrate`: real-width blocks, forward in bf16 and forward + backward in fp32."""
    text = 512 - REAL_PREFIX_TOKENS
    return [
        calibrate_denoiser(CALIBRATION_TRANSFORMER_CONFIG, 512, 512, text, torch.bfloat16, backward=False),
        calibrate_denoiser(CALIBRATION_TRANSFORMER_CONFIG, 512, 512, text, torch.float32, backward=True),
    ]


def format_calibration(rows: list[Calibration]) -> str:
    lines = ["| run | simulated GiB | real CPU run GiB | difference |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.what} | {row.simulated_gib:.4f} | {row.real_gib:.4f} | {100 * row.difference:+.2f}% |")
    return "\n".join(lines) + "\n"
