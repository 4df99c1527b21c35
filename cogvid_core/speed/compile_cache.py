"""torch.compile's work kept across processes, and its compile workers kept small.

A ComfyUI restart (or a second command line run) used to compile the blocks again: 36 s before the
first step of the compiled small run on an H100. Torch can hand out what a process compiled as one
blob (``torch.compiler.save_cache_artifacts``: inductor's graphs with their Triton kernels, AOTAutograd
entries, autotuning results) and load it into a later process's caches before it compiles
(``load_cache_artifacts``); the later process then only traces (dynamo), and inductor finds every graph
in its cache. This module writes that blob to one file per torch build and GPU model, in a folder the
user can see and delete:

* ``COGVID_COMPILE_CACHE`` (environment): a folder, or ``off``;
* else the adapter's choice (:func:`set_folder`; ComfyUI: ``models/cogvid_compile_cache``; the command
  line: ``--compile-cache``);
* else ``$XDG_CACHE_HOME/cogvid-i2v/compile`` (``~/.cache/cogvid-i2v/compile``).

The blob holds whatever this process compiled, other models' graphs too; a stale file (another torch,
another card) is never read: its name carries both. A file that does not load is logged and ignored.

Compile workers: inductor compiles Triton kernels in a pool of worker processes, one per CPU core by
default (16 on the GPU machine: +6 GiB of host memory for the rest of the process, as the whole process
tree measured it). Unless the user set ``TORCHINDUCTOR_COMPILE_THREADS``, the pool is capped at
:data:`COMPILE_THREADS` before the first compile, and not started at all when kept kernels were loaded
(:func:`prepare`; docs/performance.md: what each choice costs).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("cogvid_core.speed.fast")

ENV = "COGVID_COMPILE_CACHE"
OFF = "off"
# worker processes inductor may use to compile kernels (torch's default: one per core, capped at 32)
COMPILE_THREADS = 2
_chosen: dict = {"folder": None}
_loaded: dict[Path, int] = {}      # file -> artifacts it held when this process loaded or wrote it


def set_folder(folder) -> None:
    """Where this process keeps compiled work (``None``: the default folder; ``"off"``: nowhere)."""
    _chosen["folder"] = folder


def folder() -> Path | None:
    chosen = os.environ.get(ENV) or _chosen["folder"]
    if chosen is not None and str(chosen).strip().lower() == OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cogvid-i2v" / "compile"


def file_for(device) -> Path | None:
    """The blob for this torch build and this device model (None when keeping is off)."""
    root = folder()
    if root is None:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cc = "sm%d%d" % torch.cuda.get_device_capability(device)
        where = f"{cc}-{name}"
    else:
        where = device.type
    try:
        import triton
        tv = f"-triton{triton.__version__}"
    except ImportError:
        tv = ""
    raw = f"torch{torch.__version__}{tv}-{where}"
    return root / ("".join(c if c.isalnum() or c in ".-_" else "_" for c in raw) + ".bin")


def _count(info) -> int:
    return sum(len(v) for v in info.artifacts.values()) if info is not None else 0


def load(device) -> bool:
    """Before the first compiled call: what an earlier process compiled, into this process's caches
    (once per file and process). True when this call loaded a file."""
    path = file_for(device)
    if path is None or path in _loaded or not path.is_file():
        return False
    _loaded[path] = 0
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
        why = None if info is not None else "torch could not read it"      # torch logs why and returns None
    except Exception as e:                       # noqa: BLE001  (a damaged or foreign file: compile afresh)
        why = f"{type(e).__name__}: {e}"
    if why:
        log.warning("compile cache %s did not load (%s): compiling afresh; delete the file if this repeats", path, why)
        return False
    _loaded[path] = _count(info)
    log.info("compile cache: %d compiled graphs loaded from %s", _loaded[path], path)
    return True


def save(device) -> None:
    """After a compiled run: this process's compiled work, written when it holds more than the file."""
    path = file_for(device)
    if path is None:
        return
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as e:                       # noqa: BLE001  (never fail a finished run over a cache)
        log.warning("compile cache not written (%s: %s)", type(e).__name__, e)
        return
    if saved is None or _count(saved[1]) <= _loaded.get(path, 0):
        return
    blob, info = saved
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)                    # whole or not at all: a later process never reads half a file
    except OSError as e:
        log.warning("compile cache not written to %s (%s): the next process compiles again; set %s to a "
                    "writable folder, or to 'off'", path, e, ENV)
        return
    _loaded[path] = _count(info)
    log.info("compile cache: %d compiled graphs (%.1f MiB) written to %s", _loaded[path], len(blob) / 2 ** 20, path)


def cap_workers(threads: int = None) -> None:
    """Inductor's compile pool at ``threads`` workers (default :data:`COMPILE_THREADS`; 1: no pool,
    compile in this process), unless the user chose (``TORCHINDUCTOR_COMPILE_THREADS``) or the pool
    already runs (another compile in this process)."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    from torch._inductor import async_compile, config

    if not getattr(async_compile, "_pool_set", None):     # the pools started so far (none: set before it starts)
        config.compile_threads = threads or COMPILE_THREADS


def prepare(device) -> None:
    """Before the first compiled call: the kept kernels loaded, and the compile pool sized for what is
    left to compile. With kept kernels nothing (or little) is: no pool at all (H200, 1.5 resident
    fp8+fa3fp8+compile: the pool's processes were +1.07 GiB of host memory on a restart that compiled
    nothing; without it the process tree was 1.17 GiB against the exact run's 1.09, first step the same).
    Without them, :data:`COMPILE_THREADS` workers: the cold first step took 20.1 s with 2, 22.8 s
    with torch's 16 in an earlier session (bench/README.md, session 12)."""
    cap_workers(1 if load(device) else COMPILE_THREADS)
