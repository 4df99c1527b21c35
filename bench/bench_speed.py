"""Speed options (cogvid_core.speed.fast) against the exact path, on the full CogVideoX1.5-5B-I2V transformer.

    python bench/bench_speed.py                           # H200: 81x768x1360, batched CFG, ~7 min
    python bench/bench_speed.py --tiny --device cpu       # the code path, on a CPU, seconds
    python bench/bench_speed.py --emulate-cc 8.9 --options exact,fastest,fp8+sage+compile   # an Ada card's choices

On the GPU machine (carry .whl with diffusers, .whl_speed with torchao 0.18.0 and sageattention 1.0.6):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl .whl_speed/*.whl && export PYTHONPATH=/tmp/site || exit; python3 bench/bench_speed.py
With FlashAttention-3 (``fa3fp8``): the PyPI wheel tokenspeed-fa3 (63 MB) is past the device tool's 64 MiB
carry limit beside the others; carry it unpacked and re-packed with xz (29 MB) and untar it into /tmp/site.

Random bf16 weights built on the GPU; inputs of the 1.5 video at 81x768x1360 (batched CFG, batch 2:
44,880 video + 226 text tokens). Each option samples the same few real steps of a 50-step DPM run
(dynamic CFG 6, the project's sampling loop) from the same noise. Per option:

* s/step: median of the steps after the first (one batched-CFG transformer forward each, synchronised);
  first-call seconds (compile warm-up); ratio to the exact path, which is diffusers' model as it is;
* error vs the exact path: relative L2 of the first step's noise prediction (same inputs), and of the
  latents after the last step (free-running: errors compound as in a real run);
* peak allocated GiB; dynamo graphs compiled after the first step (0: no recompilation across steps).

``flash`` and ``efficient`` (torch SDPA backends, exact) give the yardstick: how much two exact
attention kernels differ. ``anchor`` is torchao's own recipe: float8 dynamic per-row on every block
Linear (torchao's defaults, its inductor settings included) plus regional compile, undone after it ran.
Options that would end past the time budget are skipped (listed as such). ``fastest`` runs the recipe
it picks on this card (the row's ``ran`` says which).

``--emulate-cc 8.6`` sets COGVID_EMULATE_CC (cogvid_core.speed.cardclass): the capability checks (fp8's
8.9, fa3fp8's 9.0, fastest's card class) see 8.6, so an H100 shows which recipes an Ampere card would
be given and runs them; the seconds are still the H100's. The JSON's env records it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvid_core.speed import cardclass, fast  # noqa: E402
from cogvid_core.model import loading  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.run import sampling  # noqa: E402
from cogvid_core.model import testing  # noqa: E402
from bench.common.provenance import card_name, default_out, provenance, versions, write_json  # noqa: E402

# most wanted first: the time budget drops the tail when steps run slower than expected
DEFAULT_OPTIONS = ("exact,fa3fp8,fp8+fa3fp8+compile,fa3fp8+compile,flash,compile,fp8+compile,anchor,cudnn,sage,fp8,"
                   "sage+compile,efficient,cudnn+compile,fp8+sage+compile")
ANCHOR = "anchor"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random transformer and video (CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--options", default=DEFAULT_OPTIONS, help="comma-separated speed names (exact first: the reference)")
    p.add_argument("--steps", type=int, default=3, help="sampling steps per option (the first is the warm-up)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--budget-s", type=float, default=380.0, help="skip options that would end past this many seconds")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick CPU check)")
    p.add_argument("--emulate-cc", metavar="X.Y", help="capability checks see compute capability X.Y (sets "
                   f"{cardclass.EMULATE_CC}): what another card class would run, timed on this GPU")
    p.add_argument("--out", type=Path, help="JSON file (default $OUT/speed.json, else bench/speed_local.json)")
    return p.parse_args(argv)


class Inputs:
    """The transformer and one run's inputs, the same for every option."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.variant = M.VARIANTS["cogvideox1.5-5b-i2v"]
        t0 = time.perf_counter()
        self.transformer = testing.build_random("transformer", self.variant, args.tiny, self.dtype, self.device)
        self.build_s = time.perf_counter() - t0
        cfg = self.transformer.config
        frames, h, w = M.default_size(self.variant, dict(cfg))
        self.frames, self.height, self.width = args.frames or frames, args.height or h, args.width or w
        n_lat, _ = M.latent_frames(self.variant, self.frames)
        gen = torch.Generator("cpu").manual_seed(0)
        lat_h, lat_w = self.height // M.SPATIAL_COMPRESSION, self.width // M.SPATIAL_COMPRESSION
        channels = cfg.in_channels // 2
        text = (1, cfg.max_text_seq_length, cfg.text_embed_dim)
        self.positive = torch.randn(text, generator=gen).to(self.device, self.dtype)
        self.negative = torch.randn(text, generator=gen).to(self.device, self.dtype)
        first = torch.randn((1, 1, channels, lat_h, lat_w), generator=gen)
        self.start = torch.cat([first, first.new_zeros(1, n_lat - 1, channels, lat_h, lat_w)], 1).to(self.device, self.dtype)
        self.noise_shape = (1, n_lat, channels, lat_h, lat_w)
        self.rope = sampling.rotary_embedding(cfg, self.height, self.width, n_lat, self.device)
        self.ofs = torch.full((1,), 2.0, device=self.device, dtype=self.dtype) if cfg.ofs_embed_dim else None
        p = cfg.patch_size_t or 1
        self.tokens = (n_lat + (-n_lat) % p) // p * (lat_h // cfg.patch_size) * (lat_w // cfg.patch_size)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times each transformer forward (synchronised) and keeps the first one's output."""

    def __init__(self, module, device):
        self.device, self.times, self.first = device, [], None
        self._t0 = 0.0
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, _m, _a):
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, _m, _a, out):
        _sync(self.device)
        self.times.append(time.perf_counter() - self._t0)
        if self.first is None:
            self.first = out[0].float().cpu()

    def remove(self):
        for h in self.handles:
            h.remove()


