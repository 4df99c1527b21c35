"""What this process runs on: the GPU's name and torch's CUDA allocator (the keys calibration sets use)."""
from __future__ import annotations

import os
from functools import lru_cache

ALLOCATORS = ("native", "native:expandable", "cudaMallocAsync")


def device_card() -> str | None:
    """The current CUDA device's name; None without CUDA (the estimate then has no card to match)."""
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


@lru_cache(maxsize=1)
def device_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability, (8, 9) on an L4 or RTX 4090; None without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def allocator_backend() -> str:
    """torch's CUDA caching allocator in this process: "native", "native:expandable" (expandable
    segments: the command line's setting) or "cudaMallocAsync" (ComfyUI's default); "native" where torch
    has no CUDA. Expandable segments reserve less over the same allocations (the 1.5 decode at 360x240
    tiles: 5.4-5.5 GiB against 6.0 without, H200), so they are a calibration set of their own."""
    import torch
    try:
        backend = str(torch.cuda.get_allocator_backend())
    except (AttributeError, RuntimeError):     # CPU-only builds have no CUDA allocator at all
        return "native"
    return allocator_key(backend, os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF", ""))


def allocator_key(backend: str, alloc_conf: str) -> str:
    """The calibration set's name for torch's backend and its PYTORCH_CUDA_ALLOC_CONF."""
    settings = {k.strip(): v.strip().lower() for k, _, v in (kv.partition(":") for kv in alloc_conf.split(","))}
    return "native:expandable" if backend == "native" and settings.get("expandable_segments") == "true" else backend
