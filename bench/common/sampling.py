"""Memory of a process as nvidia-smi and the kernel show it, sampled on a thread.

NVML (nvidia-ml-py) gives a process's GPU memory, CUDA context and every allocator included (what
nvidia-smi lists; the whole device's used memory where NVML does not list the process);
/proc/<pid>/status gives its host memory (resident, peak, anonymous / file-backed / shared). Torch's
own peaks say what torch holds; these say what the card and the machine see. No torch import: the
sampler watches child processes (a ComfyUI worker, the command line) as well as its own.
"""
from __future__ import annotations

import os
import threading

STATUS_FIELDS = {"VmRSS": "rss", "VmHWM": "rss_hwm", "RssAnon": "rss_anon", "RssFile": "rss_file",
                 "RssShmem": "rss_shmem"}


def proc_status(pid: int | str = "self") -> dict:
    """Host memory of a process in bytes (resident, its peak, anonymous / file-backed / shared)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in STATUS_FIELDS:
                    out[STATUS_FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def reset_host_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # resets VmHWM to the current RSS
    except OSError:
        pass


class MemSampler(threading.Thread):
    """Every 50 ms: NVML memory of one process (what nvidia-smi lists) and of the whole GPU, and the
    process's host memory; keeps the maxima since the last take()."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period, self.nvml, self.error = pid, period, None, None
        self.lock, self.peak, self.halt = threading.Lock(), {}, threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(index) if index.isdigit() else 0)
            self.nvml = pynvml
        except Exception as e:      # no NVML (CPU machine, no nvidia-ml-py): host memory only
            self.error = f"{type(e).__name__}: {e}"

    def read(self) -> dict:
        out = {f"host_{k}": v for k, v in proc_status(self.pid).items() if k != "rss_hwm"}
        if self.nvml is not None:
            out["nvml_device_used"] = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == self.pid and p.usedGpuMemory is not None:
                    out["nvml_process"] = p.usedGpuMemory
        return out

    def run(self):
        while not self.halt.wait(self.period):
            self.sample()

    def sample(self) -> dict:
        now = self.read()
        with self.lock:
            for k, v in now.items():
                self.peak[k] = max(v, self.peak.get(k, v))
        return now

    def take(self) -> dict:
        """Peaks since the last take (one last sample included), then start over."""
        self.sample()
        with self.lock:
            peak, self.peak = self.peak, {}
        return peak

    def total_bytes(self) -> int | None:
        return None if self.nvml is None else self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total

    def device_name(self) -> str | None:
        if self.nvml is None:
            return None
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return name.decode() if isinstance(name, bytes) else name


def nvml_gpu(reading: dict) -> tuple[int | None, str]:
    """The process's own NVML figure where NVML lists it, else the whole GPU's used memory."""
    if "nvml_process" in reading:
        return reading["nvml_process"], "process"
    return reading.get("nvml_device_used"), "device"


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (inductor's compile workers, a sidecar pool)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class TreeSampler(threading.Thread):
    """Every ``period`` s: anonymous + shared (pinned pages show there) host memory summed over a process
    tree; keeps the peak and how many processes the tree had then (what a machine's RAM has to hold)."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period, self.halt = pid, period, threading.Event()
        self.peak, self.procs_at_peak, self.max_procs = 0, 0, 0

    def run(self):
        self.sample()
        while not self.halt.wait(self.period):
            self.sample()

    def sample(self):
        pids = descendants(self.pid)
        total = sum(s.get("rss_anon", 0) + s.get("rss_shmem", 0) for s in map(proc_status, pids))
        self.max_procs = max(self.max_procs, len(pids))
        if total > self.peak:
            self.peak, self.procs_at_peak = total, len(pids)

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        self.sample()
        return dict(tree_peak_anon_shmem_gib=self.peak / 2 ** 30, tree_procs_at_peak=self.procs_at_peak,
                    tree_max_procs=self.max_procs)
