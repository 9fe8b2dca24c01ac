"""The Lens training loop: LoRA / LoKr / full fine-tuning of the denoiser with rectified flow.

Order of a run: check everything that can be checked without a model (`training.preflight`: output folder, resume
target, machine, dataset), load the base, cache features (then free the text encoder), freeze the base in its
precision, add the adapter, build optimizer and schedule, restore a checkpoint if resuming, then loop: step, log,
validate, sample, checkpoint. Everything random comes from seeded generators whose states are checkpointed, so a
resumed run repeats the uninterrupted one step for step.

A stop request (`request_stop`, from SIGTERM or Ctrl-C) takes effect at the next step: between two training steps (a
checkpoint is written), at the next denoising step of a sample, at the next image while caching features.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from lens_core.atomic_io import atomic_build, atomic_write_text
from lens_core.lora import lora_from_peft_state_dict, save_lora
from lens_core.presets import compute_mu

from .base_precision import freeze_base
from .checkpoint import checkpoint_step, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .config import TrainConfig
from .data import DataPlan
from .feature_cache import FeatureCache
from .memory_estimate import detected_gpu_gib
from .preflight import run_preflight
from .prepare import CachedItem, PreparedData, StopRequested, free_text_encoder, prepare_data
from .run_log import RunLog

logger = logging.getLogger(__name__)

# Default LoRA targets: attention projections and MLPs of both streams (modulation excluded unless asked).
DEFAULT_TARGET_SUFFIXES = (
    "attn.img_qkv",
    "attn.txt_qkv",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.w1",
    "img_mlp.w2",
    "img_mlp.w3",
    "txt_mlp.w1",
    "txt_mlp.w2",
    "txt_mlp.w3",
)
MODULATION_SUFFIXES = ("img_mod.1", "txt_mod.1")
VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)  # fixed timesteps for the validation loss


def target_module_names(transformer, config: TrainConfig) -> list[str]:
    """Full names of the Linear layers the adapter wraps."""
    suffixes = tuple(config.adapter.target_modules) or DEFAULT_TARGET_SUFFIXES
    if config.adapter.train_modulation:
        suffixes = suffixes + MODULATION_SUFFIXES
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)]
    if not names:
        raise ValueError(
            f"adapter.target_modules {list(suffixes)} match no Linear layer of the denoiser "
            f"(layers look like 'transformer_blocks.0.attn.img_qkv')."
        )
    return names


def shifted_sigmas(u: torch.Tensor, image_tokens: int, shift_steps: int) -> torch.Tensor:
    """Logit-normal draw `u` -> sigma in (0, 1), shifted like the sampler at this token count (exponential shift)."""
    mu = compute_mu(image_tokens, shift_steps)
    sigma = torch.sigmoid(u)
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def epoch_batches(items: list[CachedItem], repeats: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The deterministic batch order of one epoch: shuffled, each batch from one bucket."""
    order = np.random.default_rng([seed, epoch]).permutation(np.repeat(np.arange(len(items)), repeats))
    queues: dict[tuple[int, int], list[int]] = {}
    batches = []
    for index in order.tolist():
        queue = queues.setdefault(items[index].bucket, [])
        queue.append(index)
        if len(queue) == batch_size:
            batches.append(list(queue))
            queue.clear()
    if not batches:
        raise ValueError(f"No bucket holds loop.batch_size={batch_size} images; lower the batch size or add images.")
    return batches


