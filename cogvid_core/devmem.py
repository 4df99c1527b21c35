"""How much memory: bytes of a module's tensors, free and allocated device memory, and handing
cached blocks back (device caches, torch's pinned host cache). One home for these readings."""
from __future__ import annotations

import gc

import torch

GiB = 1024 ** 3


def module_bytes(module: torch.nn.Module, device: torch.device | None = None) -> int:
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if device is None or t.device.type == device.type:
            total += t.numel() * t.element_size()
    return total


def free_memory(device=None, host_cache: bool = False) -> None:
    """Return cached device blocks to the driver; with ``host_cache`` also the pinned host blocks
    torch keeps after pinned tensors die (offloaded/streamed weights of a model no longer loaded):
    without it those stay in this process's RSS, GBs per model, until the process exits."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()
        if host_cache and torch.cuda.is_initialized():
            empty_host_cache()


def empty_host_cache() -> bool:
    """Free torch's cached pinned host blocks; False where this torch has no such call."""
    fn = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):   # older torch: the same call
        fn = fn or getattr(torch._C, name, None)
    if fn is None:
        return False
    fn()
    return True


def device_free_bytes(device) -> int | None:
    """Free bytes on a CUDA device, None elsewhere (the CPU has no meaningful figure here)."""
    try:
        dev = torch.device(device) if device is not None else None
    except (TypeError, RuntimeError):
        return None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(dev)[0])


def allocated_bytes(device=None) -> int:
    """Device memory allocated by tensors now (CUDA), 0 on CPU: before/after checks use one path."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
        return int(torch.cuda.memory_allocated(dev))
    return 0
