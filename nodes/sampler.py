"""Sampler node: transformer + conditioning + image latent -> video latents."""
from __future__ import annotations

from comfy_api.latest import io

from . import common as C
from . import memory
from . import preview


class CogVidSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from cogvid_core.api import SCHEDULERS
        from cogvid_core.api import CACHES, CACHE_TOOLTIP
        return io.Schema(
            node_id="CogVidSampler",
            display_name="CogVideoX I2V Sampler",
            category=f"{C.CATEGORY}/sampling",
            description="Denoises the video from the start image and prompts (diffusers-exact I2V loop). "
                        "With a plan from CogVideoX I2V VRAM Estimate it uses the plan's memory settings. "
                        "The transformer leaves the GPU when done unless loaded resident. "
                        "Shows the video's middle frame as it forms with ComfyUI's preview method (latent2rgb).",
            inputs=[
                C.TRANSFORMER.Input("transformer", tooltip="Transformer from CogVideoX I2V Transformer Loader"),
                C.CONDITIONING.Input("conditioning", tooltip="Prompts from CogVideoX I2V Text Encode"),
                C.IMAGE_LATENT.Input("image_latent", tooltip="Start image from CogVideoX I2V Image Encode "
                                                             "(its size is the video size)"),
                io.Int.Input("frames", default=81, min=5, max=161, step=4,
                             tooltip="Video length: 16N+1 for CogVideoX1.5 (81 = 5 s at 16 fps), "
                                     "4N+1 up to 49 for CogVideoX-5B-I2V (49 = 6 s at 8 fps)"),
                io.Int.Input("steps", default=50, min=1, max=200, tooltip="Denoising steps (50 is the official setting)"),
                io.Float.Input("cfg", default=6.0, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1 disables CFG (twice as fast)"),
                io.Boolean.Input("dynamic_cfg", default=True,
                                 tooltip="Ramp the guidance over the steps as the official demo does"),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="dpm",
                               tooltip="dpm: CogVideoXDPMScheduler (official demo); ddim: CogVideoXDDIMScheduler"),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed and settings give the same video"),
                C.PLAN.Input("plan", optional=True,
                             tooltip="Optional memory plan from CogVideoX I2V VRAM Estimate (CFG mode, "
                                     "feed-forward chunking, attention, placement)"),
                io.Combo.Input("cache", options=list(CACHES), default="none", optional=True, tooltip=CACHE_TOOLTIP),
            ],
            outputs=[C.LATENT.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, transformer, conditioning, image_latent, frames, steps, cfg, dynamic_cfg, scheduler, seed,
                plan=None, cache="none") -> io.NodeOutput:
        from cogvid_core import api as cv
        from cogvid_core.api import cache_bytes
        from cogvid_core.api import sample
        variant = transformer.variant
        h, w = image_latent.height, image_latent.width
        # refused before the transformer moves to the GPU: frames the variant cannot make, a plan for another video
        cv.check_video_shape(variant, dict(transformer.module.config), frames, h, w)
        cv.check_plan(plan, variant=variant, frames=frames, height=h, width=w, cache=cache)
        # a plan typed for a bigger card fails here, not minutes later once the weights are read
        if plan is not None:
            cv.check_plan_fits_card(plan, C.card_bytes(transformer.device))
        fallback = "lowvram" if C.comfy_lowvram() else "auto"   # honour ComfyUI's --lowvram / --novram
        if plan is None and fallback == "auto" and transformer.device.type != "cpu":
            # free VRAM as ComfyUI counts it (idle dynamic-VRAM models included), not the raw figure, plus
            # what the transformer itself holds there (resident from the last queue): its own plan reuses it
            budget = cv.own_budget(C.budget_bytes(0, transformer.device), transformer.device_bytes())
            fallback = cv.best_estimate(variant, frames, h, w, budget, lora_bytes=transformer.lora_bytes(),
                                             speed=cv.speed_recipe(transformer.speed, transformer.device),
                                             precision=transformer.planned_precision, cache=cache).profile
        transformer, profile, activations = cv.plan_for(transformer, plan, frames, h, w, fallback)
        info = cv.RunInfo(variant=variant, frames=frames, height=h, width=w, profile=profile,
                             device=transformer.device)
        # the LoRAs' merged matrices and a step cache's activations live on the device during the run,
        # beside the weights ComfyUI counts
        held = transformer.lora_bytes() + cache_bytes(variant, frames, h, w, cache, transformer.planned_precision)
        with memory.in_use(transformer, "denoise_step", info, memory_required=activations + held) as module:
            latents = sample(module(), variant, conditioning["positive"].embeds, conditioning["negative"].embeds,
                             image_latent, frames, steps=steps, cfg=cfg, dynamic_cfg=dynamic_cfg, scheduler=scheduler,
                             seed=seed, device=transformer.device, cfg_mode=profile.cfg_mode,
                             interrupt=C.interrupt, cache=cache, **preview.step_callbacks(steps, transformer.device))
        return io.NodeOutput(latents)


NODES = [CogVidSampler]
