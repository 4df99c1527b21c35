"""Two GPUs: CFG branches in parallel, and T5/VAE on one card with the transformer on the other.

Full-size random-weight models (bf16) are built directly on the GPUs. Runs, in one process:

1. one GPU, everything resident, CFG batched (the diffusers-resident shape of a step);
2. one GPU, resident, CFG one branch at a time (``sequential``);
3. CFG in parallel: the same transformer with a second copy on the other GPU
   (``multigpu.attach_second``), each GPU one branch at a time.
   Per-step median seconds, ratio to runs 1 and 2 (target <= 0.55), final latents' max abs
   difference to both (bf16 rounding; to 2 it is the same arithmetic per branch), peak memory per GPU.
4. components on different cards with the ``lowvram`` profile (what two 12 GB cards would run): T5
   (streamed) and the VAE (offload) on the second GPU, the transformer streamed on the first; the
   whole run (text encode, image encode, denoise, decode) through the engine's public functions,
   each GPU's peak allocated / reserved.

    NCCL_NVLS_ENABLE=0 python bench/bench_two_gpus.py --out $OUT/two_gpus.json     # 2 x H200, ~3 min
    python bench/bench_two_gpus.py --tiny --device cpu                              # same path, seconds

``--speed NAME`` (fast.CHOICES, e.g. fp8+fa3fp8+compile) runs the transformer of runs 1-3 and of the
sequence-parallel runs with that speed option (the pair: on both copies), so the pair's ratio is to one
GPU with the same speed; run once with ``--speed exact`` beside it for the ratio to exact. Compile's
first step is excluded by the per-step median.

``--cache NAME[:ARGS]`` (i2v --cache: fbc, pab; fastercache is refused on the pair) runs runs 1-3 and the
sequence-parallel runs with that step cache; each row then has the full transformer passes that ran
(on the pair: both copies' branch passes; under torchrun: rank 0's, every rank takes the same decisions).
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.speed import caches, fast  # noqa: E402
from cogvid_core.speed import multigpu as MG  # noqa: E402
from cogvid_core.run import sampling  # noqa: E402
from cogvid_core.memory.activations import apply_profile  # noqa: E402
from cogvid_core.model.loading import load_scheduler  # noqa: E402
from cogvid_core.memory.placement import place, unplace  # noqa: E402
from cogvid_core.model.testing import build_random  # noqa: E402
from cogvid_core.model.vae import ImageLatent  # noqa: E402
from bench.common.provenance import GIB, card_name, log, provenance, write_json  # noqa: E402
from bench.common.reference import PROMPT  # noqa: E402
from bench.common.tables import fmt as _f  # noqa: E402


def sync_all(devices):
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def reset_peaks(devices):
    gc.collect()
    sync_all(devices)
    for d in {d for d in devices if d.type == "cuda"}:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d)


def peaks(devices) -> dict:
    """{device: (peak allocated GiB, peak reserved GiB)} since the last reset_peaks."""
    sync_all(devices)
    return {str(d): (round(torch.cuda.max_memory_allocated(d) / GIB, 2), round(torch.cuda.max_memory_reserved(d) / GIB, 2))
            if d.type == "cuda" else (None, None) for d in dict.fromkeys(devices)}


class Clock:
    """progress(done, total) callback: the time of each step (the loop's finite check synchronises)."""

    def __init__(self):
        self.marks = [time.perf_counter()]

    def __call__(self, done, total):
        self.marks.append(time.perf_counter())

    def per_step(self) -> float:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return statistics.median(steps[1:] if len(steps) > 1 else steps)   # the first step warms caches


def inputs(variant, tiny, frames, height, width, dtype, device, seed=0):
    """Random prompt embeddings and start-image latent of the real shapes."""
    g = torch.Generator().manual_seed(seed)
    dim = M.transformer_config(variant, tiny)["text_embed_dim"]
    pos, neg = (torch.randn(1, M.MAX_TEXT_TOKENS, dim, generator=g).to(device, dtype) for _ in range(2))
    h, w = height // 8, width // 8
    lat = ImageLatent(mean=torch.randn(1, 16, 1, h, w, generator=g), std=torch.rand(1, 16, 1, h, w, generator=g) * 0.1,
                      height=height, width=width, scale=0.7)
    return pos, neg, lat


def denoise(tr, variant, args, pos, neg, lat, cfg_mode, devices):
    """One sampling run with ``args.speed`` and ``args.cache`` on (a transformer with a second copy: on both)."""
    reset_peaks(devices)
    clock = Clock()
    stats = []
    with fast.applied(tr, args.speed, devices[0]):
        out = sampling.sample(tr, variant, pos, neg, lat, args.frames, steps=args.steps, cfg=6.0, seed=42,
                              scheduler=load_scheduler(None, "dpm"), device=devices[0], dtype=args.dtype,
                              cfg_mode=cfg_mode, progress=clock, cache=args.cache, cache_stats=stats)
    row = dict(s_per_step=round(clock.per_step(), 3), peaks=peaks(devices),
               seconds=round(clock.marks[-1] - clock.marks[0], 2))
    if stats:
        row.update(full_passes=stats[0].full_passes, cache_stats=stats[0].line())
    return out.samples.float(), row


def warm_up(tr, variant, tiny, dtype, device):
    """One small forward, so lazy CUDA/cuBLAS start-up is not billed to the first run."""
    cfg = tr.config
    x = torch.randn(1, 2, cfg.in_channels, 16, 16, device=device, dtype=dtype)
    rope = sampling.rotary_embedding(cfg, 128, 128, 2, device)
    ofs = x.new_full((1,), 2.0) if cfg.ofs_embed_dim else None
    e = torch.randn(1, M.MAX_TEXT_TOKENS, cfg.text_embed_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        tr(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500], device=device), ofs=ofs,
           image_rotary_emb=rope, return_dict=False)
    sync_all([device])


