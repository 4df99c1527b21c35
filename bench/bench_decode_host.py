"""Host memory of the decode's assembly on the host, at full size, on the CPU (no GPU needed: what is
measured is host memory; the VAE's decoder is replaced by random tiles of the real shapes).

Each case runs in its own process; peak RSS from the kernel (VmHWM, reset at the start) minus the RSS
before the case, so only what the case allocates counts:
* ``whole``: the video as one bf16 tensor widened to float32 frames in one expression (what decode did
  before this change, after diffusers' tiled decode brought the whole video to the host);
* ``rows``:  vae._decode_tiles_to_frames: tiles to the host one by one, each finished row of tiles blended
  and written into preallocated float32 frames.
    python3 bench/bench_decode_host.py                 # 1.5 at 81x768x1360, 360x240 and 240x160 tiles
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common.provenance import provenance, write_json  # noqa: E402

GiB = 2 ** 30


def case(kind: str, frames: int, height: int, width: int, tile: str) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from diffusers.models.autoencoders.vae import DecoderOutput

    from cogvid_core.device import devmem
    from cogvid_core.model import vae as V
    from cogvid_core.model.variants import SPATIAL_COMPRESSION as S, TEMPORAL_COMPRESSION, V15, latent_frames, vae_config
    from cogvid_core.memory.profiles import TileSpec

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**vae_config(V15, False))
    tw, th = (int(x) for x in tile.split("x"))
    V.set_tiling(vae, TileSpec(height=th, width=tw, overlap=0.2))
    lf = latent_frames(V15, frames)[0] - latent_frames(V15, frames)[1]   # the decoded latents (padding dropped)
    z = torch.zeros(1, 16, lf, height // S, width // S, dtype=torch.bfloat16)
    out_frames = 1 + TEMPORAL_COMPRESSION * (lf - 1)

    def fake_decode(zt, *a, **k):   # the decoder's output shape for this latent tile
        sample = torch.rand(1, 3, out_frames, S * zt.shape[3], S * zt.shape[4]).to(torch.bfloat16)
        return DecoderOutput(sample=sample)
    vae.decode = fake_decode
    before = devmem.host_rss_bytes()
    devmem.reset_host_peak()
    with torch.inference_mode():
        if kind == "whole":
            video = fake_decode(z).sample
            frames_ = (video[0].permute(1, 2, 3, 0).float() * 0.5 + 0.5).clamp_(0, 1)
        else:
            frames_ = V._decode_tiles_to_frames(vae, z)
    peak = devmem.host_peak_rss_bytes()
    return dict(kind=kind, tile=tile, frames=list(frames_.shape), peak_over_start_gib=(peak - before) / GiB,
                frames_gib=frames_.numel() * 4 / GiB)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=1360)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:
        kind, tile = a.case.split(":")
        print(json.dumps(case(kind, a.frames, a.height, a.width, tile)))
        return 0
    rows = []
    for spec in ("whole:360x240", "rows:360x240", "rows:240x160"):
        out = subprocess.run([sys.executable, __file__, "--case", spec, "--frames", str(a.frames), "--height",
                              str(a.height), "--width", str(a.width)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"| case ({a.frames}x{a.height}x{a.width}) | tile | host peak over start GiB | of which the float32 frames |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['tile']} | {r['peak_over_start_gib']:.2f} | {r['frames_gib']:.2f} |")
    if a.json:
        import platform
        doc = dict(provenance(platform.processor() or platform.machine()),
                   machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU only: host memory)",
                   rows=rows)
        write_json(a.json, doc, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
