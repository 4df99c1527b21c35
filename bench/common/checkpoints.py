"""Random checkpoints for the benches, in the HF layout the loaders read by default.

Written by the engine's own writer (``python -m cogvid_core make-checkpoints``, cogvid_core.model.testing)
in a child process, once: a folder that already has its model_index.json is reused. The child keeps
the writer's tens of GB out of the bench process, whose host memory the benches measure.
(bench_estimate writes its own single-file layout: estimate_grid.write_checkpoints.)
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.common.provenance import REPO, log


def hf_checkpoints(root: Path | str, variant_key: str, *, full: bool, layers: int | None = None,
                   trained_size: bool = False, dtype: str | None = None, cwd: Path | str = REPO) -> Path:
    """``root/<variant folder>`` with random weights: full-size (``full``; bf16) or tiny (fp32), ``layers``
    transformer and T5 blocks at full widths, tiny widths at the real sample sizes (``trained_size``).
    ``cwd``: the tree whose cogvid_core writes them (the pack under test)."""
    from cogvid_core.model.variants import VARIANTS     # data only: no torch in the caller's process
    folder = Path(root) / VARIANTS[variant_key].folder
    if (folder / "model_index.json").exists():
        return folder
    cmd = [sys.executable, "-m", "cogvid_core", "make-checkpoints", str(root), "--variant", variant_key,
           "--layouts", "hf"]
    cmd += ["--full"] if full else []
    cmd += ["--layers", str(layers)] if layers else []
    cmd += ["--trained-size"] if trained_size else []
    cmd += ["--dtype", dtype] if dtype else []
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=str(cwd), check=True, stdout=subprocess.DEVNULL)
    log(f"wrote {folder} in {time.perf_counter() - t0:.0f} s: {shlex.join(cmd)}")
    return folder


TIME_EMBEDDING_BIAS = "time_embedding.linear_2.bias"
_SHIFT_MARK = "time_embedding_shift.txt"


def shift_time_embedding(folder: Path | str, shift: float) -> float:
    """Make the transformer's time-embedding output bias ``shift`` above the written random value, in its
    safetensors file (a streamed model reads it there), for TeaCache's mechanism rows: random weights'
    embedding changes by ~60 % a step, far outside the range the authors' polynomials are fitted to. The
    applied shift is kept in ``transformer/time_embedding_shift.txt``, so a second call only adds the
    difference. Returns the shift added now."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    tdir = Path(folder) / "transformer"
    mark = tdir / _SHIFT_MARK
    done = float(mark.read_text()) if mark.exists() else 0.0
    delta = shift - done
    if delta == 0:
        return 0.0
    index = tdir / "diffusion_pytorch_model.safetensors.index.json"
    name = (json.loads(index.read_text())["weight_map"][TIME_EMBEDDING_BIAS] if index.exists()
            else "diffusion_pytorch_model.safetensors")
    path = tdir / name
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors[TIME_EMBEDDING_BIAS] += delta
    save_file(tensors, str(path), metadata=metadata)
    mark.write_text(repr(shift))
    log(f"time embedding bias shifted by {delta:g} in {path} (now {shift:g} over the written values)")
    return delta
