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
