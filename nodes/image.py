"""Start-image node: VAE + IMAGE -> image latent."""
from __future__ import annotations

from comfy_api.latest import io

from . import common as C
from . import memory

MAX_SIDE = 2400


class CogVidImageEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from cogvid_core.api import RESIZE_MODES
        return io.Schema(
            node_id="CogVidImageEncode",
            display_name="CogVideoX I2V Image Encode",
            category=f"{C.CATEGORY}/conditioning",
            description="Resizes the start image to the video size and encodes it with the VAE. "
                        "CogVideoX1.5: any multiple of 16 up to 2400 px per side (default 1360x768); "
                        "CogVideoX-5B-I2V: 720x480 only.",
            inputs=[
                C.VAE.Input("vae", tooltip="VAE from CogVideoX I2V VAE Loader"),
                io.Image.Input("image", tooltip="The start frame (e.g. from Load Image); the first of a batch is used"),
                io.Int.Input("width", default=1360, min=32, max=MAX_SIDE, step=16,
                             tooltip="Video width in pixels (720 for CogVideoX-5B-I2V)"),
                io.Int.Input("height", default=768, min=32, max=MAX_SIDE, step=16,
                             tooltip="Video height in pixels (480 for CogVideoX-5B-I2V)"),
                io.Combo.Input("resize", options=list(RESIZE_MODES), default="crop",
                               tooltip="crop: fill and cut the overflow; stretch: ignore the aspect ratio; "
                                       "pad: fit inside, black bars"),
                C.PLAN.Input("plan", optional=True,
                             tooltip="Optional memory plan from CogVideoX I2V VRAM Estimate: low-VRAM plans "
                                     "encode the start image in strips (the same latent, less memory)"),
            ],
            outputs=[C.IMAGE_LATENT.Output(display_name="image_latent")],
        )

    @classmethod
    def execute(cls, vae, image, width, height, resize, plan=None) -> io.NodeOutput:
        from cogvid_core import api as cv
        from cogvid_core.api import DEFAULT_VARIANT
        from cogvid_core.api import get_profile
        from cogvid_core.api import encode_image
        # a plan for another size (or variant) would encode and later sample with another video's settings
        cv.check_plan(plan, variant=vae.variant, height=height, width=width, variant_source="the loaded VAE")
        profile = get_profile(plan.profile) if getattr(plan, "profile", None) is not None else None
        strips = profile is not None and profile.encode_tiled   # the exact low-memory encode (vae_strips)
        # the encode's need does not depend on the frame count: any valid one lets the estimator answer
        frames = vae.variant.default_frames if vae.variant is not None else None
        info = cv.RunInfo(variant=vae.variant, frames=frames, height=height, width=width, device=vae.device,
                             profile=profile or "balanced")
        with memory.in_use(vae, "image_encode", info) as module:
            latent = encode_image(module(), image, height, width, vae.variant or DEFAULT_VARIANT, resize=resize,
                                  device=vae.device, strips=strips)
        return io.NodeOutput(latent)


NODES = [CogVidImageEncode]
