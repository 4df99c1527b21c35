"""ComfyUI's latent preview path, faked for the stub (tests/comfy_stub.py installs it): ``comfy.cli_args``
(``args.preview_method``, default off as in core), ``comfy.latent_formats.LatentFormat``, and
``latent_preview`` whose ``get_previewer`` and ``Latent2RGBPreviewer`` do what core's do for a latent
format without a TAESD decoder (the projection on the frame given, a PIL image, ("JPEG", image, 512))."""
from __future__ import annotations

import types
from enum import Enum

import torch

MODULES = ("comfy.cli_args", "comfy.latent_formats", "latent_preview")


class LatentPreviewMethod(str, Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


class LatentFormat:
    scale_factor = 1.0
    latent_channels = 4
    latent_dimensions = 2
    latent_rgb_factors = None
    latent_rgb_factors_bias = None
    taesd_decoder_name = None


class Latent2RGBPreviewer:
    built: list = []          # every previewer made since install (what "no preview work" counts)
    decoded: list = []        # every frame shape decoded

    def __init__(self, latent_rgb_factors, latent_rgb_factors_bias=None):
        self.factors = torch.tensor(latent_rgb_factors).transpose(0, 1)
        self.bias = None if latent_rgb_factors_bias is None else torch.tensor(latent_rgb_factors_bias)
        Latent2RGBPreviewer.built.append(self)

    def decode_latent_to_preview_image(self, preview_format, x0):
        from PIL import Image
        Latent2RGBPreviewer.decoded.append(tuple(x0.shape))
        x0 = x0[0, :, 0] if x0.ndim == 5 else x0[0]
        rgb = torch.nn.functional.linear(x0.movedim(0, -1), self.factors.to(x0), None if self.bias is None
                                         else self.bias.to(x0))
        pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).cpu().numpy()
        return "JPEG", Image.fromarray(pixels), 512


def install(mods: dict) -> dict:
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.LatentPreviewMethod = LatentPreviewMethod
    cli_args.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews, preview_size=512)
    formats = types.ModuleType("comfy.latent_formats")
    formats.LatentFormat = LatentFormat
    preview = types.ModuleType("latent_preview")
    preview.LatentPreviewMethod, preview.Latent2RGBPreviewer = LatentPreviewMethod, Latent2RGBPreviewer

    def get_previewer(device, latent_format):
        if cli_args.args.preview_method == LatentPreviewMethod.NoPreviews or latent_format.latent_rgb_factors is None:
            return None
        return Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias)
    preview.get_previewer = get_previewer
    Latent2RGBPreviewer.built, Latent2RGBPreviewer.decoded = [], []
    comfy = mods["comfy"]
    comfy.cli_args, comfy.latent_formats = cli_args, formats
    added = {"comfy.cli_args": cli_args, "comfy.latent_formats": formats, "latent_preview": preview}
    mods.update(added)
    return added
