"""Fit the live preview's latent-to-RGB table from a CogVideoX VAE: least squares from the sampler's latents
to the RGB the VAE decodes from them, to replace the table in cogvid_core/model/latent_rgb.py.

    python3 bench/fit_latent_rgb.py --vae models/CogVideo/CogVideoX1.5-5B-I2V --videos a.mp4 b.mp4 --device cuda
    python3 bench/fit_latent_rgb.py --vae THUDM/CogVideoX1.5-5B-I2V --images photo1.png photo2.jpg
    python3 bench/fit_latent_rgb.py --tiny --device cpu          # a tiny random VAE: the code path

Each clip (the first --frames frames of a video, or an image held still) is resized to --width x --height and
encoded (posterior mean) times the VAE's scaling factor: the latent the sampler denoises. Those latents
are decoded, the decoded RGB averaged over each latent pixel's footprint (8x8 pixels; frame 0, then 4
frames per latent frame), and [latent, 1] -> RGB solved by least squares over every latent pixel of every
clip. Prints the table (paste it over RGB_FACTORS / RGB_BIAS), its RMS error and the shipped table's on
the same data, and writes JSON. Varied footage (colours, light, skin, sky, foliage) gives a table that
holds for other videos; one clip fits that clip.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvid_core.model import latent_rgb, loading  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from bench.common.provenance import card_name, provenance, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", help="a CogVideoX VAE: hub folder, its vae/ folder, a single file or a repo id")
    p.add_argument("--videos", nargs="*", default=[], help="video files (read with imageio-ffmpeg)")
    p.add_argument("--images", nargs="*", default=[], help="still images, each held for --frames frames")
    p.add_argument("--tiny", action="store_true", help="a tiny random VAE and a synthetic clip (CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=9, help="frames per clip, 4N+1")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--out", type=Path, help="JSON (default $OUT/latent_rgb_fit.json, else bench/latent_rgb_fit.json)")
    return p.parse_args(argv)


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [T, 3, height, width] in -1..1 (bilinear, no crop)."""
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
    return torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True)


def clips(args):
    """Each clip as [T, 3, H, W] in -1..1."""
    import numpy as np
    from PIL import Image
    for path in args.videos:
        import imageio_ffmpeg
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for _, f in zip(range(args.frames), reader)]
        reader.close()
        if len(frames) < args.frames:
            raise SystemExit(f"{path}: {len(frames)} frames, --frames is {args.frames}")
        yield _resize(torch.from_numpy(np.stack(frames)), args.height, args.width)
    for path in args.images:
        still = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")))
        yield _resize(still[None], args.height, args.width).expand(args.frames, -1, -1, -1)
    if args.tiny:
        g = torch.Generator().manual_seed(0)
        blobs = torch.rand(args.frames, 3, 4, 6, generator=g) * 2 - 1
        yield torch.nn.functional.interpolate(blobs, size=(args.height, args.width), mode="bilinear")


def latents_and_rgb(vae, clip: torch.Tensor):
    """The clip's sampler latents [F, C, h, w] and the decoded RGB on the latent grid [F, 3, h, w]."""
    p = next(vae.parameters())
    with torch.inference_mode():
        x = clip.permute(1, 0, 2, 3)[None].to(p.device, p.dtype)                     # [1, 3, T, H, W]
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor               # [1, C, F, h, w]
        video = vae.decode(z / vae.config.scaling_factor).sample[0].permute(1, 0, 2, 3)   # [T, 3, H, W]
    z = z[0].permute(1, 0, 2, 3).float().cpu()
    return z, latent_rgb.latent_grid(video.float().clamp(-1, 1).cpu(), z.shape[0])


def _rms(latents, rgb, factors, bias) -> float:
    pred = torch.stack([latent_rgb.project(f.double(), factors, bias) for f in latents])   # [F, h, w, 3]
    return (pred - rgb.double().permute(0, 2, 3, 1)).pow(2).mean().sqrt().item()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.tiny:
        from cogvid_core.model import testing
        vae = testing.build_random("vae", M.V15, True, torch.float32, device)
        args.height, args.width = min(args.height, 64), min(args.width, 96)
    elif args.vae:
        vae = loading.load_vae(args.vae, dtype=dtype, device=device)
        vae.enable_tiling()
    else:
        raise SystemExit("--vae (with --videos / --images) or --tiny")
    pairs = [latents_and_rgb(vae, c) for c in clips(args)]
    if not pairs:
        raise SystemExit("no clips: give --videos and/or --images")
    latents, rgb = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    factors, bias, rms = latent_rgb.fit(latents, rgb)
    shipped = _rms(latents, rgb, latent_rgb.RGB_FACTORS, latent_rgb.RGB_BIAS)
    doc = dict(provenance(card_name(device)), vae=args.vae, videos=args.videos, images=args.images, tiny=args.tiny,
               size=[args.frames, args.height, args.width], latent_pixels=latents.numel() // latents.shape[1],
               factors=factors, bias=bias, rms=rms, shipped_rms=shipped, shipped_source=latent_rgb.SOURCE)
    out = args.out or (Path(os.environ["OUT"]) / "latent_rgb_fit.json" if os.environ.get("OUT")
                       else Path(__file__).with_name("latent_rgb_fit.json"))
    write_json(out, doc)
    print("RGB_FACTORS = (")
    for row in factors:
        print("    (" + ", ".join(f"{v:+.4f}" for v in row) + "),")
    print(")\nRGB_BIAS = (" + ", ".join(f"{v:.4f}" for v in bias) + ")")
    print(f"\nRMS error (RGB in -1..1) over {doc['latent_pixels']} latent pixels: fitted {rms:.4f}, "
          f"shipped table {shipped:.4f}\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