class LensTrainer:
    """One training run. `run(resume)` does everything; the pieces are methods so tests and tools can reuse them."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.stop_requested = False
        self.stopped = False  # True when the run ended on a stop request (the command line exits 130)

    def request_stop(self) -> None:
        """Stop at the next step (a checkpoint is written when the loop has begun). Safe from a signal handler."""
        self.stop_requested = True
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe._interrupt = True  # a sample being drawn ends at its next denoising step

    # -------------------------------------------------------------------------------------------------------------
    # Setup
    # -------------------------------------------------------------------------------------------------------------

    def _accelerator(self):
        from accelerate import Accelerator

        loop = self.config.loop
        kwargs = {}
        if loop.fsdp:
            from accelerate import FullyShardedDataParallelPlugin

            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin()
        # CPU autocast only slows tiny runs down; "fp32" is accelerate's "no".
        mixed = loop.mixed_precision if torch.cuda.is_available() and loop.mixed_precision != "fp32" else "no"
        return Accelerator(
            mixed_precision=mixed, gradient_accumulation_steps=loop.gradient_accumulation_steps, **kwargs
        )

    def load(self, plan: DataPlan | None = None) -> None:
        """Load the pipeline, cache the data (`plan`: the dataset checked by the preflight), free the encoder, freeze
        the base and add the adapter."""
        from lens_core import LensPipeline

        self.accelerator = self._accelerator()
        self.device = self.accelerator.device
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model = self.config.model
        # The official weights are float32 (16.4 GB for the denoiser): load in bf16 unless fp32 is trained or kept.
        keep_fp32 = model.base_precision == "fp32" or self.config.adapter.method == "full"
        self.pipe = LensPipeline.from_pretrained(
            model.path,
            torch_dtype=torch.float32 if keep_fp32 else torch.bfloat16,
            transformer_file=model.transformer_file,
        )
        self.pipe.vae.to(torch.float32)  # cached latents are encoded in float32
        cache_dir = self.config.data.cache_dir or self.output_dir / "cache"
        self.cache = FeatureCache(cache_dir)
        self.data: PreparedData = prepare_data(
            self.pipe, self.config, self.cache, self.device, plan, should_stop=lambda: self.stop_requested
        )
        free_text_encoder(self.pipe)
        self.transformer = self._build_model(self.pipe.transformer)
        self.pipe.vae.to(self.device)

    def _build_model(self, transformer):
        config = self.config
        if config.adapter.method == "full":
            transformer.to(device=self.device, dtype=torch.float32).requires_grad_(True)
        else:
            freeze_base(transformer, config.model.base_precision, self.device)
            torch.manual_seed(config.loop.seed)  # adapter init
            with warnings.catch_warnings():
                # PEFT warns that LoRA layers over torchao (fp8) weights cannot be merged; nothing here merges.
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
                transformer.add_adapter(self._adapter_config(transformer), adapter_name="default")
            for parameter in transformer.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()  # fp32 adapter weights over a low-precision base
        if config.loop.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
        logger.info("Training %s: %.2f M trainable parameters", config.adapter.method, trainable / 1e6)
        return transformer

    def _adapter_config(self, transformer):
        from peft import LoKrConfig, LoraConfig

        adapter = self.config.adapter
        targets = target_module_names(transformer, self.config)
        if adapter.method == "lokr":
            return LoKrConfig(
                r=adapter.rank,
                alpha=adapter.alpha,
                rank_dropout=adapter.dropout,
                decompose_factor=adapter.lokr_factor,
                target_modules=targets,
            )
        return LoraConfig(
            r=adapter.rank,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=targets,
            init_lora_weights=True,
        )

    def _optimizer(self, parameters):
        opt = self.config.optimizer
        if opt.name == "adamw8bit":
            import bitsandbytes as bnb  # checked by the preflight

            return bnb.optim.AdamW8bit(parameters, lr=opt.learning_rate, weight_decay=opt.weight_decay)
        if opt.name == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(
                parameters,
                lr=opt.learning_rate,
                weight_decay=opt.weight_decay,
                relative_step=False,
                scale_parameter=False,
                warmup_init=False,
            )
        return torch.optim.AdamW(parameters, lr=opt.learning_rate, weight_decay=opt.weight_decay)

    def setup_training(self) -> None:
        """Optimizer, schedule, accelerate wrapping and the run's own generator."""
        from diffusers.optimization import get_scheduler

        self.trainable = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        optimizer = self._optimizer(list(self.trainable.values()))
        opt = self.config.optimizer
        name = "cosine" if opt.scheduler == "cosine" else "constant_with_warmup"
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=self.config.loop.max_steps
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.transformer, optimizer, scheduler)
        self.generator = torch.Generator().manual_seed(self.config.loop.seed)
        self.ema = (
            {n: p.detach().float().clone() for n, p in self.trainable.items()} if self.config.loop.ema_decay else None
        )
        self.step, self.epoch, self.batch_index = 0, 0, 0

    # -------------------------------------------------------------------------------------------------------------
    # Batches and loss
    # -------------------------------------------------------------------------------------------------------------

    def _collate(self, items: list[CachedItem]):
        latents = torch.stack([self.cache.get("latents", i.latent_key)["tokens"] for i in items])  # [B, L, C]
        texts = [self.cache.get_text(i.text_key) for i in items]  # B x 4 x [S_i, hidden]
        length = max(t[0].shape[0] for t in texts)
        embeds = [
            torch.stack([F.pad(t[k], (0, 0, 0, length - t[k].shape[0])) for t in texts]) for k in range(len(texts[0]))
        ]
        mask = torch.stack([torch.arange(length) < t[0].shape[0] for t in texts])  # [B, S]
        width, height = items[0].bucket
        pixels = self.pipe.pixels_per_token  # from the VAE config (16 for Lens)
        return latents, embeds, mask, (height // pixels, width // pixels)

    def flow_loss(self, latents, embeds, mask, grid, sigmas, noise) -> torch.Tensor:
        """Rectified flow: x_s = (1 - s) x0 + s noise, the model predicts v = noise - x0; MSE."""
        device = self.device
        latents, noise = latents.to(device), noise.to(device)
        sigma = sigmas.to(device)[:, None, None]  # [B, 1, 1]
        noisy = (1 - sigma) * latents + sigma * noise  # [B, L, C]
        prediction = self.model(
            hidden_states=noisy,
            encoder_hidden_states=[e.to(device) for e in embeds],
            encoder_hidden_states_mask=mask.to(device),
            timestep=sigmas.to(device),
            img_shapes=[(1, *grid)] * latents.shape[0],
            return_dict=False,
        )[0]
        return F.mse_loss(prediction.float(), (noise - latents).float())

    def _draw(self, latents, embeds, mask, grid):
        """Caption dropout (empty text = zero features and no text keys, as the sampler's negative), noise, sigmas."""
        batch = latents.shape[0]
        drop = torch.rand(batch, generator=self.generator) < self.config.data.caption_dropout  # [B]
        if drop.any():
            embeds = [e.masked_fill(drop[:, None, None], 0.0) for e in embeds]
            mask = mask & ~drop[:, None]
        noise = torch.randn(latents.shape, generator=self.generator)  # [B, L, C]
        loop = self.config.loop
        u = loop.timestep_logit_mean + loop.timestep_logit_std * torch.randn(batch, generator=self.generator)
        return embeds, mask, noise, shifted_sigmas(u, grid[0] * grid[1], loop.shift_steps)

    def train_step(self, batches: list[list[int]]) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss."""
        losses = []
        for indices in batches:
            latents, embeds, mask, grid = self._collate([self.data.train[i] for i in indices])
            embeds, mask, noise, sigmas = self._draw(latents, embeds, mask, grid)
            with self.accelerator.accumulate(self.model), self.accelerator.autocast():
                loss = self.flow_loss(latents, embeds, mask, grid, sigmas, noise)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.config.optimizer.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(list(self.trainable.values()), self.config.optimizer.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float().item())
        self._update_ema()
        return float(np.mean(losses))

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.config.loop.ema_decay
        for name, parameter in self.trainable.items():
            self.ema[name].mul_(decay).add_(parameter.detach().float(), alpha=1 - decay)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean loss on the held-out images at fixed noise and fixed timesteps (deterministic across runs)."""
        if not self.data.validation:
            return None
        self.model.eval()
        losses = []
        for index, item in enumerate(self.data.validation):
            if self.stop_requested:
                break
            latents, embeds, mask, grid = self._collate([item])
            generator = torch.Generator().manual_seed(10_000 + index)
            for sigma in VALIDATION_SIGMAS:
                noise = torch.randn(latents.shape, generator=generator)
                with self.accelerator.autocast():
                    losses.append(self.flow_loss(latents, embeds, mask, grid, torch.tensor([sigma]), noise).item())
        self.model.train()
        return float(np.mean(losses)) if losses else None

    # -------------------------------------------------------------------------------------------------------------
    # Samples, export, checkpoints
    # -------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def write_samples(self) -> list[str]:
        """Images for the fixed prompts and seeds with the current weights, saved under samples/."""
        monitor = self.config.monitor
        width, height = monitor.sample_size
        self.model.eval()
        paths = []
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for p_index, key in enumerate(self.data.sample_text_keys):
            layers = [layer[None].to(self.device) for layer in self.cache.get_text(key)]  # 4 x [1, S, hidden]
            for seed in monitor.sample_seeds:
                if self.stop_requested:
                    break
                image = self.pipe(
                    prompt_embeds=layers,
                    prompt_mask=torch.ones(layers[0].shape[:2], dtype=torch.bool, device=self.device),
                    height=height,
                    width=width,
                    num_inference_steps=monitor.sample_steps,
                    guidance_scale=monitor.sample_guidance,
                    generator=torch.Generator().manual_seed(seed),
                    callback_on_step_end=self._interrupt_on_stop,
                ).images[0]
                if self.stop_requested:  # interrupted half-way: not a sample of this step
                    break
                path = folder / f"step-{self.step:06d}-prompt{p_index}-seed{seed}.png"
                atomic_build(path, lambda temporary, image=image: image.save(temporary, format="PNG"))
                paths.append(str(path))
        self.model.train()
        return paths

    def _interrupt_on_stop(self, pipe, step, timestep, tensors) -> dict:
        if self.stop_requested:
            pipe._interrupt = True
        return {}

    def _peft_state(self, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Parameter names carry the adapter name (`...lora_A.default.weight`); PEFT files do not.
        return {
            re.sub(r"\.default(?=\.|$)", "", name): tensor.detach().float().cpu() for name, tensor in source.items()
        }

    def lens_lora(self, use_ema: bool = False):
        """The current adapter as a `LensLora` with the run's metadata."""
        source = self.ema if (use_ema and self.ema is not None) else self.trainable
        adapter = self.config.adapter
        metadata = {
            "lens.training_config": yaml.safe_dump(self.config.to_dict(), sort_keys=False),
            "lens.base_model": self.config.model.path,
            "lens.trigger_word": self.config.data.trigger_word,
            "lens.step": str(self.step),
        }
        options = (
            {"decompose_factor": adapter.lokr_factor, "rank_dropout": adapter.dropout}
            if adapter.method == "lokr"
            else {}
        )
        return lora_from_peft_state_dict(
            self._peft_state(source), adapter.method, adapter.rank, adapter.alpha, metadata, options
        )

    def _checkpoint_parts(self) -> dict:
        write_lora = None
        if self.config.adapter.method != "full":

            def write_lora(path):
                return save_lora(self.lens_lora(), path)

        return {
            "trainable": {n: p.detach().float().cpu().contiguous() for n, p in self.trainable.items()},
            "ema": None if self.ema is None else {n: t.cpu() for n, t in self.ema.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.generator),
            "state": {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index},
            "write_lora": write_lora,
        }

    def save_checkpoint(self) -> Path:
        path = save_checkpoint(
            self.output_dir, self.step, self._checkpoint_parts(), self.config.monitor.keep_checkpoints
        )
        self.progress.event("checkpoint", step=self.step, path=str(path))
        return path

    def restore(self, path: Path) -> None:
        """Load a checkpoint's weights, optimizer, schedule, RNG states and data position."""
        saved = load_checkpoint(path)
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(saved["trainable"][name].to(parameter))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved["rng"], self.generator)
        if self.ema is not None and saved["ema"] is not None:
            self.ema = {n: t.to(self.device) for n, t in saved["ema"].items()}
        state = saved["state"]
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        logger.info("Resumed from %s at step %d", path, self.step)

    def export(self) -> dict[str, str]:
        """Final weights: the LoRA in diffusers, ComfyUI and kohya key names (or the full denoiser)."""
        folder = self.output_dir / "lora"
        if self.config.adapter.method == "full":
            from lens_core.lora import atomic_save_safetensors

            path = self.output_dir / "transformer" / f"{self.config.name}.safetensors"
            state = {
                n: p.detach().to(torch.bfloat16).cpu()
                for n, p in self.accelerator.unwrap_model(self.model).state_dict().items()
            }
            atomic_save_safetensors(state, path, {"format": "pt", "lens.base_model": self.config.model.path})
            return {"transformer": str(path)}
        lora = self.lens_lora(use_ema=True)
        return {
            "diffusers": str(save_lora(lora, folder / f"{self.config.name}.safetensors", "diffusers")),
            "comfyui": str(save_lora(lora, folder / "comfyui" / f"{self.config.name}_comfyui.safetensors", "comfyui")),
            "kohya": str(save_lora(lora, folder / "kohya" / f"{self.config.name}_kohya.safetensors", "kohya")),
        }

    # -------------------------------------------------------------------------------------------------------------
    # The loop
    # -------------------------------------------------------------------------------------------------------------

    def _next_batches(self) -> list[list[int]]:
        loop, batches = self.config.loop, []
        for _ in range(loop.gradient_accumulation_steps):
            plan = epoch_batches(self.data.train, self.config.data.repeats, loop.batch_size, loop.seed, self.epoch)
            if self.batch_index >= len(plan):
                self.epoch, self.batch_index = self.epoch + 1, 0
                plan = epoch_batches(self.data.train, self.config.data.repeats, loop.batch_size, loop.seed, self.epoch)
            batches.append(plan[self.batch_index])
            self.batch_index += 1
        return batches

    def _monitor(self, final: bool = False) -> None:
        monitor = self.config.monitor
        if self.data.validation and (self.step % monitor.validate_every == 0 or final):
            loss = self.validation_loss()
            if loss is not None:
                self.progress.event("validation", step=self.step, val_loss=loss)
        if self.step == 0 or final or (monitor.sample_every and self.step % monitor.sample_every == 0):
            paths = self.write_samples()
            if paths:
                self.progress.event("samples", step=self.step, paths=paths)

    def run(self, resume: str | None = None) -> dict[str, str]:
        """Train to `loop.max_steps` (continuing from a checkpoint when `resume` is 'latest' or a path); returns the
        exported files, or {} when the run was stopped (then `self.stopped` is True)."""
        # Seconds, before any model is loaded; the GPU is the one accelerate gives this process (LOCAL_RANK).
        checks = run_preflight(self.config, resume, gpu_gib=detected_gpu_gib(int(os.environ.get("LOCAL_RANK", 0))))
        resume_step = checkpoint_step(checks.checkpoint) if checks.checkpoint is not None else None
        self.progress = RunLog(
            self.output_dir, self.config.loop.max_steps, self.config.monitor.tensorboard, resume_step=resume_step
        )
        try:
            report = checks.plan.report
            self.progress.event(
                "starting",
                step=resume_step or 0,
                max_steps=self.config.loop.max_steps,
                usable_images=report.usable,
                bad_images=len(report.bad_images),
                missing_captions=len(report.missing_captions),
                too_small=len(report.too_small),
            )
            return self._prepare_and_loop(checks.checkpoint, checks.plan)
        except StopRequested:
            return self._stop(resume_step or 0, checkpoint=False)
        finally:
            self.progress.close()

    def _prepare_and_loop(self, checkpoint: Path | None, plan: DataPlan) -> dict[str, str]:
        if self.stop_requested:
            raise StopRequested("stopped before loading")
        self.load(plan)
        self.setup_training()
        atomic_write_text(self.output_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        if checkpoint is not None:
            self.restore(checkpoint)
            self.progress.event("resumed", step=self.step, path=str(checkpoint), max_steps=self.config.loop.max_steps)
        else:
            self.progress.event(
                "started",
                step=0,
                max_steps=self.config.loop.max_steps,
                train_images=len(self.data.train),
                validation_images=len(self.data.validation),
                truncated_captions=self.data.truncated_captions,
            )
            self._monitor()
        return self._loop()

    def _stop(self, step: int, checkpoint: bool) -> dict[str, str]:
        if checkpoint:
            self.save_checkpoint()
        self.stopped = True
        self.progress.event("stopped", step=step, checkpoint=checkpoint)
        logger.warning("Stopped at step %d%s.", step, "; resume with --resume latest" if checkpoint else "")
        return {}

    def _loop(self) -> dict[str, str]:
        started = time.monotonic()
        while self.step < self.config.loop.max_steps:
            if self.stop_requested:  # e.g. during the step-0 samples, or right after a restore
                return self._stop(self.step, checkpoint=self.step > 0)
            loss = self.train_step(self._next_batches())
            self.step += 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"The loss became {loss} at step {self.step}; lower optimizer.learning_rate.")
            self.progress.step(self.step, loss, self.scheduler.get_last_lr()[0])
            done = self.step == self.config.loop.max_steps
            if self.stop_requested and not done:
                return self._stop(self.step, checkpoint=True)
            if not done:
                self._monitor()
            if self.step % self.config.monitor.checkpoint_every == 0 or done:
                self.save_checkpoint()
        self._monitor(final=True)
        outputs = self.export()
        self.progress.event("done", step=self.step, outputs=outputs, seconds=round(time.monotonic() - started, 1))
        return outputs
