"""Per-stage time and memory recording: one row per stage (text encode, image encode, denoise, decode).

    rec = StageRecorder(device)
    with rec.stage("denoise", steps=50):
        ...
    print(rec.table()); Path("report.json").write_text(rec.to_json())

On CUDA a stage synchronizes the device, resets the peak statistics, and records peak allocated and
peak reserved bytes (``torch.cuda.max_memory_*``) and wall seconds. On any device it also records the
process's peak resident host memory (Linux: VmHWM, reset per stage where the kernel allows it).
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

GIB = 1024 ** 3


@dataclass
class StageRow:
    stage: str
    seconds: float
    steps: int | None = None
    s_per_step: float | None = None
    peak_alloc_gib: float | None = None      # torch peak allocated on the accelerator
    peak_reserved_gib: float | None = None   # torch peak reserved (what the caching allocator holds)
    end_alloc_gib: float | None = None       # still allocated when the stage ended
    host_peak_rss_gib: float | None = None   # process peak RSS during the stage (or since start)
    host_peak_anon_pinned_gib: float | None = None   # peak anonymous + pinned host memory (sampled)
    host_peak_file_gib: float | None = None  # peak file-backed resident pages (mapped checkpoints; droppable)
    error: str | None = None


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_host_peak() -> bool:
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
# RssAnon alone (H200, driver with CUDA 13, torch 2.11; bench/hostmem_h200.json "diag"). Memory
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
        return self.peak[kind] / GIB if kind in self.peak else None


class StageRecorder:
    """Context manager per stage; collects :class:`StageRow` s. Nested stages are allowed (each resets
    the peak statistics, so an outer stage then reports only what came after the inner one began:
    prefer flat stages)."""

    def __init__(self, device: torch.device | str | None = None, *, enabled: bool = True):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.enabled = enabled
        self._rows: list[StageRow] = []
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, steps: int | None = None):
        if not self.enabled:
            yield None
            return
        self._sync()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        _reset_host_peak()
        row = StageRow(stage=name, seconds=0.0, steps=steps)
        sampler = HostMemoryPeak().__enter__()
        t0 = time.perf_counter()
        try:
            yield row
        except BaseException as e:  # record, then let it propagate
            row.error = f"{type(e).__name__}: {e}"[:300]
            raise
        finally:
            self._sync()
            row.seconds = time.perf_counter() - t0
            if row.steps:
                row.s_per_step = row.seconds / row.steps
            if self._cuda:
                row.peak_alloc_gib = torch.cuda.max_memory_allocated(self.device) / GIB
                row.peak_reserved_gib = torch.cuda.max_memory_reserved(self.device) / GIB
                row.end_alloc_gib = torch.cuda.memory_allocated(self.device) / GIB
            row.host_peak_rss_gib = host_peak_rss_bytes() / GIB
            sampler.__exit__()
            row.host_peak_anon_pinned_gib, row.host_peak_file_gib = sampler.gib("anon_pinned"), sampler.gib("file")
            self._rows.append(row)

    def add(self, row: StageRow) -> None:
        self._rows.append(row)

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self._rows]

    def total(self) -> dict:
        """Whole-run summary: summed seconds, maxima of the peaks."""
        def mx(key):
            vals = [getattr(r, key) for r in self._rows if getattr(r, key) is not None]
            return max(vals) if vals else None
        return dict(stage="total", seconds=sum(r.seconds for r in self._rows),
                    peak_alloc_gib=mx("peak_alloc_gib"), peak_reserved_gib=mx("peak_reserved_gib"),
                    host_peak_rss_gib=mx("host_peak_rss_gib"), host_peak_anon_pinned_gib=mx("host_peak_anon_pinned_gib"),
                    host_peak_file_gib=mx("host_peak_file_gib"))

    def table(self) -> str:
        """Markdown table, one line per stage plus a total line."""
        def f(v, spec=".2f"):
            return "-" if v is None else format(v, spec)
        lines = ["| stage | seconds | s/step | peak alloc GiB | peak reserved GiB | host peak RSS GiB "
                 "| host anon+pinned GiB | host file-backed GiB |", "|---|---|---|---|---|---|---|---|"]
        for r in self._rows:
            name = r.stage + (" (failed)" if r.error else "")
            lines.append(f"| {name} | {f(r.seconds)} | {f(r.s_per_step)} | {f(r.peak_alloc_gib)} | "
                         f"{f(r.peak_reserved_gib)} | {f(r.host_peak_rss_gib)} | {f(r.host_peak_anon_pinned_gib)} | "
                         f"{f(r.host_peak_file_gib)} |")
        t = self.total()
        lines.append(f"| **total** | {f(t['seconds'])} | - | {f(t['peak_alloc_gib'])} | "
                     f"{f(t['peak_reserved_gib'])} | {f(t['host_peak_rss_gib'])} | "
                     f"{f(t['host_peak_anon_pinned_gib'])} | {f(t['host_peak_file_gib'])} |")
        return "\n".join(lines)

    def to_json(self, **extra) -> str:
        """JSON text: device, stages, total, plus any keyword fields given (e.g. settings)."""
        return json.dumps(dict(device=str(self.device), pid=os.getpid(), stages=self.rows(),
                               total=self.total(), **extra), indent=2)
