"""The image-to-video denoising loop.

Numerically the loop of diffusers' CogVideoXImageToVideoPipeline (same generator consumption
order: image-latent sample, initial noise, then scheduler noise), reorganised so each stage can
run on its own with only its model on the GPU, and CFG can run one branch at a time.
"""
from __future__ import annotations

import inspect
import math

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import get_resize_crop_region_for_grid
from diffusers.schedulers import CogVideoXDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .models import SPATIAL_COMPRESSION, Variant, check_video_shape, latent_frames
from .vae import ImageLatent, VideoLatents

SCHEDULERS = ("dpm", "ddim")


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
    from .loading import load_scheduler
    return load_scheduler(None, kind)


def _device_dtype(module):
    p = next(module.parameters())
    return p.device, p.dtype


def sample(transformer, variant: Variant, positive: torch.Tensor, negative: torch.Tensor | None,
           image: ImageLatent, frames: int, steps: int = 50, cfg: float = 6.0, dynamic_cfg: bool = True,
           scheduler="dpm", seed: int = 0, device=None, dtype=None, cfg_mode: str = "batched",
           progress=None, interrupt=None) -> VideoLatents:
    """Denoise a video from the start-image latent and prompt embeddings [1, 226, D].

    progress(done, total) is called after each step; interrupt() is called before each step
    and may raise to abort. cfg_mode "sequential" runs the two CFG branches one after the other
    (half the activation memory, same result up to kernel rounding).
    """
    config = transformer.config
    check_video_shape(variant, dict(config), frames, image.height, image.width)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if cfg_mode not in ("batched", "sequential"):
        raise ValueError(f"cfg_mode must be 'batched' or 'sequential', got {cfg_mode!r}")
    use_cfg = cfg > 1.0
    if use_cfg and negative is None:
        raise ValueError("cfg > 1 needs a negative prompt embedding (an empty prompt is fine)")
    w_device, w_dtype = _device_dtype(transformer)
    device = torch.device(device) if device is not None else w_device
    dtype = dtype or w_dtype
    scheduler = make_scheduler(scheduler)
    generator = torch.Generator("cpu").manual_seed(int(seed))

    n_lat, pad = latent_frames(variant, frames)
    h, w = image.height // SPATIAL_COMPRESSION, image.width // SPATIAL_COMPRESSION
    channels = config.in_channels // 2

    # 1. the start frame's latent, drawn first as in diffusers
    mean, std = image.mean.to(device), image.std.to(device)
    noise = randn_tensor(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    first = (mean + std * noise).to(dtype).permute(0, 2, 1, 3, 4)            # [1, 1, C, h, w]
    # 1.5 was trained with the start latent divided by the scaling factor, 1.0 multiplied
    first = first / image.scale if variant.invert_scale_latents else first * image.scale
    image_latents = torch.cat([first, first.new_zeros(1, n_lat - 1, channels, h, w)], dim=1)
    del mean, std, noise, first

    # 2. the initial noise
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    latents = randn_tensor((1, n_lat, channels, h, w), generator=generator, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma

    rope = rotary_embedding(config, image.height, image.width, n_lat, device) if config.use_rotary_positional_embeddings else None
    ofs = latents.new_full((1,), 2.0) if config.ofs_embed_dim is not None else None
    pos = positive.to(device, dtype)
    neg = negative.to(device, dtype) if use_cfg else None
    step_kwargs = {}
    params = inspect.signature(scheduler.step).parameters
    if "eta" in params:
        step_kwargs["eta"] = 0.0
    if "generator" in params:
        step_kwargs["generator"] = generator
    is_dpm = isinstance(scheduler, CogVideoXDPMScheduler)

    def run(x, embeds):
        return transformer(hidden_states=x, encoder_hidden_states=embeds, timestep=t.expand(x.shape[0]),
                           ofs=ofs, image_rotary_emb=rope, return_dict=False)[0].float()

    old_pred = None
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            if interrupt is not None:
                interrupt()
            x = torch.cat([scheduler.scale_model_input(latents, t), image_latents], dim=2)
            if not use_cfg:
                noise_pred = run(x, pos)
            elif cfg_mode == "batched":
                uncond, cond = run(torch.cat([x, x]), torch.cat([neg, pos])).chunk(2)
                noise_pred = None
            else:
                uncond = run(x, neg)
                cond = run(x, pos)
                noise_pred = None
            del x
            if use_cfg:
                scale = dynamic_guidance(cfg, steps, t) if dynamic_cfg else cfg
                noise_pred = uncond + scale * (cond - uncond)
                del uncond, cond
            if is_dpm:
                latents, old_pred = scheduler.step(noise_pred, old_pred, t, timesteps[i - 1] if i > 0 else None,
                                                   latents, **step_kwargs, return_dict=False)
            else:
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            latents = latents.to(dtype)
            del noise_pred
            if not torch.isfinite(latents).all():   # stop now: the rest would only make a black video
                raise FloatingPointError(f"the latents became NaN/inf at step {i + 1}/{len(timesteps)} in {dtype}: "
                                         "use bf16 (CogVideoX1.5 overflows in fp16) or fp32")
            if progress is not None:
                progress(i + 1, len(timesteps))
    return VideoLatents(samples=latents.cpu(), frames=frames, height=image.height, width=image.width,
                        variant_key=variant.key, fps=variant.fps, drop_first=pad)