def cfg_runs(tr, variant, args, devices) -> tuple[list, dict]:
    """Runs 1-3; returns (rows, {name: final latents})."""
    pos, neg, lat = inputs(variant, args.tiny, args.frames, args.height, args.width, args.dtype, devices[0])
    rows, lats = [], {}
    for name, mode in (("1 GPU resident, CFG batched", "batched"), ("1 GPU resident, CFG sequential", "sequential")):
        lats[mode], row = denoise(tr, variant, args, pos, neg, lat, mode, devices[:1])
        rows.append(dict(run=name, **row))
        log(rows[-1])
    second = MG.attach_second(tr, devices[1])
    with MG.mirrored(tr, second) as rep, MG.on_device(devices[1]):   # placed on the second GPU once, warmed there
        warm_up(rep, variant, args.tiny, args.dtype, devices[1])
    lats["parallel"], row = denoise(tr, variant, args, pos, neg, lat, "batched", devices)
    diff = {k: round((lats["parallel"] - lats[k]).abs().max().item(), 6) for k in ("batched", "sequential")}
    ref = lats["batched"].abs().max().item()
    rows.append(dict(run="2 GPUs, CFG in parallel", **row, max_abs_diff=diff, latents_max_abs=round(ref, 4),
                     ratio_to_batched=round(row["s_per_step"] / rows[0]["s_per_step"], 3),
                     ratio_to_sequential=round(row["s_per_step"] / rows[1]["s_per_step"], 3)))
    log(rows[-1])
    MG.detach_second(tr)
    return rows, lats


