"""VRAM estimate node: variant + video size + profile + budget -> report, chart, plan."""
from __future__ import annotations

from comfy_api.latest import io

from . import common as C

AUTO = "auto"


def precision_names() -> list[str]:
    from cogvid_core.api import AUTO
    return [*C.PRECISIONS, AUTO]


def cache_names() -> list[str]:
    from cogvid_core.api import CACHES as NAMES
    return list(NAMES)


def profile_names() -> list[str]:
    from cogvid_core import api as cv
    return [AUTO, *cv.PROFILES]


class CogVidVRAMEstimate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from cogvid_core.api import VARIANTS
        return io.Schema(
            node_id="CogVidVRAMEstimate",
            display_name="CogVideoX I2V VRAM Estimate",
            category=f"{C.CATEGORY}/memory",
            description="Predicts the peak GPU memory of each stage (text encode, image encode, denoise step, "
                        "decode) before you queue, says whether it fits, and outputs a plan for the sampler "
                        "and decode: with profile auto, the fastest settings that fit the budget. Type the "
                        "video's frames and size here and wire the frames/width/height outputs to the Sampler "
                        "and Image Encode; wire the transformer in and the variant, speed, precision and LoRAs "
                        "come from it.",
            inputs=[
                io.Combo.Input("variant", options=[v.label for v in VARIANTS.values()][::-1],
                               default="CogVideoX1.5-5B-I2V", tooltip="Which model the estimate is for"),
                io.Int.Input("frames", default=81, min=5, max=161, step=4, tooltip="Video length in frames"),
                io.Int.Input("width", default=1360, min=32, max=2400, step=16, tooltip="Video width in pixels"),
                io.Int.Input("height", default=768, min=32, max=2400, step=16, tooltip="Video height in pixels"),
                io.Combo.Input("profile", options=profile_names(), default=AUTO,
                               tooltip="Memory profile; auto picks the fastest one that fits the budget"),
                io.Float.Input("budget_gib", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="GPU memory to plan for in GiB; 0 = what the GPU has free now minus "
                                       "ComfyUI's reserve (--reserve-vram)"),
                io.Float.Input("lora_mib", default=0.0, min=0.0, max=65536.0, step=1.0, optional=True,
                               tooltip="GPU memory the LoRAs take while sampling, in MiB (about the sum of "
                                       "their .safetensors sizes at bf16; 0 = no LoRA)"),
                io.Combo.Input("speed", options=C.speed_options(), default="exact", optional=True,
                               tooltip="The Transformer Loader's speed option: FP8 attention (fa3fp8) and fp8 "
                                       "without compile hold more memory while sampling; the others no more "
                                       "than exact. fastest counts what it picks on this GPU"),
                io.Combo.Input("precision", options=precision_names(), default="auto", optional=True,
                               tooltip="The Transformer Loader's precision (T5 and the VAE: auto, as their "
                                       "loaders pick by default). auto: bf16 where the card has it; on T4, V100, "
                                       "RTX 20xx fp32 for CogVideoX1.5 (twice the weights), fp16 otherwise"),
                io.Combo.Input("cache", options=cache_names(), default="none", optional=True,
                               tooltip="The Sampler's step cache: the activations it holds count in the denoise "
                                       "step (pab and fastercache hold one hidden state per block, GiBs at 1.5's size)"),
                C.TRANSFORMER.Input("transformer", optional=True,
                                    tooltip="Optional: the transformer the Sampler gets (from the loader or the "
                                            "LoRA node). When wired, its variant, speed, precision and LoRAs are "
                                            "estimated and the widgets for them are not used"),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="chart"),
                     C.PLAN.Output(display_name="plan"),
                     io.Int.Output(display_name="frames", tooltip="Wire to the Sampler's frames"),
                     io.Int.Output(display_name="width", tooltip="Wire to the Image Encode's width"),
                     io.Int.Output(display_name="height", tooltip="Wire to the Image Encode's height")],
        )

    @classmethod
    def execute(cls, variant, frames, width, height, profile, budget_gib, lora_mib=0.0, speed="exact",
                precision="auto", cache="none", transformer=None) -> io.NodeOutput:
        import torch
        from cogvid_core import api as cv
        from cogvid_core.api import chart_image
        from cogvid_core.api import host_available_bytes
        device = C.compute_device("auto")
        budget = C.budget_bytes(budget_gib, device)
        if transformer is not None:     # entered once: what the Sampler will run
            v, speed, lora_bytes = transformer.variant, transformer.speed, transformer.lora_bytes()
            precision = transformer.planned_precision["transformer"]
            # the weights it already holds on the GPU (resident from the last queue) come back to its plan
            budget = None if budget is None else cv.own_budget(budget, transformer.device_bytes())
        else:
            v, lora_bytes = cv.variant_by_label(variant), int(lora_mib * 1024 ** 2)
        asked, speed = speed, cv.speed_recipe(speed, transformer.device if transformer is not None else device)
        # the engine's rule, here where the variant is first known: 21 frames for 1.5 is refused, not estimated
        cv.check_video_shape(v, cv.transformer_config(v), frames, height, width)
        # the loaders' rule for the device the loaders' auto computes on (1.5 in fp16 refused here too)
        names = cv.resolve_precisions({"transformer": precision}, device, v, warn=False)
        if profile == AUTO:
            est = cv.best_estimate(v, frames, height, width, budget, lora_bytes=lora_bytes, speed=speed,
                                        precision=names, cache=cache)
        else:
            est = cv.estimate(v, frames, height, width, profile, names, budget_bytes=budget, lora_bytes=lora_bytes,
                             speed=speed, cache=cache)
        chart = torch.from_numpy(chart_image(est)).float().div(255).unsqueeze(0)
        report = est.report(host_available=host_available_bytes())
        if transformer is not None:
            report += f"\nvariant, speed ({asked}), precision and LoRAs: from the wired transformer"
        if speed != asked:
            report += f"\nspeed {asked}: counted as {speed}, its pick on this device"
        beyond = cv.plan_beyond_card(est, C.card_bytes(transformer.device if transformer is not None else device))
        if beyond:       # the Sampler refuses this plan on this card; say it here, before Queue
            report += f"\nDOES NOT FIT THIS GPU: {beyond}"
        return io.NodeOutput(report, chart, est, frames, width, height)


NODES = [CogVidVRAMEstimate]
