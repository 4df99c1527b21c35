"""The start frame's VAE encode in horizontal strips: diffusers' untiled encode, in a fraction of its memory.

diffusers' tiled encode blends separately encoded tiles, and the encoder's GroupNorms take their statistics
over the whole image, so no overlap makes it exact: at 640x384 its latent mean is ~10% (relative L2) off the
untiled one, and the video with it. The untiled encode of one frame is costly for two reasons, neither of
them the result: every causal convolution concatenates three copies of its input (the first frame repeated
as causal padding) and keeps a two-frame clone of it as the next batch's cache, and those caches all live
until the encode returns (~5 GiB of the ~6 GiB peak at 768x1360 in bf16).

:func:`strip_layers` swaps the encoder's causal convolutions, GroupNorms and downsamplers for forms that
compute their output in strips of rows, each from its own input rows plus the halo the kernel reads (the
same convolution on the same numbers: exact), GroupNorm statistics accumulated over the strips in float64
(exact up to summation order), and no convolution cache (one frame has no next batch). The swap is module
replacement for the duration of one ``vae.encode``, undone after it, also on error, so diffusers' own
``encode`` runs and the result equals its untiled one. What stays alive is the activations between layers:
at most three of the first level's (128 channels, full resolution, one frame) plus one strip's temporaries,
whose height :func:`strip_rows` picks from a byte budget.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

STRIP_BYTES = 64 * 1024 ** 2   # a strip's temporaries; ~1/4 of one first-level activation at 768x1360 in bf16
LIVE_LEVEL0_UNITS = 3          # first-level activations alive at once (a resnet's input, its branch, the new one)


def strip_rows(bytes_per_row: int, height: int, budget_bytes: int = STRIP_BYTES) -> int:
    """Output rows per strip: as many as keep a strip's temporaries within ``budget_bytes`` (at least one)."""
    return max(1, min(height, budget_bytes // max(1, bytes_per_row)))


def _row_spans(height: int, rows: int):
    for r0 in range(0, height, rows):
        yield r0, min(height, r0 + rows)


class StripCausalConv(nn.Module):
    """diffusers' ``CogVideoXCausalConv3d`` on a single frame without a cache, in strips of output rows.

    The causal padding repeats the first frame ``time_kernel_size - 1`` times (the "constant" mode with
    no cache); the inner convolution's own zero padding is the image border where a strip touches it, and
    produces rows that are cropped where it does not. Anything else runs the wrapped module unchanged."""

    def __init__(self, inner: nn.Module, budget_bytes: int):
        super().__init__()
        self.inner, self.budget_bytes = inner, budget_bytes

    def _applies(self, x: torch.Tensor, conv_cache) -> bool:
        conv = self.inner.conv
        return (conv_cache is None and x.ndim == 5 and x.shape[2] == 1 and self.inner.pad_mode != "replicate"
                and tuple(conv.stride[1:]) == (1, 1) and tuple(conv.dilation[1:]) == (1, 1)
                and conv.padding[1] == self.inner.height_pad)

    def forward(self, inputs: torch.Tensor, conv_cache=None):
        if not self._applies(inputs, conv_cache):
            return self.inner(inputs, conv_cache=conv_cache)
        kt, halo, conv = self.inner.time_kernel_size, self.inner.height_pad, self.inner.conv
        _, c_in, _, height, width = inputs.shape
        per_row = (kt * c_in + conv.out_channels) * width * inputs.element_size()
        out = None
        for r0, r1 in _row_spans(height, strip_rows(per_row, height, self.budget_bytes)):
            a, b = max(0, r0 - halo), min(height, r1 + halo)
            part = inputs[:, :, :, a:b]
            if kt > 1:
                part = torch.cat([part] * kt, dim=2)
            y = conv(part)[:, :, :, r0 - a:r1 - a]
            if out is None:
                out = y.new_empty(*y.shape[:3], height, y.shape[4])
            out[:, :, :, r0:r1] = y
            del part, y
        return out, None


class StripGroupNorm(nn.Module):
    """``nn.GroupNorm`` on [N, C, T, H, W] in strips of rows: each strip's mean and (biased) variance in
    float32, merged over the strips in float64 (Chan et al.'s pairwise update: one pass over the data),
    then the normalized strips computed in float32 and stored in the input's dtype (as torch's kernel
    computes a bf16 GroupNorm in float32)."""

    def __init__(self, inner: nn.GroupNorm, budget_bytes: int):
        super().__init__()
        self.inner, self.budget_bytes = inner, budget_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or not x.is_contiguous():
            return self.inner(x)
        g = self.inner.num_groups
        n, c, t, height, width = x.shape
        groups = x.view(n, g, c // g, t, height, width)
        per_row = 2 * c * t * width * 4                   # a strip's float32 copy and its normalized form
        spans = list(_row_spans(height, strip_rows(per_row, height, self.budget_bytes)))
        mean, rstd = self._statistics(groups, spans)
        scale, shift = self._scale_shift(mean, rstd, g, c // g)
        out = torch.empty_like(x)
        out_groups = out.view(n, g, c // g, t, height, width)
        for r0, r1 in spans:
            out_groups[..., r0:r1, :] = torch.addcmul(shift, groups[..., r0:r1, :].float(), scale)
        return out

    def _statistics(self, groups: torch.Tensor, spans) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (sample, group) mean and 1 / sqrt(variance + eps), float64, from the strips' own moments."""
        count = mean = m2 = None
        for r0, r1 in spans:
            part = groups[..., r0:r1, :].float()
            var_b, mean_b = torch.var_mean(part, dim=(2, 3, 4, 5), unbiased=False)
            n_b = part[0, 0].numel()
            var_b, mean_b = var_b.double(), mean_b.double()
            if count is None:
                count, mean, m2 = n_b, mean_b, var_b * n_b
                continue
            delta, total = mean_b - mean, count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + var_b * n_b + delta * delta * (count * n_b / total)
            count = total
        return mean, torch.rsqrt(m2 / count + self.inner.eps)

    def _scale_shift(self, mean: torch.Tensor, rstd: torch.Tensor, g: int, per_group: int):
        """y = x * scale + shift per channel, float32: (x - mean) * rstd * weight + bias rearranged."""
        n = mean.shape[0]
        scale = rstd.view(n, g, 1).expand(n, g, per_group)
        if self.inner.affine:
            scale = scale * self.inner.weight.double().view(1, g, per_group)
        shift = -mean.view(n, g, 1) * scale
        if self.inner.affine:
            shift = shift + self.inner.bias.double().view(1, g, per_group)
        view = (n, g, per_group, 1, 1, 1)
        return scale.float().reshape(view), shift.float().reshape(view)


class StripDownsample(nn.Module):
    """diffusers' ``CogVideoXDownsample3D`` on a single frame, in strips of output rows.

    With one frame its temporal compression keeps the frame as it is; what remains is the zero pad of
    one column right and one row below and the strided ``Conv2d``, which a strip computes from the
    input rows its output rows read."""

    def __init__(self, inner: nn.Module, budget_bytes: int):
        super().__init__()
        self.inner, self.budget_bytes = inner, budget_bytes

    def _applies(self, x: torch.Tensor) -> bool:
        conv = self.inner.conv
        return (x.ndim == 5 and x.shape[2] == 1 and tuple(conv.padding) == (0, 0)
                and tuple(conv.dilation) == (1, 1) and conv.kernel_size[0] - conv.stride[0] <= 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._applies(x):
            return self.inner(x)
        conv = self.inner.conv
        k, s = conv.kernel_size[0], conv.stride[0]
        n, c, _, height, width = x.shape
        out_h = (height + 1 - k) // s + 1                  # over the input padded by one row below
        per_row = (s * c + conv.out_channels) * (width + 1) * x.element_size()
        out = None
        for r0, r1 in _row_spans(out_h, strip_rows(per_row, out_h, self.budget_bytes)):
            a, b = s * r0, s * (r1 - 1) + k                 # padded input rows this strip reads
            part = x[:, :, 0, a:min(b, height)]
            part = torch.nn.functional.pad(part, (0, 1, 0, b - min(b, height)))
            y = conv(part)
            if out is None:
                out = y.new_empty(n, y.shape[1], 1, out_h, y.shape[3])
            out[:, :, 0, r0:r1] = y
            del part, y
        return out


def _wrapper_for(module: nn.Module):
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d
    from diffusers.models.downsampling import CogVideoXDownsample3D

    if isinstance(module, CogVideoXCausalConv3d):
        return StripCausalConv
    if isinstance(module, nn.GroupNorm):
        return StripGroupNorm
    if isinstance(module, CogVideoXDownsample3D):
        return StripDownsample
    return None


@contextmanager
def strip_layers(encoder: nn.Module, budget_bytes: int = STRIP_BYTES):
    """Within the block, ``encoder``'s causal convolutions, GroupNorms and downsamplers compute in strips
    (see the module's note); the original modules are back in place afterwards, also after an error."""
    swapped = []
    try:
        for parent in list(encoder.modules()):
            for name, child in list(parent.named_children()):
                wrapper = _wrapper_for(child)
                if wrapper is not None:
                    setattr(parent, name, wrapper(child, budget_bytes))
                    swapped.append((parent, name, child))
        yield encoder
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def encode_frame(vae, pixels: torch.Tensor, budget_bytes: int = STRIP_BYTES):
    """``vae.encode(pixels).latent_dist`` for one frame [N, 3, 1, H, W], computed in strips: the same
    distribution as diffusers' untiled encode (tests/test_vae_strips.py), without its convolution caches
    and with a strip's temporaries instead of whole-image ones."""
    if pixels.ndim != 5 or pixels.shape[2] != 1:
        raise ValueError(f"the strip encode takes one frame [N, 3, 1, H, W]; got shape {tuple(pixels.shape)}")
    tiling = vae.use_tiling
    vae.use_tiling = False
    try:
        with strip_layers(vae.encoder, budget_bytes):
            return vae.encode(pixels).latent_dist
    finally:
        vae.use_tiling = tiling
