"""The start image's encode three ways: diffusers' untiled encode, diffusers' tiled encode (what lowvram ran
before issue 30: blended tiles, a different latent), and the strip encode (model/vae_strips.py: the untiled
latent, computed in strips of rows), at the shipped sizes.

Full-size VAE with random weights built on the GPU (shapes set memory and time, not values), bf16, a random
start image. Per variant and mode: peak allocated and reserved (GiB, the weights included; "act." is peak
allocated minus the weights), median seconds of ``--repeats`` encodes after one warm-up, and the latent
mean's distance from the untiled one (max abs and relative L2: the tiled encode's is the blend, the strip
encode's is bf16 rounding order). Strip budgets: ``--strip-mib`` (the engine's default is 64).

    python3 bench/bench_encode_exact.py --json bench/encode_exact_h100.json          # GPU, ~1 min
    python3 bench/bench_encode_exact.py --tiny --device cpu --repeats 1               # the code path, CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2 ** 30
SIZES = {"cogvideox1.5-5b-i2v": (768, 1360), "cogvideox-5b-i2v": (480, 720)}
TILE = (240, 360, 0.2)       # the profiles' tile (lowvram's encode tile before the strip encode)


def _image(height: int, width: int):
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(7)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))


def _measure(run, device, repeats: int) -> dict:
    """Peak allocated / reserved over the first (warm-up) call, then the median seconds of ``repeats``."""
    import torch
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = run()
    peak = (torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB) if cuda else (None, None)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return dict(latent=out, peak_alloc_gib=peak[0], peak_reserved_gib=peak[1],
                seconds=statistics.median(times) if times else None)


def bench_variant(key: str, args, device, dtype) -> list[dict]:
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from cogvid_core.model import vae as V
    from cogvid_core.model.tiles import TileSpec
    from cogvid_core.model.variants import VARIANTS, vae_config

    variant = VARIANTS[key]
    height, width = (128, 208) if args.tiny else SIZES[key]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKLCogVideoX(**vae_config(variant, args.tiny)).to(dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    image = _image(height, width)
    tile = TileSpec(64, 96, 0.2) if args.tiny else TileSpec(*TILE)
    modes = {"untiled (diffusers)": dict(),
             f"tiled {tile.width}x{tile.height} (diffusers)": dict(tile=tile)}
    modes.update({f"strips {mib} MiB": dict(strips=True, strip_bytes=int(mib * 2 ** 20)) for mib in args.strip_mib})
    rows, ref = [], None
    for name, kw in modes.items():
        m = _measure(lambda: V.encode_image(model, image, height, width, variant, device=device, **kw).mean,
                     device, args.repeats)
        lat = m.pop("latent").float()
        ref = lat if ref is None else ref
        rows.append(dict(variant=key, height=height, width=width, mode=name, weights_gib=weights, **m,
                         max_abs_vs_untiled=(lat - ref).abs().max().item(),
                         rel_l2_vs_untiled=((lat - ref).norm() / ref.norm()).item()))
        print(json.dumps(rows[-1]), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    g = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
    lines = ["| variant | size | mode | peak alloc GiB | act. GiB | peak reserved GiB | s | x untiled s | "
             "max abs vs untiled | rel L2 vs untiled |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        base.setdefault(r["variant"], r["seconds"])
        act = None if r["peak_alloc_gib"] is None else r["peak_alloc_gib"] - r["weights_gib"]
        ratio = r["seconds"] / base[r["variant"]] if r["seconds"] and base[r["variant"]] else None
        lines.append(f"| {r['variant']} | {r['width']}x{r['height']} | {r['mode']} | {g(r['peak_alloc_gib'])} | "
                     f"{g(act)} | {g(r['peak_reserved_gib'])} | {g(r['seconds'], '{:.3f}')} | {g(ratio, '{:.2f}')} | "
                     f"{r['max_abs_vs_untiled']:.2e} | {r['rel_l2_vs_untiled']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch
    import diffusers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny VAE at 208x128, fp32 (the code path on a CPU)")
    p.add_argument("--variants", default=",".join(SIZES))
    p.add_argument("--strip-mib", default="16,64,256", help="strip budgets to measure, MiB, comma separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.strip_mib = [float(x) for x in args.strip_mib.split(",") if x]
    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    rows = []
    for key in args.variants.split(","):
        rows += bench_variant(key, args, device, dtype)
    text = table(rows)
    print(f"\nstart-image encode, {'fp32 tiny' if args.tiny else 'bf16 full-size'} VAE, {device}\n\n{text}")
    if args.json:
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        backend = torch.cuda.get_allocator_backend() if device.type == "cuda" else None
        args.json.write_text(json.dumps(dict(
            command=" ".join([sys.executable, *sys.argv]), card=card, allocator=backend,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__, diffusers=diffusers.__version__, rows=rows, table=text), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
