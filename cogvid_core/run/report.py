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

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from cogvid_core.device.devmem import GiB, HostMemoryPeak, host_peak_rss_bytes, reset_host_peak


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
        reset_host_peak()
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
                row.peak_alloc_gib = torch.cuda.max_memory_allocated(self.device) / GiB
                row.peak_reserved_gib = torch.cuda.max_memory_reserved(self.device) / GiB
                row.end_alloc_gib = torch.cuda.memory_allocated(self.device) / GiB
            row.host_peak_rss_gib = host_peak_rss_bytes() / GiB
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
