"""Loaded components as values, and a prompt cache, shared by front ends (ComfyUI nodes, CLI).

A `Component` is one loaded model (transformer, T5 or VAE) plus how to use it: its variant,
compute device, dtype, placement choice and, once a plan is applied, the plan's profile. It is a
value: `with_plan()` returns a configured copy, so two samplers fed from one loader never change
each other's settings. Only at the moment of use (`use()`, or `configure()` before `acquire()`)
does the shared module take the settings of the value in hand. No ComfyUI import here.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from cogvid_core.model import precision as precision_rule
from cogvid_core.speed import fast
from cogvid_core.model import lora as lora_mod
from cogvid_core.memory.activations import apply_profile
from cogvid_core.device.devmem import module_bytes
from cogvid_core.memory.placement import place, placed_of, unplace
from cogvid_core.plan.planner import resolve_profile
from cogvid_core.memory.profiles import AUTO, MODES, Profile, get_profile

OFFLOAD_DEVICE = torch.device("cpu")


PLACEMENTS = (AUTO, *MODES)
# What "auto" means for a component used without a plan: the VAE and the transformer visit the GPU only
# while they run. T5 streams: it runs one forward pass per prompt, so streaming moves the same bytes as
# copying it whole but never holds more than two of its blocks (offload put all 9.5 GB of T5 on the GPU
# in the ComfyUI node path: 9.6 GiB allocated at text encode on the H200, bench/comfyui_gpu_h200_c1.json).
AUTO_MODE = {"t5": "stream", "vae": "offload", "transformer": "offload"}
# The profile field that holds each kind's placement mode.
PROFILE_FIELD = {"transformer": "transformer", "t5": "text_encoder", "vae": "vae"}
# A profile with no activation savers: what a transformer used without a plan runs with.
NO_SAVERS = Profile("no plan", description="the module as loaded: no activation savers")
_CONFIGURED = "configured_mode"   # extra: the placement mode of the value that configured the module last
_USE_HOOKS = "use_hooks"          # extra: the LoRA and speed hooks of the value in use (an ExitStack), until done()


@dataclass(frozen=True, eq=False)
class Component:
    kind: str                        # "transformer" | "t5" | "vae"
    module: torch.nn.Module          # shared by every copy
    device: torch.device             # where it computes
    dtype: torch.dtype
    placement: str = AUTO            # the user's choice: auto or one of profiles.MODES
    variant: object = None           # models.Variant when known
    source: str = ""
    tokenizer: object = None         # T5 only
    profile: Profile | None = None   # the applied plan's profile (with_plan); None: no plan
    loras: tuple = ()                # ((lora.LoraWeights, strength), ...) active while this value is in use
    speed: str = fast.EXACT          # transformer: a fast.CHOICES name, active while this value is in use
    precision: str = ""              # the resolved precision name (model.precision); "": named by dtype
    # ONE dict per loaded module, shared by every copy (dataclasses.replace passes it on): the ComfyUI
    # patcher lives here (one per module, so ComfyUI counts the weights once), and the mode the module
    # was last configured for, which `acquire()` honours whichever copy the patcher calls it on.
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.speed != fast.EXACT:
            if self.kind != "transformer":
                raise ValueError(f"speed options apply to the CogVideoX transformer, not to the {self.kind}")
            fast.check_name(self.speed)   # a bad name fails where it was given, not at the first step

    @property
    def mode(self) -> str:
        """Placement mode of this value: the user's explicit choice, else the profile's, else the kind's default."""
        if self.placement != AUTO:
            mode = self.placement
        elif self.profile is not None:
            mode = getattr(self.profile, PROFILE_FIELD[self.kind])
        else:
            mode = AUTO_MODE[self.kind]
        return "offload" if self.kind == "vae" and mode == "stream" else mode   # the VAE has no block list

    @property
    def planned_precision(self) -> dict:
        """{component: precision name} of this value, for the estimate (an fp32 transformer plans 4-byte
        weights)."""
        name = self.precision or precision_rule.name_of(self.dtype)
        return {PROFILE_FIELD[self.kind]: name}

    @property
    def patcher(self):
        """The ComfyUI patcher over this module, when a front end made one (ComfyUI's cache looks for it)."""
        return self.extra.get("patcher")

    def with_plan(self, profile: Profile | str | None) -> "Component":
        """A copy that uses ``profile`` (its placement mode when ours is auto, its activation savers);
        this value, and every other copy, is unchanged."""
        return dataclasses.replace(self, profile=None if profile is None else get_profile(profile))

    def with_loras(self, loras) -> "Component":
        """A copy that applies ``loras`` ((LoraWeights, strength) pairs) after its own while in use;
        checked against the module now (lora.LoraError). The base weights are never changed, so this
        value and every other copy run without them."""
        if self.kind != "transformer":
            raise ValueError(f"a LoRA applies to the CogVideoX transformer, not to the {self.kind}")
        pairs = tuple((lw, float(strength)) for lw, strength in loras)
        for lw, _ in pairs:
            lora_mod.check(self.module, lw)
        return dataclasses.replace(self, loras=self.loras + pairs)

    def with_lora(self, weights, strength: float = 1.0) -> "Component":
        return self.with_loras([(weights, strength)])

    def with_speed(self, speed: str) -> "Component":
        """A copy that runs with ``speed`` (fast.CHOICES) while in use; this value is unchanged."""
        return dataclasses.replace(self, speed=speed)

    def lora_bytes(self) -> int:
        """Device bytes this value's LoRAs take while it samples (the estimate's extra weight term)."""
        return lora_mod.lora_bytes(self.loras, self.dtype)

    def total_bytes(self) -> int:
        return module_bytes(self.module)

    def device_bytes(self) -> int:
        """Bytes of this component currently on its compute device (0 when that is the host)."""
        if self.device.type == "cpu":
            return 0
        return module_bytes(self.module, self.device)

    def configure(self) -> None:
        """Give the shared module this value's settings: activation savers (transformer) and the
        placement mode the next `acquire()` uses. Moves no weights (a front end may first have to make
        room, e.g. ComfyUI's load_models_gpu)."""
        if self.kind == "transformer":
            apply_profile(self.module, self.profile or NO_SAVERS)
        self._unhook()   # a value configured before and never done: its LoRAs and speed end here
        if self.loras or self.speed != fast.EXACT:
            # Every front end configures right before a use and ends it with done(): the hooks live
            # exactly that long, on the shared module, whichever patcher or placement then runs it.
            hooks = ExitStack()
            if self.loras:
                # speed options other than exact fold each LoRA into its weight per call (lora_linear)
                fold = self.speed != fast.EXACT and not fast.resolve(self.speed, self.device).exact
                hooks.enter_context(lora_mod.applied(self.module, self.loras, fold))
            if self.speed != fast.EXACT:
                hooks.enter_context(fast.applied(self.module, self.speed, self.device))
            self.extra[_USE_HOOKS] = hooks
        self.extra[_CONFIGURED] = self.mode

    def acquire(self) -> torch.nn.Module:
        """Make the module computable on self.device, in the mode it was last configured for (this
        value's own when never configured): a patcher made with another copy still honours the
        settings of the value in use."""
        return place(self.module, self.device, self.extra.get(_CONFIGURED, self.mode)).acquire()

    def done(self) -> None:
        """End of a use: the LoRAs and speed options come off; offload drops the device copy, stream
        keeps only its hooks, resident stays."""
        self._unhook()
        placed = placed_of(self.module)
        if placed is not None:
            placed.offload()

    def _unhook(self) -> None:
        hooks = self.extra.pop(_USE_HOOKS, None)
        if hooks is not None:
            hooks.close()

    def release(self) -> None:
        """Nothing of this component left on the device (ComfyUI evicting it, or unloading all)."""
        unplace(self.module)

    @contextmanager
    def use(self):
        """``with component.use() as module:``: the shared module configured for this value and
        computable on its device inside; the use ends (`done()`) however the block exits."""
        self.configure()
        try:
            yield self.acquire()
        finally:
            self.done()


