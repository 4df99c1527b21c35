"""GPU memory/speed benchmark: diffusers' recipes vs our placement profiles, in one process.

Full-size random-weight models (bf16) are built once, directly on the GPU, warmed up, parked in
host memory, and reused by every recipe. Per recipe and stage (text encode, image encode, denoise,
decode) it records peak allocated / peak reserved GiB (peak stats reset at each stage start),
seconds, s/step, ratios to the diffusers everything-resident run, and the max abs frame difference
to that run (same seed), and host memory (peak RSS; anonymous + pinned, and file-backed pages,
separately). The models here live in host memory, not in files: for the file-backed path (the
loaders' default) and issue 12's host targets see bench_hostrun.py. Our side goes through the engine: text.encode_prompt, vae.encode_image,
sampling.sample, vae.decode, with placement.place()/use() and activations.apply_profile().

    python bench/bench_memory.py                              # 1.5-I2V, 81x768x1360, 3 steps
    python bench/bench_memory.py --variant 1.0                # 5B-I2V, 49x480x720
    python bench/bench_memory.py --tiny --device cpu          # same code path in seconds
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cogvid_core.memory import activations as A  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.memory import placement as P  # noqa: E402
from cogvid_core.plan import planner as PL  # noqa: E402
from cogvid_core.memory import profiles as PR  # noqa: E402
from cogvid_core.run.report import StageRecorder  # noqa: E402
from cogvid_core.memory.profiles import TileSpec  # noqa: E402
from bench.common.provenance import card_name, log, provenance, write_json  # noqa: E402
from bench.common.reference import PROMPT, apply_recipe, run_staged, start_image  # noqa: E402
from bench.common.reference import RECIPES as DIFFUSERS_RECIPES  # noqa: E402
from bench.common.tables import fmt  # noqa: E402

OURS = tuple(f"ours-{name}" for name in PR.PROFILES)
ALL = DIFFUSERS_RECIPES + OURS
DEFAULT_RECIPES = ("diffusers-resident", "ours-lowvram", "ours-balanced", "diffusers-model-offload")
BASELINE = "diffusers-resident"
STAGES = ("text encode", "image encode", "denoise", "decode")
GIB = 1024 ** 3
DIFFUSERS_TILE = TileSpec(240, 360, 0.2)


# ------------------------------------------------------------------------------------------ setup
class Models:
    def __init__(self, variant, tiny, dtype, device):
        from transformers import T5Tokenizer

        from cogvid_core.model.testing import build_random, write_tokenizer

        self.variant, self.dtype, self.device = variant, dtype, device
        build_on = device  # full-size random init is fast on the GPU, slow on the CPU
        t0 = time.perf_counter()
        self.transformer = build_random("transformer", variant, tiny, dtype, build_on, seed=0)
        self.text_encoder = build_random("text_encoder", variant, tiny, dtype, build_on, seed=1)
        self.vae = build_random("vae", variant, tiny, dtype, build_on, seed=2)
        self.tokenizer = T5Tokenizer.from_pretrained(write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
        log(f"built models on {build_on} in {time.perf_counter() - t0:.1f}s: "
            + ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e9:.2f}B"
                        for n, m in self.modules().items()))

    def modules(self):
        return {"transformer": self.transformer, "text_encoder": self.text_encoder, "vae": self.vae}

    def warm_up(self):
        """Run each model once on a small input so lazy CUDA/cuDNN initialisation is not billed to
        the first recipe."""
        dev = self.device
        tr, cfg = self.transformer, self.transformer.config
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.text_encoder(torch.ones(1, M.MAX_TEXT_TOKENS, dtype=torch.long, device=dev))
            f = 2 if cfg.patch_size_t else 1
            h, w = (cfg.sample_height, cfg.sample_width) if cfg.use_learned_positional_embeddings else (16, 16)
            f = 13 if cfg.use_learned_positional_embeddings and cfg.sample_frames == 49 else f
            if cfg.use_learned_positional_embeddings and cfg.sample_frames != 49:
                f = (cfg.sample_frames - 1) // 4 + 1
            x = torch.randn(1, f, cfg.in_channels, h, w, device=dev, dtype=self.dtype)
            from cogvid_core.run.sampling import rotary_embedding
            rope = rotary_embedding(cfg, h * 8, w * 8, f, dev)
            ofs = x.new_full((1,), 2.0) if cfg.ofs_embed_dim else None
            tr(hidden_states=x, encoder_hidden_states=torch.randn(1, M.MAX_TEXT_TOKENS, cfg.text_embed_dim,
                                                                 device=dev, dtype=self.dtype),
               timestep=torch.tensor([500], device=dev), ofs=ofs, image_rotary_emb=rope, return_dict=False)
            img = torch.randn(1, 3, 1, 64, 64, device=dev, dtype=self.dtype)
            z = self.vae.encode(img).latent_dist.mean
            self.vae.decode(torch.cat([z] * 3, dim=2))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        log(f"warm-up {time.perf_counter() - t0:.1f}s")

    def to_host(self):
        for m in self.modules().values():
            m.to("cpu")
        cleanup(self.device)


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_models(models: Models, pipe=None):
    """Remove every hook a recipe left (accelerate, diffusers group offloading, ours) and put all
    weights back in host memory."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import group_offloading as go

    if pipe is not None:
        try:
            pipe.remove_all_hooks()
        except Exception as e:  # noqa: BLE001 - best effort, report and go on
            log(f"  remove_all_hooks: {e}")
    for m in models.modules().values():
        P.unplace(m)
        for sub in m.modules():
            if getattr(sub, "_diffusers_hook", None) is not None:
                reg = HookRegistry.check_if_exists_or_initialize(sub)
                for name in (go._GROUP_OFFLOADING, go._LAYER_EXECUTION_TRACKER, go._LAZY_PREFETCH_GROUP_OFFLOADING):
                    reg.remove_hook(name, recurse=False)
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type != "cpu":
                t.data = t.data.to("cpu")
    A.apply_profile(models.transformer, "resident")
    models.vae.disable_tiling()
    models.vae.disable_slicing()
    cleanup(models.device)


