"""Decode node: video latents -> IMAGE frames + fps."""
from __future__ import annotations

from comfy_api.latest import io

from . import common as C
from . import memory
from .video import as_video

TILES = ("auto", "off", "480x320", "360x240", "288x192", "240x160", "192x128")


def tile_spec(tile: str, overlap: float, plan):
    """Widget -> vae.TileSpec (None = no spatial tiling); auto = the plan's tile, else diffusers' 360x240."""
    from cogvid_core.api import TileSpec
    if tile == "off":
        return None
    if tile == "auto":
        planned = getattr(plan, "tile", None) if plan is not None else (240, 360)
        if planned is None:
            return None
        return TileSpec(height=int(planned[0]), width=int(planned[1]), overlap=overlap)
    if tile not in TILES:
        raise ValueError(f"tile must be one of {TILES}, got {tile!r}")
    w, h = (int(v) for v in tile.split("x"))
    return TileSpec(height=h, width=w, overlap=overlap)


class CogVidDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CogVidDecode",
            display_name="CogVideoX I2V Decode",
            category=f"{C.CATEGORY}/sampling",
            description="Decodes the video latents into frames (IMAGE batch [T,H,W,C], 0..1) and the model's "
                        "frame rate, for Save Video nodes (ours or core's Create Video). Spatial tiles bound "
                        "the memory; diffusers decodes in temporal chunks.",
            inputs=[
                C.VAE.Input("vae", tooltip="VAE from CogVideoX I2V VAE Loader"),
                C.LATENT.Input("latent", tooltip="Video latents from CogVideoX I2V Sampler"),
                io.Combo.Input("tile", options=list(TILES), default="auto",
                               tooltip="Decode tile (width x height in pixels): smaller tiles need less memory; "
                                       "auto uses the plan's tile, else 360x240; off decodes whole frames"),
                io.Float.Input("overlap", default=0.1667, min=0.0, max=0.49, step=0.01, round=0.0001,
                               tooltip="Tile overlap as a share of the tile, blended to hide seams"),
                C.PLAN.Input("plan", optional=True,
                             tooltip="Optional memory plan from CogVideoX I2V VRAM Estimate (its VAE tile)"),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Float.Output(display_name="fps"),
                     io.Video.Output(display_name="video",
                                     tooltip="The same frames at the model's frame rate as core's VIDEO "
                                             "(core's Save Video, Get Video Components)")],
        )

    @classmethod
    def execute(cls, vae, latent, tile, overlap, plan=None) -> io.NodeOutput:
        from cogvid_core import api as cv
        cv.check_plan(plan, variant=latent.variant_key, frames=latent.frames, height=latent.height, width=latent.width,
                      variant_source="the Sampler's latent")
        spec = tile_spec(tile, overlap, plan)
        if vae.device.type != "cpu":
            memory.make_room(cv.decode_bytes(latent, spec, plan), vae.device)
        info = cv.RunInfo(device=vae.device, profile=getattr(plan, "profile", None) or "balanced")
        with memory.in_use(vae, "decode", info) as module:      # cv.decode_with_retries retries with smaller tiles
            frames = cv.decode_with_retries(module(), latent, device=vae.device, tile=spec, progress=C.progress_callback(1),
                                  interrupt=C.interrupt, info=info)
        return io.NodeOutput(frames, float(latent.fps), as_video(frames, latent.fps))


NODES = [CogVidDecode]
