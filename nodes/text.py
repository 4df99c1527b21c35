"""Prompt encoding node: T5 + positive/negative prompt -> conditioning."""
from __future__ import annotations

from comfy_api.latest import io

from . import common as C
from . import memory


class CogVidTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CogVidTextEncode",
            display_name="CogVideoX I2V Text Encode",
            category=f"{C.CATEGORY}/conditioning",
            description="Encodes the positive and negative prompts with T5 (226 tokens each; longer prompts "
                        "are cut and the cut text is logged). Results are cached by prompt; T5 leaves the GPU "
                        "afterwards unless loaded resident.",
            inputs=[
                C.T5.Input("t5", tooltip="T5 text encoder from CogVideoX I2V T5 Loader"),
                io.String.Input("positive", multiline=True, default="",
                                tooltip="What the video shows and how it moves (long, descriptive prompts work best)"),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="What to steer away from; empty is the official default"),
            ],
            outputs=[C.CONDITIONING.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, t5, positive, negative) -> io.NodeOutput:
        from cogvid_core import api as cv
        from cogvid_core.api import encode_prompt
        with memory.in_use(t5, "text_encode") as module:       # T5 placed only on a prompt-cache miss
            def encode(prompt):
                return cv.PROMPTS.get_or_encode(
                    t5, prompt, lambda: encode_prompt(module(), t5.tokenizer, prompt, device=t5.device))
            pos = encode(positive)
            C.interrupt()      # Cancel pressed during the first prompt: stop before the second
            neg = encode(negative)
        return io.NodeOutput({"positive": pos, "negative": neg})


NODES = [CogVidTextEncode]