def split_run(tr, t5, vae, tok, variant, args, devices) -> dict:
    """Run 4: T5 + VAE on devices[1], transformer on devices[0], lowvram placements, the whole run."""
    from PIL import Image

    from cogvid_core.model import text
    from cogvid_core.model import vae as vae_mod
    prof = apply_profile(tr, "lowvram")
    for m in (tr, t5, vae):
        m.to("cpu")
    reset_peaks(devices)
    enc_dev, tr_dev = devices[1], devices[0]
    with MG.on_device(enc_dev):   # streams made and waited on where the model computes
        p_t5, p_vae = place(t5, enc_dev, prof.text_encoder), place(vae, enc_dev, prof.vae)
    with MG.on_device(tr_dev):
        p_tr = place(tr, tr_dev, prof.transformer)
    t0 = time.perf_counter()
    with MG.on_device(enc_dev), p_t5.use():
        pos = text.encode_prompt(t5, tok, PROMPT, enc_dev)
        neg = text.encode_prompt(t5, tok, "", enc_dev)
    yy, xx = torch.meshgrid(torch.arange(args.height), torch.arange(args.width), indexing="ij")
    img = Image.fromarray(torch.stack([xx * 255 // args.width, yy * 255 // args.height, (xx + yy) % 256], -1)
                          .to(torch.uint8).numpy())
    with MG.on_device(enc_dev), p_vae.use():
        lat = vae_mod.encode_image(vae, img, args.height, args.width, variant, device=enc_dev,
                                   strips=prof.encode_tiled)
    clock = Clock()
    with MG.on_device(tr_dev), p_tr.use():    # embeddings and the image latent cross to the transformer's GPU inside sample()
        out = sampling.sample(tr, variant, pos.embeds, neg.embeds, lat, args.frames, steps=args.split_steps,
                              cfg=6.0, seed=42, scheduler=load_scheduler(None, "dpm"), device=tr_dev,
                              dtype=args.dtype, cfg_mode=prof.cfg_mode, progress=clock)
    with MG.on_device(enc_dev), p_vae.use():
        frames = vae_mod.decode(vae, out, enc_dev, tile=prof.vae_tile)
    row = dict(run="T5+VAE on one GPU, transformer on the other (lowvram)", s_per_step=round(clock.per_step(), 3),
               seconds=round(time.perf_counter() - t0, 2), peaks=peaks(devices), frames=list(frames.shape),
               devices={"t5": str(enc_dev), "vae": str(enc_dev), "transformer": str(tr_dev)})
    for m in (t5, vae, tr):
        unplace(m)
    log(row)
    return row



def seqpar_runs(variant, args) -> list:
    """Under torchrun: one GPU (rank 0 alone) vs Ulysses sequence parallel over every rank, CFG batched;
    per-step time, latents' max abs difference, all-to-all bytes per step, and the scaling they imply."""
    import torch.distributed as dist

    from cogvid_core.speed import seqpar
    dev = seqpar.init(args.device.split(":")[0])
    n, rank = dist.get_world_size(), dist.get_rank()
    devices = [dev]
    tr = build_random("transformer", variant, args.tiny, args.dtype, dev, seed=0)
    for t in [*tr.parameters(), *tr.buffers()]:        # the very same weights on every rank
        dist.broadcast(t.data, 0)
    warm_up(tr, variant, args.tiny, args.dtype, dev)
    pos, neg, lat = inputs(variant, args.tiny, args.frames, args.height, args.width, args.dtype, dev)
    one = None
    if rank == 0:
        one_lat, one = denoise(tr, variant, args, pos, neg, lat, "batched", devices)
    dist.barrier()
    with seqpar.sequence_parallel(tr) as mode:
        sp_lat, sp = denoise(tr, variant, args, pos, neg, lat, "batched", devices)
    per_step = mode.sent_bytes / args.steps
    rows = []
    if rank == 0:
        rows.append(dict(run="1 GPU resident, CFG batched (torchrun rank 0 alone)", **one))
        ratio = sp["s_per_step"] / one["s_per_step"]
        rows.append(dict(run=f"sequence parallel (Ulysses) on {n} GPUs, CFG batched", **sp,
                         ratio_to_batched=round(ratio, 3), alltoall_gib_per_step_per_rank=round(per_step / GIB, 3),
                         max_abs_diff={"batched": round((sp_lat - one_lat).abs().max().item(), 6)},
                         scaling=scaling(one["s_per_step"], sp["s_per_step"], per_step, n)))
        for r in rows:
            log(r)
    dist.barrier()
    dist.destroy_process_group()
    return rows


def scaling(t1: float, tn: float, sent_n: float, n: int) -> dict:
    """Expected s/step on k GPUs: compute t1/k plus the all-to-all bytes a rank sends per step,
    which scale as (k-1)/k^2 (a rank's share of the tokens times the share it sends away), at the
    bandwidth measured here ((tn - t1/n) seconds for sent_n bytes)."""
    comm = max(tn - t1 / n, 1e-9)
    bandwidth = sent_n / comm
    per_unit = sent_n / ((n - 1) / n ** 2)
    out = {"measured_effective_gb_s": round(bandwidth / 1e9, 1)}
    for k in (2, 4, 8):
        sent = per_unit * (k - 1) / k ** 2
        t = t1 / k + sent / bandwidth
        out[f"{k}_gpus"] = dict(s_per_step=round(t, 3), speedup=round(t1 / t, 2), alltoall_gib=round(sent / GIB, 3))
    return out


def table(rows) -> str:
    lines = ["| run | s/step | x batched | x sequential | max abs diff vs batched / sequential | "
             "peak alloc / reserved GiB per GPU |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("max_abs_diff") or {}
        per_gpu = "; ".join(f"{d} {_f(a)} / {_f(b)}" for d, (a, b) in r["peaks"].items())
        lines.append(f"| {r['run']} | {_f(r['s_per_step'], '.3f')} | {_f(r.get('ratio_to_batched'), '.3f')} | "
                     f"{_f(r.get('ratio_to_sequential'), '.3f')} | {_f(diff.get('batched'), '.2e')} / "
                     f"{_f(diff.get('sequential'), '.2e')} | {per_gpu} |")
    return "\n".join(lines)


def build(variant, args, devices):
    """Transformer on the first device, T5 and VAE on the second, random weights built in place."""
    from transformers import T5Tokenizer

    from cogvid_core.model.testing import write_tokenizer
    t0 = time.perf_counter()
    tr = build_random("transformer", variant, args.tiny, args.dtype, devices[0], seed=0)
    t5 = build_random("text_encoder", variant, args.tiny, args.dtype, devices[1], seed=1)
    vae = build_random("vae", variant, args.tiny, args.dtype, devices[1], seed=2)
    tok = T5Tokenizer.from_pretrained(write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
    log(f"built models in {time.perf_counter() - t0:.1f} s")
    return tr, t5, vae, tok


def _arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random models: the same code path in seconds")
    ap.add_argument("--device", default="cuda", help="cuda: cuda:0 and cuda:1; cpu: two CPU 'devices'")
    ap.add_argument("--steps", type=int, default=3, help="denoise steps of the CFG runs (per-step median after the first)")
    ap.add_argument("--split-steps", type=int, default=2, help="denoise steps of the split run")
    ap.add_argument("--skip-split", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results here as JSON (after each run)")
    ap.add_argument("--seqpar", action="store_true", help="under torchrun: sequence parallel vs one GPU only")
    ap.add_argument("--speed", default=fast.EXACT, help="the transformer's speed option in the CFG and seqpar runs "
                    "(e.g. fp8+fa3fp8+compile or fastest; the pair runs it on both copies)")
    ap.add_argument("--cache", default="none", help="step cache of the CFG and seqpar runs (i2v --cache, e.g. "
                    "fbc:0.7 or pab; fastercache does not run on the pair)")
    return ap


def _devices(ap, args) -> list:
    if args.seqpar:
        return []            # each rank's own, from torchrun
    if args.device == "cpu":
        return [torch.device("cpu")] * 2
    if torch.cuda.device_count() < 2:
        ap.error(f"two GPUs needed, torch sees {torch.cuda.device_count()}: run on the two-GPU machine or --device cpu")
    return [torch.device("cuda", 0), torch.device("cuda", 1)]


def main(argv=None) -> int:
    ap = _arguments()
    args = ap.parse_args(argv)
    variant = M.V15
    devices = _devices(ap, args)
    args.dtype = torch.float32 if args.device.startswith("cpu") else torch.bfloat16
    if args.tiny:
        args.frames, args.height, args.width = M.default_size(variant, M.transformer_config(variant, tiny=True))
    else:
        args.frames, args.height, args.width = variant.default_frames, variant.default_height, variant.default_width
    fast.check_name(args.speed)       # a bad name fails before any model is built
    caches.parse(args.cache)
    env = dict(torch=torch.__version__, python=platform.python_version(), devices=[str(d) for d in devices],
               cards=[torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"], speed=args.speed,
               cache=args.cache)
    log(f"# bench_two_gpus: {variant.label} {args.frames}x{args.height}x{args.width}, {args.dtype}, "
        f"{'tiny' if args.tiny else 'full-size'} random weights, {env}")
    t0 = time.perf_counter()

    def save(rows):
        out = table(rows)
        log("\n" + out + f"\n\n{time.perf_counter() - t0:.1f} s so far")
        if args.out:
            card = card_name(devices[0] if devices else args.device)    # seqpar: this rank's
            write_json(args.out, dict(env=env, variant=variant.key, frames=args.frames, height=args.height,
                                      width=args.width, steps=args.steps, split_steps=args.split_steps,
                                      tiny=args.tiny, dtype=str(args.dtype), rows=rows, table=out,
                                      **provenance(card)), indent=2)
    if args.seqpar:
        rows = seqpar_runs(variant, args)
        if rows:              # rank 0 reports
            save(rows)
        return 0
    tr, t5, vae, tok = build(variant, args, devices)
    warm_up(tr, variant, args.tiny, args.dtype, devices[0])
    rows, _lats = cfg_runs(tr, variant, args, devices)
    save(rows)
    if not args.skip_split:
        try:
            rows.append(split_run(tr, t5, vae, tok, variant, args, devices))
        except Exception as e:  # noqa: BLE001 - a failed run (OOM) is a result too; the CFG rows stand
            log(traceback.format_exc())
            rows.append(dict(run="T5+VAE on one GPU, transformer on the other (lowvram)", s_per_step=None,
                             peaks=peaks(devices), error=f"{type(e).__name__}: {e}"))
        save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
