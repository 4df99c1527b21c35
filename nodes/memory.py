"""Our models inside ComfyUI's memory manager.

Each loaded component gets a ModelPatcher subclass whose load/unload delegate to the engine's
placement (`Component.acquire` / `release`), so ComfyUI counts our weights, evicts them when it
needs room for its own models, and "Unload models" (POST /free) frees them like core models.
"""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.model_patcher


class _Handle(torch.nn.Module):
    """What ModelPatcher sees as `.model`; the engine module is kept out of its module tree."""

    def __init__(self, component):
        super().__init__()
        self.component = component
        self.device = torch.device("cpu")


# ComfyUI logs "Requested to load <class name>": name the handle after what it holds.
_HANDLES = {kind: type(f"CogVid{name}", (_Handle,), {}) for kind, name in
            (("transformer", "Transformer"), ("t5", "T5"), ("vae", "VAE"))}


class CogVidPatcher(comfy.model_patcher.ModelPatcher):
    def __init__(self, component):
        super().__init__(_HANDLES[component.kind](component), load_device=component.device,
                         offload_device=torch.device("cpu"), size=max(1, component.total_bytes()))

    @property
    def component(self):
        return self.model.component

    def loaded_size(self):
        return self.component.device_bytes()

    def model_dtype(self):
        return self.component.dtype

    def current_loaded_device(self):
        return self.component.device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        before = self.loaded_size()
        self.component.acquire()
        self.model.device = device_to
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0):
        freed = self.loaded_size()
        self.component.release()
        self.model.device = self.offload_device
        return freed

    def detach(self, unpatch_all=True):
        self.component.release()
        self.model.device = self.offload_device
        return self.model

    def clone(self):
        return self


def patcher(component) -> CogVidPatcher:
    p = component.extra.get("patcher")
    if p is None:
        p = component.extra["patcher"] = CogVidPatcher(component)
    return p


def free_for_load(nbytes: int, device) -> None:
    """Before a big load from disk: ask ComfyUI to make room on the compute device, and hand back
    the pinned host memory of models dropped since (torch caches it; it would stay in RAM)."""
    if device.type != "cpu":
        from cogvid_core import devmem
        mm.free_memory(nbytes + mm.minimum_inference_memory(), device)
        devmem.free_memory(device, host_cache=True)


def acquire(component, memory_required: int = 0):
    """ComfyUI frees what it must (its models, or ours no longer used), then ours is placed."""
    mm.load_models_gpu([patcher(component)], memory_required=memory_required, force_full_load=True)
    return component.module


def release(component) -> None:
    """After use: offloaded weights leave the device, streamed ones keep only their hooks, resident
    ones stay (ComfyUI evicts them through the patcher when it needs the room)."""
    component.done()


def make_room(nbytes: int, device) -> None:
    """Before a stage that needs activation memory (e.g. decode): evict what ComfyUI can."""
    if device.type != "cpu":
        mm.free_memory(nbytes + mm.extra_reserved_memory(), device)
