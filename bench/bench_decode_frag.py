"""The tiled decode's GPU pool over its allocated peak, and what releasing cached blocks costs.

The 12 GB workflow's decode (1.5 at 81x768x1360, 360x240 tiles) peaked at 4.10 GiB allocated but
5.51 GiB reserved on the command line (expandable segments), and its reserved peak is the node path's
NVML peak. Full-size VAE with random weights (shapes set memory and time, not values), random latents
of the denoiser's output shape, one process per allocator setting; per variant (``release`` of
vae.decode: none, after every decoder call, after every tile) peak allocated / reserved and seconds.

    python3 bench/bench_decode_frag.py --variants none,call --json f.json  # GPU, both allocators, ~2 min
    python3 bench/bench_decode_frag.py --tiny --device cpu                # the code path, CPU
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

GiB = 2 ** 30
ALLOCATORS = {"expandable (CLI)": "expandable_segments:True", "cudaMallocAsync (ComfyUI)": "backend:cudaMallocAsync"}


def child(args) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogvid_core import vae as V
    from cogvid_core.models import SPATIAL_COMPRESSION as S, V15, latent_frames, vae_config
    from cogvid_core.profiles import TileSpec

    device, dtype = torch.device(args.device), (torch.float32 if args.tiny else torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKLCogVideoX(**vae_config(V15, args.tiny)).to(dtype).eval()
    def latents(frames):
        lf = latent_frames(V15, frames)[0] - latent_frames(V15, frames)[1]
        z = torch.randn(1, lf, 16, args.height // S, args.width // S, device=device, dtype=dtype)
        return V.VideoLatents(samples=z, frames=frames, height=args.height, width=args.width,
                              variant_key=V15.key, fps=16, drop_first=0)
    tw, th = (int(x) for x in args.tile.split("x"))
    tile = TileSpec(height=th, width=tw, overlap=1 / 6)
    cuda = device.type == "cuda"
    V.decode(model, latents(9), device=device, tile=tile)     # warm-up (kernels, cuDNN), not reported
    lat = latents(args.frames)
    rows = []
    for variant in args.variants.split(","):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        V.decode(model, lat, device=device, tile=tile, release=None if variant == "none" else variant)
        if cuda:
            torch.cuda.synchronize()
        rows.append(dict(release=variant, seconds=time.perf_counter() - t,
                         peak_alloc=(torch.cuda.max_memory_allocated() - base) / GiB if cuda else None,
                         peak_reserved=torch.cuda.max_memory_reserved() / GiB if cuda else None))
    return dict(backend=torch.cuda.get_allocator_backend() if cuda else "cpu", rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--tile", default=None, help="WxH pixels (default 360x240; tiny 64x64)")
    p.add_argument("--variants", default="none,call,tile", help="release variants, the first is the reference")
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
    results = {}
    for name, conf in (ALLOCATORS.items() if args.device != "cpu" else [("cpu", "")]):
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf) if conf else dict(os.environ)
        cmd = [sys.executable, __file__, "--child", "--device", args.device, "--frames", str(args.frames),
               "--height", str(args.height), "--width", str(args.width), "--tile", args.tile, "--variants", args.variants] + \
            (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            return out.returncode
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        if args.json:     # after each allocator: a run cut by a time limit keeps what it measured
            args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                                 command=" ".join(sys.argv), results=results), indent=1))
    print(f"\n1.5 decode, {args.frames}x{args.height}x{args.width}, tiles {args.tile}\n")
    print("| allocator | release | s | x none | peak alloc GiB | peak reserved GiB | reserved - alloc GiB |")
    print("|---|---|---|---|---|---|---|")
    g = lambda v: "-" if v is None else f"{v:.2f}"
    for name, r in results.items():
        ref = r["rows"][0]["seconds"]
        for row in r["rows"]:
            gap = None if row["peak_reserved"] is None else row["peak_reserved"] - row["peak_alloc"]
            print(f"| {name} | {row['release']} | {row['seconds']:.1f} | {row['seconds'] / ref:.3f} | "
                  f"{g(row['peak_alloc'])} | {g(row['peak_reserved'])} | {g(gap)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
