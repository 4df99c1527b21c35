"""How much memory: bytes of a module's tensors, free and allocated device memory, the process's
resident host memory, and handing cached blocks back (device caches, torch's pinned host cache).
One home for these readings."""
from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading

import torch

from cogvid_core.device.info import allocator_backend

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


def free_memory(device=None, host_cache: bool = False, workspaces: bool = False, collect: bool = True) -> None:
    """Return cached device blocks to the driver; with ``host_cache`` also the pinned host blocks
    torch keeps after pinned tensors die (offloaded/streamed weights of a model no longer loaded):
    without it those stay in this process's RSS, GBs per model, until the process exits. With
    ``workspaces`` also cuBLAS's per-stream workspaces (33 MiB allocated after ComfyUI's "Free model
    and node cache" on the H200; the next matrix product makes a new one). ``collect=False``: no garbage
    collection first (nothing of the caller's died; a collection inside ComfyUI's free_memory loop costs time)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)   # torch has no public call for it
        if workspaces and clear is not None and torch.cuda.is_initialized():
            clear()
        torch.cuda.empty_cache()
        if host_cache and torch.cuda.is_initialized():
            empty_host_cache()


def pool_keeps_freed(device) -> bool:
    """Whether ``device``'s allocator is cudaMallocAsync (ComfyUI's default): its pool keeps freed memory
    until trimmed, and a trim is cheap (the native allocator's release unmaps pages: ~1/3 of a decode)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_initialized() and allocator_backend() == "cudaMallocAsync"


def empty_host_cache() -> bool:
    """Free torch's cached pinned host blocks; False where this torch has no such call."""
    fn = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):   # older torch: the same call
        fn = fn or getattr(torch._C, name, None)
    if fn is None:
        return False
    fn()
    return True


def _mem_info(device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device, None elsewhere."""
    try:
        dev = torch.device(device) if device is not None else None
    except (TypeError, RuntimeError):
        return None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(dev)
    return int(free), int(total)


def device_free_bytes(device) -> int | None:
    """Free bytes on a CUDA device, None elsewhere (the CPU has no meaningful figure here)."""
    info = _mem_info(device)
    return None if info is None else info[0]


def device_total_bytes(device) -> int | None:
    """All of a CUDA device's memory (what nvidia-smi calls total), None elsewhere."""
    info = _mem_info(device)
    return None if info is None else info[1]


def allocated_bytes(device=None) -> int:
    """Device memory allocated by tensors now (CUDA), 0 on CPU: before/after checks use one path."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
        return int(torch.cuda.memory_allocated(dev))
    return 0


def _read_status_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_available_bytes() -> int | None:
    """MemAvailable: RAM the kernel can hand out without swapping (free + droppable page cache);
    None where /proc/meminfo is missing."""
    kib = _read_status_kib("MemAvailable", "/proc/meminfo")
    return None if kib is None else kib * 1024


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


def trim_host_heap() -> None:
    """Hand glibc's freed heap pages back to the OS (malloc_trim). A model's weights moved off the host
    free thousands of tensors below glibc's mmap threshold: without a trim their pages stay in the
    process's RSS (the VAE's 0.4 GiB host copy after it went to the GPU)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def host_rss_bytes(trim: bool = True) -> int | None:
    """The process's resident host memory now (None where neither /proc nor psutil tells).

    ``trim``: first hand glibc's freed heap pages back (malloc_trim), so memory earlier work freed
    is not read as still in use; whatever is live stays in the figure."""
    if trim:
        trim_host_heap()
    kib = _read_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def host_memory() -> dict[str, int]:
    """Host memory of this process now, by kind (bytes; empty where /proc is missing).

    ``anon``: RssAnon (heap, CPU tensors, staging buffers we page-lock with cudaHostRegister);
    ``file``: RssFile (mapped file pages: the kernel may drop them, another process may share them);
    ``shmem``: RssShmem; ``pinned``: bytes torch's pinned-host allocator holds (cudaHostAlloc: the
    tensors from ``pin_memory()`` plus its cache, ``allocated_bytes.current``).
    ``anon_pinned`` is what this process owns and the kernel cannot take back: anon + shmem (+ pinned
    where cudaHostAlloc'd pages are not already in RSS, see PINNED_IN_RSS).
    """
    out = {}
    for key, field in (("anon", "RssAnon"), ("file", "RssFile"), ("shmem", "RssShmem")):
        kib = _read_status_kib(field)
        if kib is not None:
            out[key] = kib * 1024
    out["pinned"] = pinned_host_bytes()
    if "anon" in out:
        out["anon_pinned"] = out["anon"] + out.get("shmem", 0) + (0 if PINNED_IN_RSS else out["pinned"])
    return out


# cudaHostAlloc'd memory (torch's pinned allocator: pin_memory(), group offloading) is counted in
# RssShmem, not RssAnon: 1 GiB from torch.empty(pin_memory=True) raised RssShmem by 1.000 GiB and left
# RssAnon alone (H200, driver with CUDA 13, torch 2.11; bench/hostmem_h200_run1.json "diag"). Memory
# page-locked with cudaHostRegister stays in RssAnon. So anon + shmem already holds all pinned memory.
PINNED_IN_RSS = True


def pinned_host_bytes() -> int:
    """Bytes torch's pinned-host allocator holds now (in use + cached); 0 without CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    except (RuntimeError, AttributeError):
        return 0


class HostMemoryPeak:
    """Samples :func:`host_memory` on a thread (every ``interval`` s) and keeps each kind's peak:
    the kernel keeps no per-kind high-water mark, so a short spike between samples can be missed."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        for k, v in host_memory().items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "HostMemoryPeak":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="cogvid-host-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def gib(self, kind: str) -> float | None:
        return self.peak[kind] / GiB if kind in self.peak else None