# ------------------------------------------------------------------------------------------ recipes
def run_diffusers(recipe, models: Models, args, rec: StageRecorder):
    from diffusers import CogVideoXImageToVideoPipeline

    from cogvid_core.model import vae as vae_mod
    from cogvid_core.model.loading import load_scheduler

    dev = models.device
    pipe = CogVideoXImageToVideoPipeline(tokenizer=models.tokenizer, text_encoder=models.text_encoder,
                                         vae=models.vae, transformer=models.transformer,
                                         scheduler=load_scheduler(None, "dpm"))
    pipe.set_progress_bar_config(disable=True)
    # diffusers' default tile (240x360) with one overlap (0.2) on both axes, as our profiles tile
    # (diffusers' default height overlap is 1/6): same tiles on both sides, so frames are comparable.
    vae_mod.set_tiling(models.vae, DIFFUSERS_TILE)
    models.vae.enable_slicing()
    t0 = time.perf_counter()
    apply_recipe(pipe, recipe, dev)
    cleanup(dev)
    setup_s = time.perf_counter() - t0

    try:
        out = run_staged(pipe, rec, start_image(args.height, args.width), frames=args.frames, height=args.height,
                         width=args.width, steps=args.steps, cfg=args.cfg, seed=args.seed, decode_to_end=True)
        frames = out[0].permute(0, 2, 3, 1).float().cpu()           # [T, H, W, 3]
        del out
    finally:
        reset_models(models, pipe)
    return frames, setup_s


