"""Precision rules (cogvid_core.model.precision) on the full-size models: bytes, seconds and error per rule.

    python bench/bench_precision.py                         # GPU: 1.5 transformer at 81x768x1360 + T5, ~5 min
    python bench/bench_precision.py --tiny --device cpu     # the code path, on a CPU, seconds

On the GPU machine (carry .whl with diffusers):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 bench/bench_precision.py

Random weights built on the device (seed 0), one set per model, cast per row as the loaders cast them:

* transformer (CogVideoX1.5-5B-I2V, one CFG branch): fp32 (the reference), bf16, fp8 storage by this
  rule (attention and feed-forward matrices in e4m3, the AdaLN modulation norm1/norm2.linear in bf16)
  and by the old rule (the modulation in e4m3 too). One forward at a late and an early timestep;
* T5 v1.1 XXL encoder on 226 random tokens: fp32 (the reference), bf16, fp16 by this rule (the ``wo``
  layers in fp32, as transformers loads T5) and pure fp16 (the old loader).

Per row: weight GiB on the device, the estimate's weight GiB for the rule (sizes.weight_bytes),
s/forward (median after a warm-up), peak allocated GiB, relative L2 of the output against fp32 and the
count of non-finite values. Random weights do not reproduce the trained models' activation ranges
(T5 XXL's fp16 saturation needs the real weights): the error columns compare rules, not absolute quality.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common.provenance import default_out  # noqa: E402

from cogvid_core.device.devmem import GiB, module_bytes  # noqa: E402
from cogvid_core.model import loading, testing  # noqa: E402
from cogvid_core.model import precision as P  # noqa: E402
from cogvid_core.model import tensors as T  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.model.sizes import component_sizes, weight_bytes  # noqa: E402
from cogvid_core.run import sampling  # noqa: E402

FP8 = torch.float8_e4m3fn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1360)
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per row after the warm-up")
    p.add_argument("--out", type=Path, help="JSON file (default $OUT/precision.json, else bench/precision_local.json)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    """(output of the first call, median seconds of the calls after it, peak allocated GiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out, times = None, []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        out = y.float().cpu() if out is None else out
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    return out, statistics.median(times[1:] or times), peak


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fp8_cast(model, old_rule: bool) -> None:
    """fp8 storage as the loader applies it (tensors.cast, Fp8Linear); old_rule: the modulation too."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("transformer_blocks."):
            if P.fp8_module(name) or (old_rule and name.endswith(("norm1.linear", "norm2.linear"))):
                mod.weight = torch.nn.Parameter(T.cast(mod.weight.data, FP8, mod.weight.device), requires_grad=False)
    loading.enable_fp8_compute(model)


def keep_wo_fp32(model) -> None:
    """fp16 T5 as the loader makes it now: the modules T5EncoderModel keeps in fp32, in fp32."""
    patterns = P.keep_fp32_patterns(P.model_class("text_encoder"), torch.float16)
    for name, mod in model.named_modules():
        if P.kept_fp32(name, patterns):
            mod.float()


TRANSFORMER_ROWS = (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                    ("fp8 (this rule: modulation bf16)", torch.bfloat16, False),
                    ("fp8 (old rule: modulation e4m3)", torch.bfloat16, True))
T5_ROWS = (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
           ("fp16 (this rule: wo fp32)", torch.float16, True), ("fp16 (old: all fp16)", torch.float16, False))


def transformer_rows(args, device) -> list[dict]:
    v = M.V15
    ref = testing.build_random("transformer", v, args.tiny, torch.float32, device)
    cfg = ref.config
    frames, height, width = (17, 64, 96) if args.tiny else (args.frames, args.height, args.width)
    n_lat, _ = M.latent_frames(v, frames)
    gen = torch.Generator("cpu").manual_seed(0)
    shape = (1, n_lat, cfg.in_channels, height // 8, width // 8)
    x = torch.randn(shape, generator=gen)
    text = torch.randn((1, cfg.max_text_seq_length, cfg.text_embed_dim), generator=gen)
    rope = sampling.rotary_embedding(cfg, height, width, n_lat, device)
    size = component_sizes(v.key, args.tiny)["transformer"]
    rows = []
    for label, dtype, old_rule in TRANSFORMER_ROWS:
        model = ref if dtype == torch.float32 else copy.deepcopy(ref).to(dtype)
        if old_rule is not None:
            fp8_cast(model, old_rule)
        rule = "fp8_e4m3fn" if old_rule is not None else P.name_of(dtype)
        row = dict(model="transformer 1.5", rule=label, weight_gib=module_bytes(model) / GiB,
                   estimate_weight_gib=weight_bytes(size, rule) / GiB if old_rule is not True else None)
        for t in (999, 500):
            def fwd():
                return model(hidden_states=x.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                             timestep=torch.tensor([t], device=device), ofs=torch.full((1,), 2.0, device=device, dtype=dtype),
                             image_rotary_emb=rope, return_dict=False)[0]
            out, sec, peak = timed(fwd, device, args.repeats)
            row[f"t{t}"] = dict(out=out, s=sec, peak_gib=peak, nonfinite=int((~torch.isfinite(out)).sum()))
        rows.append(row)
        if model is not ref:
            del model
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return _errors(rows, ("t999", "t500"))


def t5_rows(args, device) -> list[dict]:
    ref = testing.build_random("text_encoder", M.V15, args.tiny, torch.float32, device)
    ids = torch.randint(0, ref.config.vocab_size, (1, M.MAX_TEXT_TOKENS), generator=torch.Generator("cpu").manual_seed(0))
    size = component_sizes(M.V15.key, args.tiny)["text_encoder"]
    rows = []
    for label, dtype, keep in T5_ROWS:
        model = ref if dtype == torch.float32 else copy.deepcopy(ref).to(dtype)
        if keep:
            keep_wo_fp32(model)
        row = dict(model="T5 XXL encoder", rule=label, weight_gib=module_bytes(model) / GiB,
                   estimate_weight_gib=weight_bytes(size, P.name_of(dtype)) / GiB if keep or dtype != torch.float16 else None)
        out, sec, peak = timed(lambda: model(ids.to(device))[0], device, args.repeats)
        row["encode"] = dict(out=out, s=sec, peak_gib=peak, nonfinite=int((~torch.isfinite(out)).sum()))
        rows.append(row)
        if model is not ref:
            del model
    return _errors(rows, ("encode",))


def _errors(rows: list[dict], keys) -> list[dict]:
    """Relative L2 against the first (fp32) row; the outputs themselves are dropped (not JSON)."""
    for k in keys:
        ref = rows[0][k]["out"]
        for r in rows:
            r[k]["rel_l2_vs_fp32"] = rel_l2(r[k]["out"], ref)
    for r in rows:
        for k in keys:
            r[k].pop("out")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | rule | weight GiB | estimate GiB | pass | s/forward | peak alloc GiB | rel L2 vs fp32 | non-finite |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = f"{r['estimate_weight_gib']:.3f}" if r["estimate_weight_gib"] is not None else "-"
        for k, m in ((k, r[k]) for k in ("t999", "t500", "encode") if k in r):
            peak = f"{m['peak_gib']:.2f}" if m["peak_gib"] is not None else "-"
            lines.append(f"| {r['model']} | {r['rule']} | {r['weight_gib']:.3f} | {est} | {k} | {m['s']:.3f} | {peak} | "
                         f"{m['rel_l2_vs_fp32']:.2e} | {m['nonfinite']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    rows = transformer_rows(args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += t5_rows(args, device)
    import diffusers
    import transformers
    env = dict(command=" ".join([sys.executable, *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
               diffusers=diffusers.__version__, transformers=transformers.__version__, tiny=bool(args.tiny),
               video=None if args.tiny else f"{args.frames}x{args.height}x{args.width}", total_s=time.perf_counter() - t0)
    out = args.out or default_out("precision")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(f"\n{env['card']}, torch {env['torch']}, diffusers {env['diffusers']}, video {env['video']}, "
          f"{env['total_s']:.0f} s\n")
    print(table(rows))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
