"""What a live preview costs per sampling step, against a step of the CogVideoX1.5-5B-I2V transformer.

    python3 bench/bench_preview.py                        # GPU: parts on the 81x768x1360 latent + 3 steps with/without
    python3 bench/bench_preview.py --step-seconds 8.1     # GPU: the parts only, against a step time you have
    python3 bench/bench_preview.py --tiny --device cpu    # the code path on a CPU, seconds

The Sampler's preview (nodes/preview.py) is, per step: the middle latent frame of the step's predicted clean
latents (a view), ComfyUI's latent2rgb on it (16 -> 3 linear on the device, then clamp and uint8 as core's
``preview_to_image``), the copy to the host into a PIL image (on the sampling thread), then what ComfyUI's
server does with it (``ImageOps.contain`` to 512 and a JPEG at quality 95, on its event loop thread). The
parts are timed on a random x0 of the full video's shape [1, 21, 16, 96, 170] (synchronised around each
part: the preview's own work, not the step's tail it would otherwise wait for; the engine's NaN check
already waits for that). ``--measure-step``: ``--steps`` real steps of a random full-size 1.5 transformer
(bf16, the project's loop, 50-step DPM schedule, CFG 6 batched), without then with the preview callback
doing all the parts inline; s/step is the median of the steps after the first. The goal: total <= 1 %.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvid_core.model import latent_rgb, loading  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.run import sampling  # noqa: E402
from bench.common.provenance import card_name, default_out, provenance, write_json  # noqa: E402
from bench.common.tables import fmt  # noqa: E402

FULL = (81, 768, 1360)
PARTS = ("frame", "project", "to_host", "encode")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random transformer and video for --measure-step")
    p.add_argument("--repeats", type=int, default=50, help="timed previews of the synthetic latent (median)")
    p.add_argument("--step-seconds", type=float, help="a step's seconds to compare with (skips --measure-step)")
    p.add_argument("--measure-step", action=argparse.BooleanOptionalAction, default=None,
                   help="time real steps without and with the preview (default: on unless --step-seconds)")
    p.add_argument("--steps", type=int, default=3, help="steps per --measure-step run (the first is warm-up)")
    p.add_argument("--cfg-mode", default="batched", choices=("batched", "sequential"))
    p.add_argument("--out", type=Path, help="JSON file (default $OUT/preview.json, else bench/preview_local.json)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TABLE: dict = {}


def _table(device, dtype):
    """The projection's factors and bias as tensors, made once per device and dtype (core's previewer
    keeps them on the device after its first preview)."""
    key = (str(device), dtype)
    if key not in _TABLE:
        _TABLE[key] = tuple(torch.tensor(t, device=device, dtype=dtype) for t in (latent_rgb.RGB_FACTORS,
                                                                                  latent_rgb.RGB_BIAS))
    return _TABLE[key]


def preview_parts(x0: torch.Tensor, skip: int = 1) -> tuple[dict, bytes]:
    """One preview of ``x0`` [1, F, 16, h, w], timed part by part; seconds per part and the JPEG."""
    from PIL import Image, ImageOps
    t, dev = {}, x0.device
    factors, bias = _table(dev, x0.dtype)
    _sync(dev)
    t0 = time.perf_counter()
    frame = sampling.preview_frame(x0, skip)
    t["frame"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rgb = latent_rgb.project(frame, factors, bias)
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8)
    _sync(dev)
    t["project"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = Image.fromarray(pixels.cpu().numpy())
    t["to_host"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = ImageOps.contain(image, (512, 512), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    t["encode"] = time.perf_counter() - t0
    return t, buf.getvalue()


def time_parts(device, repeats: int) -> dict:
    """Median seconds per part over ``repeats`` previews of a random x0 of the full 1.5 video."""
    n_lat, pad = M.latent_frames(M.V15, FULL[0])
    x0 = torch.randn(1, n_lat, M.LATENT_CHANNELS, FULL[1] // 8, FULL[2] // 8, device=device)
    preview_parts(x0, pad)                                              # warm-up: kernels, PIL, JPEG tables
    runs = [preview_parts(x0, pad) for _ in range(repeats)]
    med = {k: statistics.median(r[0][k] for r in runs) for k in PARTS}
    return dict(med, total=sum(med.values()), shape=list(x0.shape), jpeg_bytes=len(runs[-1][1]))


def measure_step(args, device) -> dict:
    """s/step of the project's loop on a random 1.5 transformer, without and with the preview inline."""
    from bench.bench_speed import Inputs
    inp = Inputs(argparse.Namespace(device=str(device), tiny=args.tiny, frames=None if args.tiny else FULL[0],
                                    height=None if args.tiny else FULL[1], width=None if args.tiny else FULL[2]))
    out = {"frames": inp.frames, "height": inp.height, "width": inp.width, "tokens": inp.tokens}
    pad = M.latent_frames(inp.variant, inp.frames)[1]
    for name, with_preview in (("without", False), ("with", True)):
        marks, previews = [], []
        sched = loading.load_scheduler(None, "dpm")
        gen = torch.Generator("cpu").manual_seed(42)
        latents = sampling.initial_noise(sched, 50, inp.noise_shape, gen, device, inp.dtype)
        sched.timesteps = sched.timesteps[:args.steps]
        den = sampling.Denoiser(inp.transformer, inp.positive, inp.negative, inp.rope, inp.ofs, cfg=6.0, steps=50,
                                dynamic_cfg=True, cfg_mode=args.cfg_mode)

        def progress(done, total):
            _sync(device)
            marks.append(time.perf_counter())
        preview = (lambda i, n, x0: previews.append(preview_parts(x0, pad)[0])) if with_preview else None
        marks.append(time.perf_counter())
        sampling.denoise(den, sched, latents, inp.start, gen, inp.dtype, progress, preview=preview)
        steps = [b - a for a, b in zip(marks, marks[1:])]
        out[name] = {"step_s": statistics.median(steps[1:] or steps), "steps_s": steps,
                     "preview_s": statistics.median(sum(p.values()) for p in previews) if previews else None}
    return out