def _profile_for(transformer: Component, plan, frames, height, width, fallback: str) -> Profile:
    profile = getattr(plan, "profile", None) if plan is not None else None
    if profile is None and fallback != AUTO:
        profile = fallback
    if profile is None:
        profile = resolve_profile(AUTO, device=transformer.device, variant=transformer.variant,
                                  frames=frames, height=height, width=width, lora_bytes=transformer.lora_bytes(),
                                  speed=transformer.speed, held_bytes=transformer.device_bytes(),
                                  precision=transformer.planned_precision)
    return get_profile(profile)


def plan_for(transformer: Component, plan=None, frames: int | None = None, height: int | None = None,
             width: int | None = None, fallback: str = AUTO) -> tuple[Component, Profile, int]:
    """Settings for one sampling run: the plan's profile (an estimate.Estimate), else `fallback`
    (a profile name; 'auto' picks from the device's free memory, resident on CPU). Returns (the
    transformer configured with it, a copy; the profile; activation bytes of a denoise step, 0 when
    unknown). `transformer` itself is unchanged."""
    profile = _profile_for(transformer, plan, frames, height, width, fallback)
    activations = plan.stage("denoise_step").activations if plan is not None else 0
    return transformer.with_plan(profile), profile, activations


def decode_bytes(latents, tile, plan=None) -> int:
    """Peak reserved bytes of the decode stage: the plan's, else estimated for these latents."""
    if plan is not None:
        return plan.stage("decode").peak_reserved
    from cogvid_core.plan import estimate as E
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
