"""LoRA loader node: transformer + a file from models/loras + strength -> a transformer that applies it."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import folder_paths
from comfy_api.latest import io

from . import common as C

LORA_FOLDER = "loras"                 # ComfyUI's models/loras (and extra_model_paths.yaml entries)
LORA_EXTENSIONS = (".safetensors", ".sft")   # pickled LoRAs are refused (reading them can run code)
_READ: OrderedDict = OrderedDict()    # (path, mtime, size) -> LoraWeights: a strength change re-reads nothing
# Bounded by bytes, not files: one rank-256 CogVideoX LoRA holds ~0.5 GB (bf16), eight of them would pin
# 4+ GB of host RAM. The newest file stays whatever its size (it is in use).
READ_CACHE_BYTES = 2 * 1024 ** 3
# The frontend shows and rounds a FLOAT to the decimals of its step (round alone is cut back to them),
# so both are 1e-4: CogVideoX's 1/rank strengths (1/256 = 0.0039) must be enterable. Saved values
# (multiples of 0.01 or 0.05) load unchanged.
STRENGTH_STEP = 0.0001

log = logging.getLogger(__name__)


def lora_options() -> list[str]:
    if LORA_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return [n for n in folder_paths.get_filename_list(LORA_FOLDER) if n.lower().endswith(LORA_EXTENSIONS)]


def read_lora(name: str):
    """A listed file -> LoraWeights, read once per file version; anything not listed is refused."""
    from cogvid_core import api as cv
    if name not in lora_options():
        raise ValueError(f"LoRA {name!r} is not in models/{LORA_FOLDER} (.safetensors files): put the file "
                         "there and refresh the node list")
    path = folder_paths.get_full_path_or_raise(LORA_FOLDER, name)
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _READ:
        _READ[key] = cv.load_lora(path)
    _READ.move_to_end(key)
    while len(_READ) > 1 and sum(lw.nbytes for lw in _READ.values()) > READ_CACHE_BYTES:
        _READ.popitem(last=False)    # least recently used first
    return _READ[key]


class CogVidLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CogVidLoraLoader",
            display_name="CogVideoX I2V LoRA Loader",
            category=f"{C.CATEGORY}/loaders",
            description="Applies a CogVideoX LoRA to the transformer while it samples. The base weights are "
                        "never changed or re-read: the input transformer stays without the LoRA for other "
                        "branches, and a new strength or LoRA takes effect on the next queue at once. "
                        "Chain several loaders to combine LoRAs.",
            inputs=[
                C.TRANSFORMER.Input("transformer", tooltip="Transformer from CogVideoX I2V Transformer Loader "
                                                           "(or another LoRA loader)"),
                io.Combo.Input("lora", options=lora_options(),
                               tooltip="A LoRA trained for this CogVideoX variant, from models/loras "
                                       "(.safetensors in diffusers/PEFT format, as CogVideoX training "
                                       "scripts save them)"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=STRENGTH_STEP,
                               round=STRENGTH_STEP,
                               tooltip="How strongly the LoRA applies: 1 as trained, 0 off; negative "
                                       "values invert its effect. Type the value: 4 decimals, so LoRAs made "
                                       "for CogVideoX's own code (no alpha, applied at 1/rank) take e.g. "
                                       "0.0039 = 1/256"),
            ],
            outputs=[C.TRANSFORMER.Output(display_name="transformer")],
        )

    @classmethod
    def execute(cls, transformer, lora, strength) -> io.NodeOutput:
        from cogvid_core.api import lora_scale_hint as scale_hint, lora_variant_note as variant_note
        weights = read_lora(lora)
        out = transformer.with_lora(weights, strength)
        for hint in (scale_hint(weights, strength), variant_note(weights)):
            if hint:
                log.warning(hint)
        return io.NodeOutput(out)


NODES = [CogVidLoraLoader]
