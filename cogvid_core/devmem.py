"""How much memory: bytes of a module's tensors, free and allocated device memory, the process's
resident host memory, and handing cached blocks back (device caches, torch's pinned host cache).
One home for these readings."""
from __future__ import annotations

import ctypes
import gc
import resource
import sys

import torch

GiB = 1024 ** 3
BYTES_PER_ELEMENT = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                     "fp8": 1, "fp8_e4m3": 1, "fp8-e4m3": 1, "fp8_e4m3fn": 1, "float8_e4m3fn": 1}


def precision_bytes(precision) -> int:
    """Bytes per element of a storage precision named as the widgets and the CLI name it (or a dtype)."""
    try:
        return BYTES_PER_ELEMENT[str(precision).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use one of bf16, fp16, fp32, fp8_e4m3") from None


def module_tensors(module: torch.nn.Module):
    """Each parameter and buffer of ``module`` once (a tied weight is one tensor)."""
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def module_bytes(module: torch.nn.Module, device: torch.device | None = None) -> int:
    """Bytes of the module's tensors, all of them or those on ``device``'s type."""
    return sum(t.numel() * t.element_size() for t in module_tensors(module)
               if device is None or t.device.type == device.type)


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


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_rss_bytes() -> int:
    kib = _read_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def host_rss_bytes(trim: bool = True) -> int | None:
    """The process's resident host memory now (None where neither /proc nor psutil tells).

    ``trim``: first hand glibc's freed heap pages back (malloc_trim), so memory earlier work freed
    is not read as still in use; whatever is live stays in the figure."""
    if trim:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    kib = _read_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss
