"""The tiled decode's GPU pool over its allocated peak: where it comes from and what lowers it.

The 12 GB workflow's decode (1.5 at 81x768x1360, 360x240 tiles) allocates 4.10 GiB at its peak but its
pool reaches 5.4-6.0 GiB (both allocators), and that pool is the node path's NVML peak. Full-size VAE with
random weights (shapes set memory and time, not values), random latents of the denoiser's output shape.
One process per config (allocator, cuDNN's conv workspace cap ``CUDNN_CONV_WSCAP_DBG`` in MiB); in each,
per release variant peak allocated / reserved and seconds of the whole tiled decode: ``none`` (no release at
all), ``engine`` (what vae.decode does by itself: since this bench, it trims cudaMallocAsync's pool before
each decoder block), ``blocks`` (the cache emptied before each decoder block whatever the allocator). ``--snapshot``: the first config also records one tile's
allocations (torch.cuda.memory history) and writes the largest ones and the live blocks at the pool's
peak, with the code that allocated them.

    python3 bench/bench_decode_mem.py --snapshot snap.json --json f.json   # GPU, ~3 min
    python3 bench/bench_decode_mem.py --tiny --device cpu                   # the code path, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common.provenance import provenance, write_json  # noqa: E402

GiB = 2 ** 30
EXPANDABLE, ASYNC = "expandable_segments:True", "backend:cudaMallocAsync"
CONFIGS = {
    "expandable (CLI)": {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE},
    "expandable, wscap 256": {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE, "CUDNN_CONV_WSCAP_DBG": "256"},
    "expandable, wscap 1024": {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE, "CUDNN_CONV_WSCAP_DBG": "1024"},
    "async (ComfyUI)": {"PYTORCH_CUDA_ALLOC_CONF": ASYNC},
    "async, wscap 256": {"PYTORCH_CUDA_ALLOC_CONF": ASYNC, "CUDNN_CONV_WSCAP_DBG": "256"},
}


def _where(frames) -> str:
    """The innermost frame in diffusers or torch.nn (the op that allocated), else the innermost one."""
    for f in frames:
        name = f.get("filename", "")
        if "diffusers" in name or "torch/nn" in name:
            return f"{name.rsplit('/', 2)[-1]}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename', '?').rsplit('/', 1)[-1]}:{frames[0].get('line')}" if frames else "?"


def summarize(snapshot: dict) -> dict:
    """The largest allocations, and at the pool's peak the live blocks and the events that grew it."""
    events = [e for trace in snapshot["device_traces"] for e in trace]
    live, alloc, pool, best, at_peak = {}, 0, 0, (0, None, None), []
    grows = {"segment_alloc", "segment_map"}
    shrinks = {"segment_free", "segment_unmap"}
    for i, e in enumerate(events):
        a = e["action"]
        if a == "alloc":
            live[e["addr"]] = e
            alloc += e["size"]
        elif a == "free_requested" and e["addr"] in live:
            alloc -= live.pop(e["addr"])["size"]
        elif a in grows:
            pool += e["size"]
            if pool > best[0]:
                best, at_peak = (pool, alloc, i), list(live.values())
        elif a in shrinks:
            pool -= e["size"]
    peak_pool, alloc_at, idx = best
    top = sorted((e for e in events if e["action"] == "alloc"), key=lambda e: -e["size"])[:25]
    at_peak = sorted(at_peak, key=lambda e: -e["size"])[:25]
    recent = events[max(0, (idx or 0) - 40):(idx or 0) + 1]
    row = lambda e: dict(action=e["action"], mib=round(e["size"] / 2 ** 20, 1), where=_where(e.get("frames", [])))
    return dict(pool_peak_gib=peak_pool / GiB, allocated_at_pool_peak_gib=alloc_at / GiB if alloc_at else None,
                largest=[row(e) for e in top], live_at_pool_peak=[row(e) for e in at_peak],
                events_before_pool_peak=[row(e) for e in recent])


def child(args) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogvid_core.model import vae as V
    from cogvid_core.model.variants import SPATIAL_COMPRESSION as S, V15, latent_frames, vae_config
    from cogvid_core.memory.profiles import TileSpec

    device, dtype = torch.device(args.device), (torch.float32 if args.tiny else torch.bfloat16)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKLCogVideoX(**vae_config(V15, args.tiny)).to(dtype).eval()

    def latents(frames, height, width):
        lf = latent_frames(V15, frames)[0] - latent_frames(V15, frames)[1]
        z = torch.randn(1, lf, 16, height // S, width // S, device=device, dtype=dtype)
        return V.VideoLatents(samples=z, frames=frames, height=height, width=width,
                              variant_key=V15.key, fps=16, drop_first=0)
    tw, th = (int(x) for x in args.tile.split("x"))
    tile = TileSpec(height=th, width=tw, overlap=1 / 6)
    V.decode(model, latents(9, args.height, args.width), device=device, tile=tile)     # warm-up, not reported
    lat = latents(args.frames, args.height, args.width)
    rows = []
    engine_trim = V.devmem.pool_keeps_freed
    for variant in args.release.split(","):
        V.devmem.pool_keeps_freed = engine_trim if variant == "engine" else (lambda device: False)
        hooks = V.empty_cache_before_blocks(model) if cuda and variant == "blocks" else []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        V.decode(model, lat, device=device, tile=tile)
        if cuda:
            torch.cuda.synchronize()
        for h in hooks:
            h.remove()
        rows.append(dict(release=variant, seconds=time.perf_counter() - t,
                         peak_alloc=torch.cuda.max_memory_allocated() / GiB if cuda else None,
                         peak_reserved=torch.cuda.max_memory_reserved() / GiB if cuda else None))
    V.devmem.pool_keeps_freed = engine_trim
    out = dict(backend=torch.cuda.get_allocator_backend() if cuda else "cpu", rows=rows,
               card=torch.cuda.get_device_name(device) if cuda else "cpu")
    if args.snapshot and cuda:      # one tile, untiled decode of exactly the tile's size
        one = latents(args.frames, th, tw)
        torch.cuda.empty_cache()
        torch.cuda.memory._record_memory_history(max_entries=400000)
        V.decode(model, one, device=device, tile=None)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        try:
            out["snapshot"] = summarize(snap)
        except Exception as e:      # the measurements above are kept either way
            out["snapshot"] = dict(error=repr(e))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--tile", default=None, help="WxH pixels (default 360x240; tiny 64x64)")
    p.add_argument("--configs", default=";".join(CONFIGS), help="names of CONFIGS, separated by ;")
    p.add_argument("--release", default="none,engine,blocks", help="release variants, the first is the reference")
    p.add_argument("--snapshot", type=Path, help="the first config's one-tile allocation summary (JSON)")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.frames = args.frames or (9 if args.tiny else 81)
    args.height = args.height or (128 if args.tiny else 768)
    args.width = args.width or (160 if args.tiny else 1360)
    args.tile = args.tile or ("64x64" if args.tiny else "360x240")
    if args.child:
        print(json.dumps(child(args)))
        return 0
    configs = [c for c in args.configs.split(";") if c] if args.device != "cpu" else ["cpu"]
    results = {}
    for n, name in enumerate(configs):
        env = dict(os.environ, **CONFIGS.get(name, {}))
        cmd = [sys.executable, __file__, "--child", "--device", args.device, "--frames", str(args.frames),
               "--height", str(args.height), "--width", str(args.width), "--tile", args.tile,
               "--release", args.release] + (["--tiny"] if args.tiny else []) + \
            (["--snapshot", str(args.snapshot)] if args.snapshot and n == 0 else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-3000:]}")
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        snap = results[name].pop("snapshot", None)
        if snap and args.snapshot:
            args.snapshot.write_text(json.dumps(snap, indent=1))
        if args.json:     # after each config: a run cut by a time limit keeps what it measured
            write_json(args.json, dict(args={k: str(v) for k, v in vars(args).items()},
                                       **provenance(results[name]["card"]), results=results))
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n1.5 decode, {args.frames}x{args.height}x{args.width}, tiles {args.tile}\n")
    print("| config | release | s | x first | peak alloc GiB | peak reserved GiB | reserved - alloc GiB |")
    print("|---|---|---|---|---|---|---|")
    g = lambda v: "-" if v is None else f"{v:.2f}"
    ref = None
    for name, r in results.items():
        for row in r["rows"]:
            ref = ref or row["seconds"]
            gap = None if row["peak_reserved"] is None else row["peak_reserved"] - row["peak_alloc"]
            print(f"| {name} | {row['release']} | {row['seconds']:.1f} | {row['seconds'] / ref:.3f} | "
                  f"{g(row['peak_alloc'])} | {g(row['peak_reserved'])} | {g(gap)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