def run_ours(recipe, models: Models, args, rec: StageRecorder):
    from cogvid_core.run import sampling
    from cogvid_core.model import text
    from cogvid_core.model import vae as vae_mod
    from cogvid_core.model.loading import load_scheduler

    dev = models.device
    name = recipe.removeprefix("ours-")
    if name.startswith("auto@"):     # what `--profile auto --vram-budget N` picks
        prof = PL.resolve_profile(PR.AUTO, budget_gib=float(name[5:]), variant=models.variant, frames=args.frames,
                                  height=args.height, width=args.width, device=dev)
        log(f"{recipe}: plan picked {prof.name}")
    else:
        prof = PR.get_profile(name)
    t0 = time.perf_counter()
    A.apply_profile(models.transformer, prof)
    pt5 = P.place(models.text_encoder, dev, prof.text_encoder)
    pvae = P.place(models.vae, dev, prof.vae)
    ptr = P.place(models.transformer, dev, prof.transformer)
    cleanup(dev)
    setup_s = time.perf_counter() - t0
    try:
        with rec.stage("text encode"):
            with pt5.use():
                pos = text.encode_prompt(models.text_encoder, models.tokenizer, PROMPT, dev)
                neg = text.encode_prompt(models.text_encoder, models.tokenizer, "", dev)
        with rec.stage("image encode"):
            with pvae.use():   # encode in the profile's tiles, as diffusers' tiled recipes do
                latent = vae_mod.encode_image(models.vae, start_image(args.height, args.width), args.height,
                                              args.width, models.variant, device=dev, tile=prof.vae_tile)
        if prof.transformer == "offload":   # one-time weight copy, its own row (amortised over real step counts)
            with rec.stage("transformer onload"):
                ptr.acquire()
        with rec.stage("denoise", steps=args.steps):
            with ptr.use():
                lat = sampling.sample(models.transformer, models.variant, pos.embeds, neg.embeds, latent,
                                      args.frames, steps=args.steps, cfg=args.cfg, dynamic_cfg=True,
                                      scheduler=load_scheduler(None, "dpm"), seed=args.seed, device=dev,
                                      dtype=models.dtype, cfg_mode=prof.cfg_mode)
        with rec.stage("decode"):
            with pvae.use():
                frames = vae_mod.decode(models.vae, lat, dev, tile=prof.vae_tile)
    finally:
        reset_models(models)
    return frames, setup_s


# ------------------------------------------------------------------------------------------ main
def summarize(name, rec: StageRecorder, setup_s, frames, base, error=None):
    rows = {r["stage"]: r for r in rec.rows()}
    tot = rec.total()
    s = dict(recipe=name, setup_s=setup_s, stages=rec.rows(), total=tot, error=error,
             peak_alloc_gib=tot["peak_alloc_gib"], peak_reserved_gib=tot["peak_reserved_gib"],
             host_peak_rss_gib=tot["host_peak_rss_gib"], seconds=tot["seconds"],
             host_anon_pinned_gib=tot.get("host_peak_anon_pinned_gib"), host_file_gib=tot.get("host_peak_file_gib"),
             s_per_step=rows.get("denoise", {}).get("s_per_step"),
             decode_s=rows.get("decode", {}).get("seconds"))
    if base is not None and frames is not None and base.get("frames") is not None:
        bf = base["frames"]
        if bf.shape == frames.shape:
            d = (frames - bf).abs()
            s["max_abs_diff"], s["mean_abs_diff"] = d.max().item(), d.mean().item()
        else:
            s["max_abs_diff"] = f"shape {tuple(frames.shape)} vs {tuple(bf.shape)}"
    return s


def ratio(a, b):
    return a / b if a is not None and b else None


def table(results, base):
    f = fmt
    head = ("| recipe | peak alloc GiB | peak reserved GiB | reserved per stage: text / image / step / decode | "
            "s/step | x resident | decode s | x resident | whole run s | max abs frame diff | host RSS GiB | "
            "host anon+pinned GiB | host file-backed GiB |")
    lines = [head, "|" + "---|" * 13]
    for s in results:
        st = {r["stage"]: r for r in s["stages"]}
        per = " / ".join(f(st.get(k, {}).get("peak_reserved_gib")) for k in STAGES)
        name = s["recipe"] + (f" (FAILED: {s['error'][:80]})" if s.get("error") else "")
        lines.append(
            f"| {name} | {f(s['peak_alloc_gib'])} | {f(s['peak_reserved_gib'])} | {per} | {f(s['s_per_step'])} | "
            f"{f(ratio(s['s_per_step'], base and base['s_per_step']), '.3f')} | {f(s['decode_s'])} | "
            f"{f(ratio(s['decode_s'], base and base['decode_s']), '.3f')} | {f(s['seconds'], '.1f')} | "
            f"{f(s.get('max_abs_diff'), '.4f')} | {f(s['host_peak_rss_gib'])} | {f(s.get('host_anon_pinned_gib'))} | "
            f"{f(s.get('host_file_gib'))} |")
    return "\n".join(lines)