def sample_steps(inp: Inputs, steps: int):
    """``steps`` real steps of a 50-step DPM run, dynamic CFG 6, batched CFG, from fixed noise."""
    sched = loading.load_scheduler(None, "dpm")
    gen = torch.Generator("cpu").manual_seed(42)
    latents = sampling.initial_noise(sched, 50, inp.noise_shape, gen, inp.device, inp.dtype)
    sched.timesteps = sched.timesteps[:steps]
    den = sampling.Denoiser(inp.transformer, inp.positive, inp.negative, inp.rope, inp.ofs, cfg=6.0, steps=50,
                            dynamic_cfg=True, cfg_mode="batched")
    return sampling.denoise(den, sched, latents, inp.start, gen, inp.dtype).float().cpu()


@contextmanager
def _anchor(transformer):
    """torchao's recipe as its docs give it: every block Linear quantized in place (torchao's defaults,
    its inductor settings included), each block compiled; all undone after, so later options see the
    model and the process as before."""
    from torch._inductor import config as inductor_config
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    linears = [m for n, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")]
    chosen = set(linears)
    saved = [(m, m.weight) for m in linears]
    settings, precision = inductor_config.save_config(), torch.get_float32_matmul_precision()
    try:
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, fqn: m in chosen)
        for block in transformer.transformer_blocks:
            block.compile(**fast.COMPILE_OPTIONS)
        yield
    finally:
        for m, w in saved:
            m.weight = w
            m.__dict__.pop("extra_repr", None)
        for block in transformer.transformer_blocks:
            block._compiled_call_impl = None
        inductor_config.load_config(settings)
        torch.set_float32_matmul_precision(precision)


def _forget_compiled(transformer):
    """Each option compiles from scratch: its warm-up is its own, and dynamo's per-code cache limit
    is not spent by earlier options."""
    torch._dynamo.reset()
    for block in transformer.transformer_blocks:
        block.__dict__.pop(fast._COMPILED, None)


