"""Live previews for the Sampler through ComfyUI's own latent preview path.

ComfyUI's ``latent_preview.get_previewer`` reads the user's preview method (``--preview-method``, or the
frontend's setting that newer core applies per prompt from ``extra_data["preview_method"]``) and builds
its previewer from a latent format. Ours carries CogVideoX's 16-channel latent-to-RGB table
(``cogvid_core.model.latent_rgb``; core ships none for CogVideoX) and no TAESD decoder, so "auto",
"latent2rgb" and "taesd" all preview with latent2rgb (for "taesd" core logs that it found no decoder);
"none" builds nothing and the engine does no preview work. The preview rides on the step's
``ProgressBar`` update, as core's samplers send theirs.
"""
from __future__ import annotations

import comfy.latent_formats
import comfy.utils

from . import common as C

PREVIEW_FORMAT = "JPEG"


class CogVideoXLatentRGB(comfy.latent_formats.LatentFormat):
    """The sampler's latent (VAE latent x 0.7) as ComfyUI's previewers read a latent format."""
    latent_channels = 16
    latent_dimensions = 3
    scale_factor = 0.7
    taesd_decoder_name = None

    def __init__(self):
        from cogvid_core.api import LATENT_RGB_BIAS, LATENT_RGB_FACTORS
        self.latent_rgb_factors = [list(row) for row in LATENT_RGB_FACTORS]
        self.latent_rgb_factors_bias = list(LATENT_RGB_BIAS)


def previewer(device):
    """ComfyUI's previewer for the user's preview method now, or None when previews are off."""
    import latent_preview
    return latent_preview.get_previewer(device, CogVideoXLatentRGB())


def step_callbacks(steps: int, device) -> dict:
    """The Sampler's per-step callbacks for cogvid_core's ``sample``: ``progress`` alone when previews are
    off; otherwise ``preview`` alone, which sends the step's middle frame with the same progress update."""
    shown = previewer(device)
    if shown is None:
        return {"progress": C.progress_callback(steps), "preview": None}
    bar = comfy.utils.ProgressBar(steps)

    def preview(step: int, total: int, frame) -> None:
        bar.update_absolute(step + 1, total, shown.decode_latent_to_preview_image(PREVIEW_FORMAT, frame))
    return {"progress": None, "preview": preview}