def _arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("1.5", "1.0"), default="1.5")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help=f"comma list from {', '.join(ALL)}, ours-auto@GIB (the plan for that budget) or 'all'; "
                         f"{BASELINE} always runs first")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test of the same path)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 (fp32 with --tiny on CPU)")
    ap.add_argument("--json", type=Path)
    return ap


def _recipes(ap, text: str) -> list[str]:
    """The --recipes list, checked, the baseline first."""
    recipes = list(ALL) if text == "all" else [r.strip() for r in text.split(",") if r.strip()]
    for r in recipes:
        if r.split("#")[0] not in ALL and not r.startswith("ours-auto@"):
            ap.error(f"unknown recipe {r!r}; known: {', '.join(ALL)} (a '#2' suffix repeats one)")
    if not recipes or recipes[0] != BASELINE:
        recipes = [BASELINE] + [r for r in recipes if r != BASELINE]
    return recipes


def run_recipes(models: Models, recipes: list[str], args, dev) -> tuple[list[dict], dict | None]:
    """Each recipe in turn on the same models; (summaries, the baseline's summary with its frames)."""
    results, base = [], None
    for recipe in recipes:
        log(f"## {recipe}")
        rec = StageRecorder(dev)
        frames, error, setup_s = None, None, None
        try:
            kind = recipe.split("#")[0]
            runner = run_ours if kind.startswith("ours-") else run_diffusers
            frames, setup_s = runner(kind, models, args, rec)
        except Exception as e:  # noqa: BLE001 - a failed recipe (OOM) is a result too
            error = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
            reset_models(models)
        s = summarize(recipe, rec, setup_s, frames, base, error)
        if recipe == BASELINE:
            base = dict(s, frames=frames)
        elif recipe.split("#")[0] == BASELINE and base is not None and not error:
            # repeated baseline: ratios against the mean of its runs (GPU clocks drift as it heats)
            runs = base.setdefault("runs", [(base["s_per_step"], base["decode_s"])])
            runs.append((s["s_per_step"], s["decode_s"]))
            base["s_per_step"] = sum(r[0] for r in runs) / len(runs)
            base["decode_s"] = sum(r[1] for r in runs) / len(runs)
        log(rec.table())
        log(f"setup {setup_s if setup_s is None else round(setup_s, 2)} s; max abs diff {s.get('max_abs_diff')}; "
            f"allocated after reset {torch.cuda.memory_allocated(dev) / GIB if dev.type == 'cuda' else 0:.2f} GiB")
        results.append(s)
        del frames
        cleanup(dev)
    return results, base


def main(argv=None):
    ap = _arguments()
    args = ap.parse_args(argv)
    variant = M.V15 if args.variant == "1.5" else M.V10
    if args.tiny:
        cfg = M.transformer_config(variant, tiny=True)
        d_frames, d_h, d_w = M.default_size(variant, cfg)
    else:
        d_frames, d_h, d_w = variant.default_frames, variant.default_height, variant.default_width
    args.frames, args.height, args.width = args.frames or d_frames, args.height or d_h, args.width or d_w
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if dev.type == "cpu" else "bf16")]
    recipes = _recipes(ap, args.recipes)
    env = dict(provenance(card_name(dev)), device=str(dev), alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    log(f"# bench_memory: {variant.label} {args.frames}x{args.height}x{args.width}, {args.steps} steps, "
        f"{'tiny' if args.tiny else 'full-size'} random weights, {dtype}, {env}")

    models = Models(variant, args.tiny, dtype, dev)
    if dev.type == "cuda":
        models.warm_up()
    models.to_host()
    results, base = run_recipes(models, recipes, args, dev)
    out = table(results, base)
    if base is not None and "runs" in base:
        out += (f"\n\nratios are to the mean of {len(base['runs'])} {BASELINE} runs: s/step "
                + ", ".join(f"{r[0]:.3f}" for r in base["runs"]) + "; decode s "
                + ", ".join(f"{r[1]:.2f}" for r in base["runs"]))
    log("\n" + out)
    if args.json:
        write_json(args.json, dict(env=env, variant=variant.key, frames=args.frames, height=args.height,
                                   width=args.width, steps=args.steps, tiny=args.tiny, dtype=str(dtype),
                                   results=results, table=out), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
