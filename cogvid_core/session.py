"""Holders for loaded components and a prompt cache, shared by front ends (ComfyUI nodes, CLI).

A `Component` is one loaded model (transformer, T5 or VAE) plus what a front end needs to use it:
its variant, compute device, dtype and placement mode. `acquire()` puts it where it computes,
`release()` gives the accelerator back (weights to the host). No ComfyUI import here.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .activations import apply_profile
from .devmem import module_bytes
from .placement import place, placed_of, unplace
from .planner import resolve_profile
from .profiles import AUTO, MODES, get_profile

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8 = "fp8_e4m3fn"
OFFLOAD_DEVICE = torch.device("cpu")


def precision(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """Widget precision -> (compute dtype, storage dtype or None)."""
    if name == FP8:
        if not hasattr(torch, "float8_e4m3fn"):
            raise ValueError("fp8_e4m3fn storage needs a torch build with float8 support")
        return torch.bfloat16, torch.float8_e4m3fn
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {[*PRECISIONS, FP8]}, got {name!r}")
    return PRECISIONS[name], None


PLACEMENTS = (AUTO, *MODES)
# What "auto" means for a component used without a plan: T5 and VAE visit the GPU only while they run.
AUTO_MODE = {"t5": "offload", "vae": "offload", "transformer": "offload"}


@dataclass(eq=False)
class Component:
    kind: str                        # "transformer" | "t5" | "vae"
    module: torch.nn.Module
    device: torch.device             # where it computes
    dtype: torch.dtype
    placement: str = AUTO            # the user's choice: auto or one of placement.MODES
    variant: object = None           # models.Variant when known
    source: str = ""
    tokenizer: object = None         # T5 only
    mode: str | None = None          # the mode in force for the next acquire (auto resolved)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")

    def choose(self, planned: str | None = None) -> str:
        """Mode for the next use: the user's explicit choice, else the plan's, else the kind's default."""
        if self.placement != AUTO:
            self.mode = self.placement
        else:
            self.mode = planned or AUTO_MODE[self.kind]
        if self.kind == "vae" and self.mode == "stream":
            self.mode = "offload"   # the VAE has no block list to stream
        return self.mode

    def total_bytes(self) -> int:
        return module_bytes(self.module)

    def device_bytes(self) -> int:
        """Bytes of this component currently on its compute device (0 when that is the host)."""
        if self.device.type == "cpu":
            return 0
        return module_bytes(self.module, self.device)

    def acquire(self) -> torch.nn.Module:
        """Make the module computable on self.device in the chosen mode."""
        mode = self.mode or self.choose()
        return place(self.module, self.device, mode).acquire()

    def done(self) -> None:
        """End of a use: offload drops the device copy, stream keeps only its hooks, resident stays."""
        placed = placed_of(self.module)
        if placed is not None:
            placed.offload()

    def release(self) -> None:
        """Nothing of this component left on the device (ComfyUI evicting it, or unloading all)."""
        unplace(self.module)


def apply_plan(transformer: Component, plan=None, frames: int | None = None, height: int | None = None,
               width: int | None = None, fallback: str = AUTO):
    """Settings for one sampling run: the plan's profile (an estimate.Estimate), else `fallback`
    (a profile name; 'auto' picks from the device's free memory, resident on CPU). Sets the
    transformer's activation savers and mode. Returns (profile, activation bytes of a denoise step,
    0 when unknown)."""
    profile = getattr(plan, "profile", None) if plan is not None else None
    if profile is None and fallback != AUTO:
        profile = fallback
    if profile is None:
        profile = resolve_profile(AUTO, device=transformer.device, variant=transformer.variant,
                                  frames=frames, height=height, width=width)
    profile = get_profile(profile)
    apply_profile(transformer.module, profile)
    transformer.choose(profile.transformer)
    activations = plan.stage("denoise_step").activations if plan is not None else 0
    return profile, activations


def decode_bytes(latents, tile, plan=None) -> int:
    """Peak reserved bytes of the decode stage: the plan's, else estimated for these latents."""
    if plan is not None:
        return plan.stage("decode").peak_reserved
    from . import estimate as E
    return E.estimate(latents.variant_key, latents.frames, latents.height, latents.width, "balanced",
                      tile=tile if tile is not None else False).stage("decode").peak_reserved


class PromptCache:
    """Small LRU of prompt embeddings keyed by (encoder identity, prompt)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or_encode(self, encoder: Component, prompt: str, encode):
        key = (id(encoder.module), encoder.source, str(encoder.dtype), prompt)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = encode()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


PROMPTS = PromptCache()
