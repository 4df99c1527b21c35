"""Our models inside ComfyUI's memory manager.

Each loaded component gets a ModelPatcher subclass whose load/unload delegate to the engine's
placement (`Component.acquire` / `release`), so ComfyUI counts our weights, evicts them when it
needs room for its own models, and "Unload models" (POST /free) frees them like core models.

The contract followed is the one `comfy.model_management` uses on a patcher, in 0.3.64 and in the
2026 sources (comfy/model_management.py @02b2b38, comfy/model_patcher.py @08d0e51):
`load_models_gpu` detaches an already-loaded model with `detach(unpatch_all=False)` and expects its
weights to stay, then calls `partially_load`; `LoadedModel.model_unload` asks
`partially_unload(offload_device, memory_to_free)` first and only fully detaches
(`detach(True)`) when fewer bytes than asked came back; `clone()` rebuilds through
`self.__class__(model, load_device, offload_device, size, weight_inplace_update=..., fast_disk=...)`.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

import comfy.model_management as mm
import comfy.model_patcher

HOST = torch.device("cpu")


class _Handle(torch.nn.Module):
    """What ModelPatcher sees as `.model`; the engine module is kept out of its module tree.

    It refers to its component weakly: the component owns the patcher, which owns this handle, and
    a strong reference back would make a cycle. Core tracks loaded models through weak references
    and finalizers, and a model that dies only when the garbage collector runs (e.g. inside our own
    release, halfway through core's `free_memory` loop) changes `current_loaded_models` under that
    loop: with real ComfyUI 0.3.64 that crashed POST /free."""

    def __init__(self, component):
        super().__init__()
        self._component = weakref.ref(component)
        self.device = HOST

    @property
    def component(self):
        return self._component()


# ComfyUI logs "Requested to load <class name>": name the handle after what it holds.
_HANDLES = {kind: type(f"CogVid{name}", (_Handle,), {}) for kind, name in
            (("transformer", "Transformer"), ("t5", "T5"), ("vae", "VAE"))}


class CogVidPatcher(comfy.model_patcher.ModelPatcher):
    def __init__(self, model, load_device=None, offload_device=HOST, size=0, weight_inplace_update=False,
                 **core_kwargs):
        # Ours: CogVidPatcher(component). Core's clone(): CogVidPatcher(handle, load_device, offload_device,
        # size, weight_inplace_update=..., fast_disk=...) (2026); whatever else a newer core passes goes on.
        if not isinstance(model, _Handle):
            model = _HANDLES[model.kind](model)
            load_device = model.component.device
        super().__init__(model, load_device, offload_device, size, weight_inplace_update, **core_kwargs)

    @property
    def component(self):
        return self.model.component

    def is_dynamic(self):
        # Deliberately the legacy (non-dynamic) load path: our weights move through the engine's
        # placement (resident / offload / streamed blocks), not through core's per-layer dynamic VRAM,
        # which would have to own and cast every weight itself. Core then sizes, frees and evicts us
        # with model_size / loaded_size / partially_unload, as for any non-dynamic model.
        return False

    def model_size(self):
        return max(1, self.component.total_bytes())

    def loaded_size(self):
        """Bytes this model holds on its compute device now. On a CPU compute device (ComfyUI --cpu)
        a placed model counts its whole size, as core counts a model loaded on the CPU."""
        from cogvid_core.api import placed_of
        comp = self.component
        if comp.device.type == "cpu":
            return comp.total_bytes() if placed_of(comp.module) is not None else 0
        return comp.device_bytes()

    def model_dtype(self):
        return self.component.dtype

    def current_loaded_device(self):
        return self.component.device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        before = self.loaded_size()
        self.component.acquire()
        self.model.device = device_to
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        """Our placements cannot give back part of a model: a resident or offloaded component frees
        all it holds, a streamed one its resident parts (its blocks visit the device only while
        computing). Returns the bytes actually freed, which core compares with `memory_to_free`."""
        before = self.loaded_size()
        if before:
            self.component.release()
        self.model.device = device_to
        return before - self.loaded_size()

    def detach(self, unpatch_all=True):
        # unpatch_all=False: core re-requests a loaded model (every queue); the placement stays. Core's
        # own steps run (injections ejected, callbacks), never its weight unpatching: it would move
        # the handle, while our weights move only through the placement.
        super().detach(unpatch_all=False)
        if unpatch_all:
            # Core unloads to free VRAM. A model holding none (offloaded or streamed, between uses) keeps
            # its host state, as a core model's weights stay in RAM after an unload: on an 8 GB card core
            # evicted the idle offloaded VAE every queue and its re-pinning took 0.9-1.1 s
            # (bench/comfyui_gpu_h200_c7.json). That state goes with the value (POST /free with
            # free_memory drops it; so does a new loader output).
            if self.loaded_size():
                self.component.release()
            elif self.component.device.type == "cuda":
                # what a release also gives back: cuBLAS's per-stream workspaces and the cached blocks
                # (0.83 GiB on the GPU after "Free model and node cache" without this, 0.74 with a release)
                from cogvid_core.api import free_memory
                free_memory(self.component.device, workspaces=True, collect=False)
            self.model.device = self.offload_device
        return self.model

    def clone(self, *args, **kwargs):
        """A new patcher over the same component (core's `is_clone` is true for it). Accepts core's
        2026 `clone(disable_dynamic=False, model_override=None, force_deepcopy=False)`; disable_dynamic
        changes nothing for a model that is never dynamic."""
        override = kwargs.get("model_override", args[1] if len(args) > 1 else None)
        if kwargs.get("force_deepcopy") or (len(args) > 2 and args[2]) or not (
                override is None or isinstance(override[0], _Handle)):
            raise ValueError(f"a private copy (force_deepcopy, or another model) of the CogVideoX {self.component.kind} is not "
                             "supported: its weights are placed by this pack and shared by every node; "
                             "use a loader node to load a second copy")
        twin = super().clone(*args, **kwargs)
        twin.owner = self.component     # the component owns only its own patcher: a clone keeps it alive
        return twin


def patcher(component) -> CogVidPatcher:
    """The component's patcher, made once per loaded module and kept in its shared `extra`, so every
    copy of the value answers `component.patcher` with it: ComfyUI's RAM-pressure cache (2026,
    comfy_execution/caching.py @dec8fb2) recognises model outputs by that attribute and evicts old ones
    first; without it a 10+ GB loader output counts as nearly nothing."""
    p = component.extra.get("patcher")
    if p is None:
        p = component.extra["patcher"] = CogVidPatcher(component)
    return p


def expose(component):
    """A loader's output, made visible to ComfyUI's memory manager and cache; returns it."""
    patcher(component)
    return component


def free_vram(device) -> int:
    """Free bytes on `device` as ComfyUI's own patchers count them. Under 2026 dynamic VRAM
    `mm.get_free_memory` leaves out what idle dynamic models hold and give back on demand;
    `ModelPatcher.get_free_memory(device)` (model_patcher.py @08d0e51) adds it back. 0.3.64 has no
    such method and no dynamic VRAM: there `mm.get_free_memory` is the whole figure."""
    counted = getattr(comfy.model_patcher.ModelPatcher, "get_free_memory", None)
    if counted is None:
        return int(mm.get_free_memory(device))
    return int(counted(_probe(), device))


_PROBES = []


def _probe():
    """A patcher over nothing, to ask core's patcher-level questions without a model at hand."""
    if not _PROBES:
        _PROBES.append(comfy.model_patcher.ModelPatcher(torch.nn.Module(), HOST, HOST, size=1))
    return _PROBES[0]


def free_for_load(nbytes: int, device) -> None:
    """Before a big load from disk: ask ComfyUI to make room on the compute device, and hand back
    the pinned host memory of models dropped since (torch caches it; it would stay in RAM)."""
    if device.type != "cpu":
        from cogvid_core import api as cv
        mm.free_memory(nbytes + mm.minimum_inference_memory(), device)
        cv.free_memory(device, host_cache=True)


def acquire(component, memory_required: int = 0):
    """ComfyUI frees what it must (its models, or ours no longer used), then ours is placed."""
    component.configure()   # the shared module takes THIS value's settings (another sampler may have set its own)
    mm.load_models_gpu([patcher(component)], memory_required=memory_required, force_full_load=True)
    return component.module


def release(component) -> None:
    """After use: offloaded weights leave the device, streamed ones keep only their hooks, resident
    ones stay (ComfyUI evicts them through the patcher when it needs the room)."""
    component.done()


@contextmanager
def in_use(component, stage: str, info=None, memory_required: int = 0):
    """`with in_use(vae, "image_encode", info) as module: module()...`: the component placed through
    ComfyUI on first call of `module()` (a node whose work is cached may never need it), an
    out-of-memory error inside turned into the stage's actionable message, the component released
    after, whatever happened."""
    from cogvid_core import api as cv
    from cogvid_core.api import on_device
    placed = []

    def module():
        if not placed:
            placed.append(acquire(component, memory_required))
        return placed[0]

    try:   # the component's GPU current: ComfyUI's may be another card (streams are per device)
        with on_device(component.device), cv.oom_guard(stage, info or cv.RunInfo(device=component.device)):
            yield module
    finally:
        release(component)


def make_room(nbytes: int, device) -> None:
    """Before a stage that needs activation memory (e.g. decode): evict what ComfyUI can."""
    if device.type != "cpu":
        mm.free_memory(nbytes + mm.extra_reserved_memory(), device)