def summary(parts: dict, step_s: float | None, steps: dict | None) -> list[tuple[str, str]]:
    rows = [(f"{k} (ms)", fmt(parts[k] * 1e3, ".3f")) for k in PARTS + ("total",)]
    rows.append(("step (s)", fmt(step_s, ".3f")))
    rows.append(("preview / step (%)", fmt(None if not step_s else 100 * parts["total"] / step_s, ".4f")))
    if steps:
        w, o = steps["with"]["step_s"], steps["without"]["step_s"]
        rows.append(("step with preview (s)", fmt(w, ".3f")))
        rows.append(("with / without - 1 (%)", fmt(100 * (w / o - 1), "+.3f")))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    parts = time_parts(device, args.repeats)
    measure = args.measure_step if args.measure_step is not None else args.step_seconds is None
    steps = measure_step(args, device) if measure else None
    step_s = args.step_seconds or (steps["without"]["step_s"] if steps else None)
    rows = summary(parts, step_s, steps)
    doc = dict(provenance(card_name(device)), device=str(device), repeats=args.repeats, parts=parts,
               step_s=step_s, step_source="given" if args.step_seconds else "measured" if steps else None,
               steps=steps, cfg_mode=args.cfg_mode, table=dict(rows))
    out = args.out or default_out("preview")
    write_json(out, doc)
    print(f"\n{doc['card']}, torch {doc['torch']}, preview of x0 {parts['shape']}, JPEG {parts['jpeg_bytes']} B")
    if steps:
        print(f"steps: {steps['frames']}x{steps['height']}x{steps['width']} ({steps['tokens']} video tokens), "
              f"CFG {args.cfg_mode}, {args.steps} steps per run")
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
