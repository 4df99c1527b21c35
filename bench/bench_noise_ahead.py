"""What a step costs when the transformer pass is skipped (a step cache's skip): the DPM scheduler's step on
the full latent, its CPU noise drawn in the step (as diffusers does) or ahead on a thread
(cogvid_core/run/noise_ahead.py). Same draws either way: the final latents are compared bit for bit.

    python3 bench/bench_noise_ahead.py --device cuda --out $OUT/noise_ahead.json   # 1.5 at 81x768x1360
    python3 bench/bench_noise_ahead.py --device cpu --steps 10                     # this machine's CPU
    python3 bench/bench_noise_ahead.py --tiny --device cpu                         # smoke run

``--computed-every N --computed-s S``: every N-th step stands for a computed one: the main thread waits S
seconds before its scheduler step, as it waits for the GPU's transformer pass at the sampler's per-step sync
(TeaCache 0.2 on the H100 computed 26 of 50 steps at 4.8 s). The table gives the skipped steps' seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers.schedulers import CogVideoXDPMScheduler  # noqa: E402

from bench.common.provenance import card_name, provenance, write_json  # noqa: E402
from cogvid_core.run import noise_ahead as NA  # noqa: E402
from cogvid_core.run import sampling  # noqa: E402

FULL = (1, 22, 16, 96, 170)   # 1.5 at 81 x 768 x 1360: latent frames padded to 22, 16 channels, H/8, W/8
TINY = (1, 4, 16, 8, 12)


def run(shape, steps: int, device, dtype, ahead_on: bool, every: int = 0, computed_s: float = 0.0) -> tuple[list[float], torch.Tensor]:
    NA.MODE = "1" if ahead_on else "0"
    scheduler = CogVideoXDPMScheduler(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                      prediction_type="v_prediction", snr_shift_scale=1.0)
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(shape, generator=generator).to(device, dtype)
    pred = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1).to(device, torch.float32)
    step = sampling.scheduler_stepper(scheduler, generator)
    ahead = NA.noise_ahead(generator, device)
    times, old = [], None
    with torch.inference_mode(), NA.closing_ahead(ahead):
        for i in range(steps):
            computed = every > 0 and i % every == 0
            if computed:
                time.sleep(computed_s)
            t0 = time.perf_counter()
            with NA.in_step(ahead):
                latents, x0 = step(pred, old, i, latents)
            latents = latents.to(dtype)
            old = x0
            bool(torch.isfinite(latents).all())          # the sampler's per-step check: a sync, as in the run
            if not computed:
                times.append(time.perf_counter() - t0)
    counts = (ahead.served, ahead.direct) if ahead is not None else (0, None)   # off: nothing counts the draws
    return times, latents.float().cpu(), counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--computed-every", type=int, default=0, help="every N-th step waits --computed-s first")
    ap.add_argument("--computed-s", type=float, default=0.5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" and args.tiny else torch.bfloat16
    shape = TINY if args.tiny else FULL
    rows, finals, mode = [], {}, NA.MODE
    for on in (False, True, False, True):               # twice each, interleaved: the first pass warms up
        times, final, (served, direct) = run(shape, args.steps, device, dtype, on, args.computed_every, args.computed_s)
        later = sorted(times[1:])
        rows.append(dict(noise_ahead=on, median_step_s=later[len(later) // 2], mean_step_s=sum(later) / len(later),
                         draws_from_thread=served, draws_in_step=direct))
        finals.setdefault(on, final)
    NA.MODE = mode
    same = torch.equal(finals[False], finals[True])
    print("| noise | skipped step: median s | mean s |\n|---|---|---|")
    for r in rows:
        print(f"| {'ahead (thread)' if r['noise_ahead'] else 'in the step'} | {r['median_step_s']:.4f} | {r['mean_step_s']:.4f} |")
    print(f"final latents identical: {same}")
    if args.out:
        write_json(args.out, dict(provenance(card_name(args.device)), shape=list(shape), steps=args.steps,
                                  computed_every=args.computed_every, computed_s=args.computed_s, dtype=str(dtype), rows=rows, identical=same))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