def run_option(inp: Inputs, name: str, steps: int) -> dict:
    from torch._dynamo.utils import counters
    _forget_compiled(inp.transformer)
    if inp.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(inp.device)
    timer = Timer(inp.transformer, inp.device)
    graphs = []
    timer.handles.append(inp.transformer.register_forward_hook(
        lambda *_: graphs.append(counters["stats"]["unique_graphs"])))
    try:
        if name == ANCHOR:
            with _anchor(inp.transformer):
                used, notes = "torchao float8 per-row, all block Linears, + block.compile (quantized)", []
                latents = sample_steps(inp, steps)
        else:
            with fast.applied(inp.transformer, name, inp.device) as speed:
                used, notes = speed.name + (" (quantized)" if speed.quantized else ""), list(speed.notes)
                latents = sample_steps(inp, steps)
    finally:
        timer.remove()
    rest = sorted(timer.times[1:]) or timer.times
    row = dict(option=name, ran=used, notes=notes, s_per_step=rest[len(rest) // 2], first_call_s=timer.times[0],
               step_times=timer.times, graphs_after_first_step=graphs[-1] - graphs[0] if graphs else 0)
    if inp.device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(inp.device) / 2 ** 30
    return row, timer.first, latents


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def predicted_cost(name: str, exact_step: float, steps: int) -> float:
    compile_s = 90.0 if ("compile" in name or name in (ANCHOR, fast.FASTEST)) else 0.0
    return steps * exact_step * 1.3 + compile_s


def run_all(args) -> dict:
    t_start = time.perf_counter()
    inp = Inputs(args)
    fast.COMPILE_OPTIONS["backend"] = args.compile_backend
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    if names[0] != fast.EXACT:
        names.insert(0, fast.EXACT)
    rows, ref_pred, ref_lat = [], None, None
    for name in names:
        elapsed = time.perf_counter() - t_start
        if rows and elapsed + predicted_cost(name, rows[0]["s_per_step"], args.steps) > args.budget_s:
            rows.append(dict(option=name, skipped=f"time budget ({elapsed:.0f} s used of {args.budget_s:.0f})"))
            continue
        try:
            row, pred, lat = run_option(inp, name, args.steps)
        except Exception as e:   # one option failing must not lose the others' numbers
            rows.append(dict(option=name, error=f"{type(e).__name__}: {e}"[:500]))
            print(table_line(rows[-1]), flush=True)
            if ref_pred is None:
                break            # no exact reference: nothing else can be compared
            continue
        if ref_pred is None:
            ref_pred, ref_lat = pred, lat
        row.update(step1_pred_rel_l2=rel_l2(pred, ref_pred), final_latent_rel_l2=rel_l2(lat, ref_lat),
                   final_latent_max_abs=float((lat - ref_lat).abs().max()),
                   ratio_to_exact=row["s_per_step"] / rows[0]["s_per_step"] if rows else 1.0)
        rows.append(row)
        print(table_line(row), flush=True)
    return dict(env=_env(inp, args), rows=rows, total_s=time.perf_counter() - t_start)


def _env(inp: Inputs, args) -> dict:
    dev = inp.device
    extras = versions("torchao", "sageattention")
    return dict(provenance(card_name(dev) if dev.type == "cuda" else "cpu"), torchao=extras["torchao"],
                sageattention=extras["sageattention"], variant=inp.variant.key, frames=inp.frames,
                height=inp.height, width=inp.width, tokens=inp.tokens,
                steps=args.steps, tiny=bool(args.tiny), dtype=str(inp.dtype), build_s=inp.build_s,
                compile_backend=args.compile_backend, cfg="batched, dynamic 6", scheduler="dpm (50-step schedule)",
                emulate_cc=args.emulate_cc)


HEADER = ("| option | ran as | s/step | x exact | first call s | step-1 pred rel L2 | final latent rel L2 | "
          "peak alloc GiB | graphs after step 1 |\n|---|---|---|---|---|---|---|---|---|")


def table_line(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"| {r['option']} | {r.get('skipped') or r.get('error')} | | | | | | | |"
    peak = f"{r['peak_allocated_gib']:.2f}" if "peak_allocated_gib" in r else "-"
    return (f"| {r['option']} | {r['ran']} | {r['s_per_step']:.3f} | {r['ratio_to_exact']:.3f} | {r['first_call_s']:.1f} | "
            f"{r['step1_pred_rel_l2']:.2e} | {r['final_latent_rel_l2']:.2e} | {peak} | {r['graphs_after_first_step']} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.emulate_cc:
        os.environ[cardclass.EMULATE_CC] = args.emulate_cc
        cardclass.emulated()      # a malformed value fails here, before the model is built
    data = run_all(args)
    out = args.out or default_out("speed")
    write_json(out, data)
    e = data["env"]
    print(f"\n{e['card']}, torch {e['torch']}, {e['variant']} {e['frames']}x{e['height']}x{e['width']} "
          f"({e['tokens']} video tokens), {e['steps']} steps, total {data['total_s']:.0f} s\n")
    print(HEADER)
    for r in data["rows"]:
        print(table_line(r))
        for note in r.get("notes", ()):
            print(f"  note ({r['option']}): {note}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
