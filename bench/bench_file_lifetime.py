"""GPU check of issue 30 item 6: a file-backed model dropped WITHOUT release() (what ComfyUI does with a
cached loader output it replaces) leaves nothing behind: no open descriptor on its safetensors files, no
page-locked (cudaHostRegister) staging buffer, no device memory.

Per placement mode (resident, offload, stream) and round: load the transformer file-backed, place it on
the GPU, run one forward (stream: blocks prefetched on the side stream), drop it in the middle of the use
(no offload, no release), ``gc.collect()``. Reported per mode after ``--rounds`` rounds: descriptors open
on the file (from /proc/self/fd), ``fileread.registered_bytes()``, torch allocated bytes against the
value before the first round; a second row per mode ends each use with release() as the baseline.
Nothing here runs diffusers' reference: the check is about what our placements leave, not a speed.

    python bench/bench_file_lifetime.py --out bench/file_lifetime_h100.json       # on the GPU
    python bench/bench_file_lifetime.py --device cpu                             # the same path on CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cogvid_core.memory import placement as P  # noqa: E402
from cogvid_core.memory.fileread import registered_bytes  # noqa: E402
from cogvid_core.model import loading as L  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.model.testing import write_checkpoints  # noqa: E402


def open_on(path) -> int:
    want, n = os.path.realpath(path), 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == want
        except OSError:
            pass
    return n


def _inputs(tr, device) -> dict:
    """One CFG branch of a 17-frame 64x96 1.5 video (4 latent frames of 8x12), in bf16 on ``device``."""
    cfg, g = tr.config, torch.Generator().manual_seed(1)
    frames, h, w = 4, 8, 12
    tokens = (frames // (cfg.patch_size_t or 1)) * (h // cfg.patch_size) * (w // cfg.patch_size)
    angle = torch.rand(tokens, cfg.attention_head_dim, generator=g) * 6.0
    kw = dict(hidden_states=torch.randn(1, frames, cfg.in_channels, h, w, generator=g),
              encoder_hidden_states=torch.randn(1, M.MAX_TEXT_TOKENS, cfg.text_embed_dim, generator=g),
              timestep=torch.full((1,), 500), image_rotary_emb=(angle.cos(), angle.sin()),
              ofs=torch.full((1,), 2.0), return_dict=False)
    return {k: _to(v, device) for k, v in kw.items()}


def _to(v, device):
    """An input on ``device``: floating tensors in bf16, the rotary (cos, sin) pair in fp32 as diffusers has it."""
    if isinstance(v, tuple):
        return tuple(t.to(device) for t in v)
    if not torch.is_tensor(v):
        return v
    return v.to(device, torch.bfloat16) if v.is_floating_point() else v.to(device)


def _leftovers(path, device, alloc0: int) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return dict(open=open_on(path), registered=registered_bytes(), allocated_delta=alloc - alloc0)


def one_mode(path, device, mode: str, rounds: int, release: bool, settle_s: float) -> dict:
    gc.collect()
    alloc0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    held = []
    for _ in range(rounds):
        lazy = L.load_transformer(path, dtype=torch.bfloat16, progress=False)[0]
        placed = P.place(lazy, device, mode, degrade_on_cpu=False)
        placed.acquire()
        kw = _inputs(lazy, device)
        with torch.no_grad():
            lazy(**kw)
        held.append(open_on(path))
        if release:
            placed.release()
        del lazy, placed, kw
        gc.collect()
    now = _leftovers(path, device, alloc0)
    # a prefetch read in flight when the model was dropped holds its reader until the read ends: what is
    # left once such reads had time to finish (and the collector ran again) is what would leak
    time.sleep(settle_s)
    gc.collect()
    later = _leftovers(path, device, alloc0)
    row = dict(mode=mode, release=release, rounds=rounds, open_while_held=held, open_after=now["open"],
               registered_after=now["registered"], allocated_delta=now["allocated_delta"], settle_s=settle_s,
               open_settled=later["open"], registered_settled=later["registered"],
               allocated_delta_settled=later["allocated_delta"])
    row["ok"] = row["open_settled"] == 0 and row["registered_settled"] == 0 and row["allocated_delta_settled"] == 0
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks at full width (~0.27 GB each)")
    ap.add_argument("--settle-s", type=float, default=1.0, help="wait before the second reading (in-flight reads)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    root = Path(tempfile.mkdtemp(prefix="cogvid_files_"))
    path = write_checkpoints(root, M.V15.key, tiny=tiny, dtype=torch.bfloat16, layouts=("single",),
                             layers=None if tiny else args.layers)["single"]["transformer"]
    # warm-up: the first forward on a device allocates what lives for the process (cuBLAS workspace)
    one_mode(path, device, "resident", 1, True, 0.0)
    rows = [one_mode(path, device, mode, args.rounds, release, args.settle_s)
            for mode in ("resident", "offload", "stream") for release in (False, True)]
    print(f"{'mode':9} {'release':8} {'open while held':16} {'after gc: open / pinned / alloc delta':40} "
          f"{'after ' + str(args.settle_s) + ' s':30} ok")
    for r in rows:
        now = f"{r['open_after']} / {r['registered_after']} / {r['allocated_delta']}"
        later = f"{r['open_settled']} / {r['registered_settled']} / {r['allocated_delta_settled']}"
        print(f"{r['mode']:9} {str(r['release']):8} {str(r['open_while_held']):16} {now:40} {later:30} {r['ok']}")
    result = dict(command=" ".join([sys.executable, *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, layers=None if tiny else args.layers, rows=rows,
                  ok=all(r["ok"] for r in rows))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print("ALL OK" if result["ok"] else "SOME CHECKS FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
