"""The image-to-video denoising loop.

Numerically the loop of diffusers' CogVideoXImageToVideoPipeline (same generator consumption
order: image-latent sample, initial noise, then scheduler noise), reorganised so each stage can
run on its own with only its model on the GPU, and CFG can run one branch at a time.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import get_resize_crop_region_for_grid
from diffusers.schedulers import CogVideoXDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from cogvid_core.run.noise_ahead import closing_ahead, in_step, noise_ahead

from cogvid_core.model.variants import SPATIAL_COMPRESSION, Variant, check_video_shape, latent_frames, positions_note
from cogvid_core.speed import caches, stepcache
from cogvid_core.speed.multigpu import cfg_parallel, second_of
from cogvid_core.model.vae import ImageLatent, VideoLatents

SCHEDULERS = ("dpm", "ddim")
log = logging.getLogger(__name__)


def _ranks() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rotary_embedding(config, height: int, width: int, num_latent_frames: int, device):
    """RoPE tables for the video tokens, as the diffusers I2V pipeline builds them."""
    p, p_t = config.patch_size, config.patch_size_t
    gh, gw = height // (SPATIAL_COMPRESSION * p), width // (SPATIAL_COMPRESSION * p)
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops,
                                       grid_size=(gh, gw), temporal_size=num_latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=(gh, gw),
                                   temporal_size=(num_latent_frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


def dynamic_guidance(cfg: float, steps: int, t) -> float:
    # The official demo's schedule, including its use of the raw timestep value.
    return 1 + cfg * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)


def make_scheduler(kind):
    if not isinstance(kind, str):
        return kind
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {kind!r}")
    from cogvid_core.model.loading import load_scheduler
    return load_scheduler(None, kind)


def _device_dtype(module):
    p = next(module.parameters())
    return p.device, p.dtype


def check_args(variant: Variant, config, frames: int, height: int, width: int, steps: int, cfg: float,
               negative, cfg_mode: str) -> None:
    check_video_shape(variant, dict(config), frames, height, width)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if cfg_mode not in ("batched", "sequential"):
        raise ValueError(f"cfg_mode must be 'batched' or 'sequential', got {cfg_mode!r}")
    if cfg > 1.0 and negative is None:
        raise ValueError("cfg > 1 needs a negative prompt embedding (an empty prompt is fine)")


def image_latents(image: ImageLatent, variant: Variant, n_lat: int, channels: int, generator, device, dtype):
    """The start frame's latent followed by zeros for the other latent frames [1, F, C, h, w]. Its
    sample is the generator's first draw, as in diffusers."""
    mean, std = image.mean.to(device), image.std.to(device)
    noise = randn_tensor(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    first = (mean + std * noise).to(dtype).permute(0, 2, 1, 3, 4)            # [1, 1, C, h, w]
    # 1.5 was trained with the start latent divided by the scaling factor, 1.0 multiplied
    first = first / image.scale if variant.invert_scale_latents else first * image.scale
    h, w = first.shape[-2:]
    return torch.cat([first, first.new_zeros(1, n_lat - 1, channels, h, w)], dim=1)


def initial_noise(scheduler, steps: int, shape, generator, device, dtype) -> torch.Tensor:
    """Sets the scheduler's timesteps; the generator's second draw, scaled to the first step."""
    scheduler.set_timesteps(steps, device=device)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return latents * scheduler.init_noise_sigma


def scheduler_stepper(scheduler, generator):
    """``step(noise_pred, old_pred, i, latents) -> (latents, x0)`` for either scheduler: the next latents
    and the step's prediction of the clean latents, which DPM takes back as ``old_pred`` with the previous
    timestep; its noise, if any, comes from `generator`."""
    kwargs = {}
    params = inspect.signature(scheduler.step).parameters
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    timesteps = scheduler.timesteps
    if isinstance(scheduler, CogVideoXDPMScheduler):
        def step(noise_pred, old_pred, i, latents):
            return scheduler.step(noise_pred, old_pred, timesteps[i], timesteps[i - 1] if i > 0 else None,
                                  latents, **kwargs, return_dict=False)
    else:
        def step(noise_pred, old_pred, i, latents):
            return scheduler.step(noise_pred, timesteps[i], latents, **kwargs, return_dict=False)
    return step


def preview_frame(x0: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """The middle latent frame of a prediction [1, F, C, h, w] as [1, C, h, w]: a view, no copy
    (``skip``: leading padding frames that decode drops)."""
    return x0[:, skip + (x0.shape[1] - skip) // 2]


@dataclass
class Denoiser:
    """The transformer call and classifier-free guidance of one run (fixed over its steps)."""
    transformer: torch.nn.Module
    positive: torch.Tensor
    negative: torch.Tensor | None      # None: no CFG
    rope: object
    ofs: torch.Tensor | None
    cfg: float
    steps: int
    dynamic_cfg: bool
    cfg_mode: str
    cache: stepcache.StepCache | None = None

    def run(self, x, embeds, t):
        return self.transformer(hidden_states=x, encoder_hidden_states=embeds, timestep=t.expand(x.shape[0]),
                                ofs=self.ofs, image_rotary_emb=self.rope, return_dict=False)[0].float()

    def predict(self, x, t):
        """The noise prediction, or with CFG the (uncond, cond) pair, batched or one branch at a time."""
        if self.cache is not None:
            return self.cache.predict(lambda xs, embeds: self.run(xs, embeds, t), x, self.negative, self.positive, t)
        if self.negative is None:
            return self.run(x, self.positive, t)
        if self.cfg_mode == "batched":
            return self.run(torch.cat([x, x]), torch.cat([self.negative, self.positive]), t).chunk(2)
        return self.run(x, self.negative, t), self.run(x, self.positive, t)

    def guide(self, pred, t):
        if self.negative is None:
            return pred
        uncond, cond = pred
        scale = dynamic_guidance(self.cfg, self.steps, t) if self.dynamic_cfg else self.cfg
        return uncond + scale * (cond - uncond)


def denoise(denoiser: Denoiser, scheduler, latents, image_latents, generator, dtype, progress=None,
            interrupt=None, preview=None) -> torch.Tensor:
    """The loop: interrupt check, prediction, guidance, scheduler step, finite check, preview, progress.
    preview(i, total, x0) gets the step's prediction of the clean latents [1, F, C, h, w] (the tensor the
    scheduler made, not a copy)."""
    timesteps = scheduler.timesteps
    step = scheduler_stepper(scheduler, generator)
    keeps_x0 = isinstance(scheduler, CogVideoXDPMScheduler)   # DPM's second order step takes it back
    old_pred = None
    ahead = noise_ahead(generator, latents.device)   # the scheduler's CPU noise drawn while the GPU works
    with torch.inference_mode(), closing_ahead(ahead):
        for i, t in enumerate(timesteps):
            if interrupt is not None:
                interrupt()
            x = torch.cat([scheduler.scale_model_input(latents, t), image_latents], dim=2)
            pred = denoiser.predict(x, t)
            del x
            noise_pred = denoiser.guide(pred, t)
            del pred
            with in_step(ahead):
                latents, x0 = step(noise_pred, old_pred, i, latents)
            latents = latents.to(dtype)
            del noise_pred
            if not torch.isfinite(latents).all():   # stop now: the rest would only make a black video
                raise FloatingPointError(f"the latents became NaN/inf at step {i + 1}/{len(timesteps)} in {dtype}: "
                                         "use bf16 (CogVideoX1.5 overflows in fp16) or fp32")
            if preview is not None:
                preview(i, len(timesteps), x0)
            old_pred = x0 if keeps_x0 else None
            del x0
            if progress is not None:
                progress(i + 1, len(timesteps))
    return latents


def sample(transformer, variant: Variant, positive: torch.Tensor, negative: torch.Tensor | None,
           image: ImageLatent, frames: int, steps: int = 50, cfg: float = 6.0, dynamic_cfg: bool = True,
           scheduler="dpm", seed: int = 0, device=None, dtype=None, cfg_mode: str = "batched",
           progress=None, interrupt=None, cache="none", cache_stats: list | None = None,
           preview=None) -> VideoLatents:
    """Denoise a video from the start-image latent and prompt embeddings [1, 226, D].

    progress(done, total) is called after each step; interrupt() is called before each step
    and may raise to abort. cfg_mode "sequential" runs the two CFG branches one after the other
    (half the activation memory, same result up to kernel rounding). A transformer with a second
    device (multigpu.attach_second) runs the two branches at once, one per device, as "sequential" does.
    cache: a step cache (speed.caches.NAMES, e.g. "fbc:0.1"): diffusers' hooks on the transformer for this
    run only; its counts (caches.CacheStats) are appended to ``cache_stats`` when given.
    preview(i, total, frame): after each step, the middle latent frame [1, C, h, w] of that step's
    prediction of the clean video (a view of a tensor the step made anyway; None: nothing is done).
    """
    config = transformer.config
    check_args(variant, config, frames, image.height, image.width, steps, cfg, negative, cfg_mode)
    note = positions_note(variant, dict(config), frames)
    if note:
        log.warning(note)
    use_cfg = cfg > 1.0
    w_device, w_dtype = _device_dtype(transformer)
    device = torch.device(device) if device is not None else w_device
    dtype = dtype or w_dtype
    scheduler = make_scheduler(scheduler)
    generator = torch.Generator("cpu").manual_seed(int(seed))

    n_lat, pad = latent_frames(variant, frames)
    h, w = image.height // SPATIAL_COMPRESSION, image.width // SPATIAL_COMPRESSION
    channels = config.in_channels // 2
    # the generator's draws in diffusers' order: start-frame latent, initial noise, then scheduler noise
    start = image_latents(image, variant, n_lat, channels, generator, device, dtype)
    latents = initial_noise(scheduler, steps, (1, n_lat, channels, h, w), generator, device, dtype)

    rope = rotary_embedding(config, image.height, image.width, n_lat, device) if config.use_rotary_positional_embeddings else None
    ofs = latents.new_full((1,), 2.0) if config.ofs_embed_dim is not None else None
    denoiser = Denoiser(transformer, positive.to(device, dtype), negative.to(device, dtype) if use_cfg else None,
                        rope, ofs, cfg, steps, dynamic_cfg, cfg_mode)
    split = caches.PAIR if second_of(transformer) is not None and use_cfg else caches.TORCHRUN if _ranks() > 1 else None
    with stepcache.applied(transformer, cache, cfg_mode, use_cfg, split, steps) as step_cache:
        denoiser.cache = step_cache
        with cfg_parallel(denoiser) as denoiser:   # a transformer with a second GPU: the CFG branches at once
            frame = None if preview is None else lambda i, n, x0: preview(i, n, preview_frame(x0, pad))
            latents = denoise(denoiser, scheduler, latents, start, generator, dtype, progress, interrupt, frame)
    if step_cache is not None:
        stats = stepcache.finish_stats(step_cache)
        log.info(stats.line())
        if cache_stats is not None:
            cache_stats.append(stats)
    return VideoLatents(samples=latents.cpu(), frames=frames, height=image.height, width=image.width,
                        variant_key=variant.key, fps=variant.fps, drop_first=pad)
