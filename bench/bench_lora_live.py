"""LoRAs changed in one process with a speed option on: recompiles, s/step, and whether the change took effect.

    python bench/bench_lora_live.py                          # GPU: full 1.5 transformer, fp8+fa3fp8+compile
    python bench/bench_lora_live.py --tiny --device cpu --speed compile --compile-backend eager   # the code path
    python bench/bench_lora_live.py --speed fp8,fa3fp8,compile,fp8+compile --phases none,A@1.0,A@1.0+B@1.0
                                                              # one and two LoRAs' cost with each option

What a ComfyUI user does between two queues: the transformer stays loaded (and compiled) and the LoRA
node's strength changes, or a second LoRA is chained in. Issue 26 asks that such a change takes effect
without reloading the model, with at most one recompile, and that s/step with one or two LoRAs stays
within 1.03x of the same option without one. One process, the transformer built once (random bf16 on
the GPU), the transformer used through ``session.Component.with_loras(...).with_speed(...).use()`` (what
the Sampler node does each queue), phases in this order: none, A at 1.0, A at 0.5, A at 1.0 + B at 1.0,
none again (``--phases``: a subset, 'none' first). ``--speed`` may name several options, compiled or not:
the phases run for each in turn and each option's s/step is divided by its own 'none' phase. Each phase samples ``--steps`` real steps of a 50-step DPM run (bench_speed's inputs and
loop, batched CFG). Per phase: every step's seconds, s/step (median after the phase's first step),
dynamo graphs compiled during the phase, and the first step's noise prediction against the phase
before (a change that took effect moves it) and, with ``--check-eager``, against the same speed option
without compile on the same inputs (the option's own tolerance: bench_speed's table).
LoRAs: rank 64 on every block's attention and feed-forward (as bench_hostrun's), written to a temporary
folder by the project's own writer.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvid_core.model import lora, testing  # noqa: E402
from cogvid_core.run import session  # noqa: E402
from cogvid_core.speed import fast  # noqa: E402
from bench.bench_speed import Inputs, Timer, rel_l2, sample_steps  # noqa: E402
from bench.common.provenance import card_name, default_out, provenance, write_json  # noqa: E402

PHASES = (("none", ()), ("A@1.0", (("A", 1.0),)), ("A@0.5", (("A", 0.5),)),
          ("A@1.0+B@1.0", (("A", 1.0), ("B", 1.0))), ("none again", ()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random transformer and video (CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--speed", default="fp8+fa3fp8+compile", help="fast.CHOICES names, comma-separated: the phases "
                   "run for each in turn (s/step with and without LoRAs per option; recompiles where compile is in it)")
    p.add_argument("--phases", default=",".join(label for label, _ in PHASES),
                   help="which phases, in this order's subset (e.g. none,A@1.0,A@1.0+B@1.0: the s/step ratios alone)")
    p.add_argument("--steps", type=int, default=3, help="sampling steps per phase (the first is the phase's warm-up)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--check-eager", action="store_true", help="each phase's first prediction also without compile "
                   "(options with compile)")
    p.add_argument("--speeds", default="", help="then, with LoRA A on, these speed options in turn, twice over "
                   "(e.g. compile,fp8+compile,fa3fp8+compile,fp8+fa3fp8+compile): switching options in one ComfyUI "
                   "session; the second round should compile nothing, run as fast, and warn of no recompile limit")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick CPU check)")
    p.add_argument("--out", type=Path, help="JSON file (default $OUT/lora_live.json, else bench/lora_live_local.json)")
    return p.parse_args(argv)


_LIMIT_WARNINGS: list = []     # dynamo's "hit config.recompile_limit" warnings (it then runs the frame eagerly)


class _LimitLog(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if "recompile_limit" in text or "cache_size_limit" in text:
            _LIMIT_WARNINGS.append(text[:300])


logging.getLogger("torch._dynamo").addHandler(_LimitLog(logging.WARNING))


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _phase(inp: Inputs, comp: session.Component, steps: int) -> tuple[dict, torch.Tensor]:
    """One queue's sampling with ``comp`` (its LoRAs and speed on while in use)."""
    before = _graphs()
    t0 = time.perf_counter()
    with comp.use() as module:
        inp.transformer = module
        timer = Timer(module, inp.device)
        try:
            sample_steps(inp, steps)
        finally:
            timer.remove()
    rest = sorted(timer.times[1:]) or timer.times
    return dict(step_s=timer.times, s_per_step=rest[len(rest) // 2], first_step_s=timer.times[0],
                phase_s=time.perf_counter() - t0, graphs_compiled=_graphs() - before), timer.first


def _speeds(args) -> list[str]:
    speeds = [x.strip() for x in args.speed.split(",") if x.strip()]
    unknown = [x for x in speeds if x not in fast.CHOICES]
    if unknown or not speeds:
        raise SystemExit(f"--speed {args.speed!r}: unknown {unknown}; choices: {', '.join(fast.CHOICES)}")
    return speeds


def _phases(args) -> list:
    wanted = [x.strip() for x in args.phases.split(",") if x.strip()]
    known = dict(PHASES)
    if not wanted or any(w not in known for w in wanted) or wanted[0] != "none":
        raise SystemExit(f"--phases {args.phases!r}: names from {', '.join(known)}, 'none' first (the yardstick)")
    return [(w, known[w]) for w in wanted]


def run(args) -> dict:
    speeds, phases = _speeds(args), _phases(args)
    fast.COMPILE_OPTIONS["backend"] = args.compile_backend
    inp = Inputs(args)
    base = session.Component("transformer", inp.transformer, inp.device, inp.dtype, variant=inp.variant)
    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for i, name in enumerate("AB"):
            path = testing.write_lora(Path(tmp) / f"{name}.safetensors", inp.variant.key, ("attn", "ff"),
                                      rank=args.rank, seed=i, tiny=args.tiny, dtype=inp.dtype)
            weights[name] = lora.load_lora(path)
        rows = []
        for speed in speeds:
            rows += _speed_phases(inp, base, weights, speed, phases, args)
        for round_ in (1, 2):
            for speed in [x.strip() for x in args.speeds.split(",") if x.strip()]:
                limits = len(_LIMIT_WARNINGS)
                row, _ = _phase(inp, base.with_loras([(weights["A"], 1.0)]).with_speed(speed), args.steps)
                row.update(phase=f"{speed}, round {round_}", loras=["A@1.0"], speed=speed,
                           recompile_limit_warnings=_LIMIT_WARNINGS[limits:], x_no_lora=None)
                rows.append(row)
                print(_line(row), flush=True)
    env = dict(provenance(card_name(inp.device) if inp.device.type == "cuda" else "cpu"), speed=args.speed,
               phases=[label for label, _ in phases], rank=args.rank, steps=args.steps, tiny=bool(args.tiny),
               frames=inp.frames, height=inp.height, width=inp.width, compile_backend=args.compile_backend)
    return dict(env=env, rows=rows)


def _speed_phases(inp, base, weights, speed, phases, args) -> list[dict]:
    """The phases with one speed option; x_no_lora against its own 'none' phase."""
    eager_speed = "+".join(p for p in speed.split("+") if p != "compile") or fast.EXACT
    rows, previous = [], None
    for label, pairs in phases:
        loras = [(weights[n], s) for n, s in pairs]
        row, pred = _phase(inp, base.with_loras(loras).with_speed(speed), args.steps)
        row.update(phase=label, speed=speed, loras=[f"{n}@{s}" for n, s in pairs])
        if previous is not None:
            row["step1_pred_rel_l2_vs_previous_phase"] = rel_l2(pred, previous)
        previous = pred
        if args.check_eager and eager_speed != speed:
            _, eager = _phase(inp, base.with_loras(loras).with_speed(eager_speed), 1)
            row["step1_pred_rel_l2_vs_" + eager_speed.replace("+", "_")] = rel_l2(pred, eager)
        if inp.device.type == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(inp.device) / 2 ** 30
        rows.append(row)
    for row in rows:
        row["x_no_lora"] = row["s_per_step"] / rows[0]["s_per_step"]
        print(_line(row), flush=True)
    return rows


def _line(row) -> str:
    extra = {k: v for k, v in row.items() if k.startswith("step1_pred")}
    return (f"| {row.get('speed', '')} | {row['phase']} | {row['s_per_step']:.3f} | {row['first_step_s']:.2f} | {row['graphs_compiled']} | "
            + " | ".join(f"{k}={v:.2e}" for k, v in extra.items()) + " |")


def main(argv=None):
    args = parse_args(argv)
    print("| speed | phase | s/step | first step s | graphs compiled | first-step prediction |\n|---|---|---|---|---|---|")
    result = run(args)
    print("| speed | phase | x no LoRA (the same speed) |\n|---|---|---|")
    for row in result["rows"]:
        if row["x_no_lora"] is not None:
            print(f"| {row['speed']} | {row['phase']} | {row['x_no_lora']:.3f} |")
    out = args.out or default_out("lora_live")
    write_json(out, result)
    print("JSON:", out)


if __name__ == "__main__":
    main()
