"""The stages of a run, in order, and their names as users read them (reports, errors, charts)."""
from __future__ import annotations

STAGES = ("text_encode", "image_encode", "denoise_step", "decode")
LABELS = {"text_encode": "text encode", "image_encode": "image encode", "denoise_step": "denoise step",
          "decode": "decode"}
COMPONENT_OF_STAGE = {"text_encode": "text_encoder", "image_encode": "vae", "denoise_step": "transformer",
                      "decode": "vae"}
