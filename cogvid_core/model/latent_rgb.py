"""A linear projection of CogVideoX's 16-channel latent to RGB, for live previews while sampling.

The projection acts on the sampler's latents (the VAE's latents times its scaling factor, 0.7 for every
CogVideoX VAE), one latent pixel to one preview pixel, RGB in -1..1, the convention of ComfyUI's
``latent_rgb_factors`` / ``latent_rgb_factors_bias`` (rows: latent channels, columns: R, G, B).

Where the numbers come from: ComfyUI core ships none for CogVideoX (0.3.64 has no CogVideoX latent
format; later core's ``latent_formats.CogVideoX`` / ``CogVideoX1_5`` carry a scale factor, no RGB
factors), and no fit from the VAE is published. The table below is the one kijai's
ComfyUI-CogVideoXWrapper (Apache-2.0) ships in ``pipeline_cogvideox.py`` (``CogVideoXLatentFormat``,
commit 90e8367, 2025-01-20), which it applies to 5 x the predicted clean latents; the 5 is folded in
here. It was picked by eye, not fitted (that repo's ``CogVideoLatentPreview`` node draws factor tables
at random by seed). ``fit`` below is the least-squares fit from a real VAE; bench/fit_latent_rgb.py runs
it on a user's VAE weights and prints a table to replace this one.
"""
from __future__ import annotations

import torch

# kijai/ComfyUI-CogVideoXWrapper pipeline_cogvideox.py, CogVideoXLatentFormat, times 5 (see above)
RGB_FACTORS = (
    (+0.1599, +0.2046, +0.0078),
    (+0.0276, +0.0262, -0.0281),
    (+0.0062, -0.0805, +0.1251),
    (+0.0880, +0.0184, -0.0030),
    (+0.0022, +0.0305, +0.0042),
    (-0.0527, -0.0161, -0.0443),
    (-0.0007, +0.0510, -0.0006),
    (+0.1039, -0.0083, +0.0336),
    (+0.0276, +0.0487, +0.0094),
    (+0.0607, +0.1234, +0.1861),
    (+0.0052, +0.0992, +0.0493),
    (+0.0340, -0.0053, -0.0351),
    (+0.0018, +0.0268, -0.0923),
    (-0.0452, -0.0564, +0.0211),
    (+0.0127, +0.1261, -0.0030),
    (-0.0557, +0.0091, +0.1397),
)
RGB_BIAS = (-0.023, 0.0, -0.017)
SOURCE = "kijai/ComfyUI-CogVideoXWrapper CogVideoXLatentFormat (picked by eye, x5 folded in)"


def project(frame: torch.Tensor, factors=RGB_FACTORS, bias=RGB_BIAS) -> torch.Tensor:
    """One latent frame [C, h, w] (or [1, C, h, w]) -> RGB [h, w, 3] in about -1..1, on its device."""
    frame = frame.reshape(frame.shape[-3:])
    w = torch.as_tensor(factors, dtype=frame.dtype, device=frame.device)
    b = torch.as_tensor(bias, dtype=frame.dtype, device=frame.device)
    return torch.nn.functional.linear(frame.movedim(0, -1), w.T, b)


def latent_grid(video: torch.Tensor, latent_frames: int, spatial: int = 8, temporal: int = 4) -> torch.Tensor:
    """Decoded frames [T, 3, H, W] in -1..1 -> their mean over each latent pixel's footprint
    [latent_frames, 3, H/spatial, W/spatial]: frame 0 alone, then ``temporal`` frames per latent frame
    (the CogVideoX VAE's layout; a 1.5 video's leading padding frame is dropped before decode)."""
    pooled = torch.nn.functional.avg_pool2d(video.float(), spatial)
    groups = [pooled[:1]] + [pooled[1 + temporal * k: 1 + temporal * (k + 1)] for k in range(latent_frames - 1)]
    return torch.stack([g.mean(0) for g in groups])


def fit(latents: torch.Tensor, rgb: torch.Tensor) -> tuple[list, list, float]:
    """Least-squares factors and bias with ``rgb ~= latents @ factors + bias``.

    latents [N, C, h, w] and rgb [N, 3, h, w] on the same grid (``latent_grid``); returns the factors as
    C rows of (R, G, B), the bias, and the fit's RMS error in -1..1 units."""
    x = latents.detach().double().cpu().movedim(1, -1).reshape(-1, latents.shape[1])
    y = rgb.detach().double().cpu().movedim(1, -1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    solution = torch.linalg.lstsq(x1, y).solution                       # [C + 1, 3]
    rms = (x1 @ solution - y).pow(2).mean().sqrt().item()
    return solution[:-1].tolist(), solution[-1].tolist(), rms
