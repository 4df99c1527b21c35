"""Step caches (cogvid_core.speed.caches) beside diffusers' pipeline with the same hook, whole denoise.

    python bench/bench_caches.py --variant cogvideox1.5-5b-i2v --steps 50 --caches none,fbc
    python bench/bench_caches.py --variant cogvideox-5b-i2v --steps 50 --caches none,fbc,pab,fastercache
    python bench/bench_caches.py --tiny --device cpu --steps 4          # the code path, seconds

On the GPU machine carry .whl (diffusers + importlib_metadata) and install as bench/bench_speed.py says.
Random bf16 weights built on the GPU (full size), one transformer shared by both sides. Per cache:

* diffusers: CogVideoXImageToVideoPipeline (random VAE for the start frame, its one-frame encode inside the
  timed call; prompt embeddings given,
  output_type latent) with ``transformer.enable_cache(config)`` (the config our name stands for);
* ours: sampling.sample with ``cache=NAME`` in the given ``--cfg-mode`` and ``--speed``.
Denoise seconds (synchronised, the whole loop), full transformer passes (branch block runs / layers,
ours from CacheStats; diffusers' from a counter on its last block), peak GPU memory (torch allocated and
reserved; NVML whole-process when pynvml is there), host RSS peak, and the final-latent relative L2 of
each side against its own uncached run ("not a quality measure": random weights).
"""
from __future__ import annotations

import argparse
import logging
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvid_core.model import loading, testing                 # noqa: E402
from bench.common.clock import step_clock                      # noqa: E402
from bench.common.imports import imported_since                # noqa: E402
from bench.common.sampling import TreeSampler                  # noqa: E402
from cogvid_core.model import variants as M                    # noqa: E402
from cogvid_core.run import sampling                           # noqa: E402
from cogvid_core.speed import caches, fast                     # noqa: E402
from bench.common.reference import fbc_probe                  # noqa: E402
from bench.common.provenance import default_out  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="cogvideox1.5-5b-i2v", choices=sorted(M.VARIANTS))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--caches", default="none,fbc,pab,fastercache", help="comma-separated cache names (none first)")
    p.add_argument("--speed", default="exact", help="our speed option (fast.CHOICES), e.g. fp8+fa3fp8+compile")
    p.add_argument("--cfg-mode", default="batched", choices=["batched", "sequential"], help="ours (sequential: "
                   "the small profiles' one-branch CFG)")
    p.add_argument("--sides", default="diffusers,ours", help="which sides run (one 1.5 run of 50 steps is ~400 s on an "
                   "H100: run each side in its own command on the same warm machine)")
    p.add_argument("--ref", type=Path, help="diffusers' uncached run (final latent, seconds) saved here when it runs, "
                   "read from here when it does not: a 50-step 1.5 reference and our runs do not fit one command; "
                   "the random weights are the same in every process (seeded, built on the same card)")
    p.add_argument("--ref-json", type=Path, help="an earlier run's JSON (e.g. bench/caches15_diffusers_h100.json): "
                   "its diffusers rows (seconds, passes, memory) are the reference; same card, shape and steps "
                   "required; no latent, so no latent distance to diffusers")
    p.add_argument("--out", type=Path, help="JSON (default $OUT/caches.json, else bench/caches_local.json)")
    p.add_argument("--profile-steps", default="", help="ours: torch.profiler over these steps (1-based, comma-"
                   "separated, e.g. 3,4: a computed and a skipped TeaCache step); the top ops go into the row")
    p.add_argument("--time-embedding-shift", type=float, default=0.0,
                   help="add this to the time embedding's output bias (teacache mechanism rows: random weights' "
                        "embedding changes ~50%% a step, far outside the authors' fitted range; 5 brings it to a "
                        "few percent, so teacache both skips and computes; not the trained weights' skips)")
    return p.parse_args(argv)


class Peaks:
    """Peak GPU (torch, NVML) and host RSS over a block."""

    def __init__(self, device):
        self.device = device
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:                                   # noqa: BLE001  (no NVML: torch figures only)
            self.nvml = None

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tree = TreeSampler(os.getpid())       # this process and its compile workers
        self.tree.start()
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        out = self.tree.stop()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out.update(peak_alloc_gib=torch.cuda.max_memory_allocated(self.device) / 2 ** 30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved(self.device) / 2 ** 30)
            if self.nvml:
                lib, h = self.nvml
                out["nvml_used_gib_after"] = lib.nvmlDeviceGetMemoryInfo(h).used / 2 ** 30
        out["seconds"] = time.perf_counter() - self.t0
        out["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return out


def build(args):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    v = M.VARIANTS[args.variant]
    tr = testing.build_random("transformer", v, args.tiny, dtype, device)
    if args.time_embedding_shift:
        with torch.no_grad():
            tr.time_embedding.linear_2.bias.add_(args.time_embedding_shift)
    vae = testing.build_random("vae", v, args.tiny, dtype, device)
    cfg = tr.config
    frames, h, w = M.default_size(v, dict(cfg))
    gen = torch.Generator("cpu").manual_seed(0)
    text = (1, cfg.max_text_seq_length, cfg.text_embed_dim)
    pos, neg = (torch.randn(text, generator=gen).to(device, dtype) for _ in range(2))
    image = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
    return dict(device=device, dtype=dtype, variant=v, tr=tr, vae=vae, frames=frames, h=h, w=w, pos=pos, neg=neg,
                image=image)


def _tail_counter(tr):
    runs = [0]
    h = tr.transformer_blocks[-1].norm1.register_forward_pre_hook(lambda m, a: runs.__setitem__(0, runs[0] + a[0].shape[0]))
    return runs, h


def _step_times(t0: float, marks: list) -> dict:
    ends = [t0, *marks]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    later = sorted(steps[1:])
    return dict(step_s=steps, median_later_step_s=later[len(later) // 2] if later else None)


def run_diffusers(s, spec, steps, peaks):
    from diffusers import CogVideoXImageToVideoPipeline
    tr = s["tr"]
    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=s["vae"], transformer=tr,
                                         scheduler=loading.load_scheduler(None, "dpm"))
    pipe.set_progress_bar_config(disable=True)
    runs, h = _tail_counter(tr)
    seen, probe = fbc_probe(tr.transformer_blocks[0])
    if caches.parse(spec).on:
        tr.enable_cache(caches.diffusers_config(spec, lambda: pipe.current_timestep))
    marks, mark = step_clock(s["device"], echo=True)
    peaks.start()
    try:
        out = pipe(image=s["image"].to(s["device"], s["dtype"]), prompt_embeds=s["pos"], negative_prompt_embeds=s["neg"],
                   height=s["h"], width=s["w"], num_frames=s["frames"], num_inference_steps=steps, guidance_scale=6.0,
                   use_dynamic_cfg=True, generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
                   callback_on_step_end=lambda *a: mark()).frames
        row = peaks.stop()
        row.update(_step_times(peaks.t0, marks))
    finally:
        if tr.is_cache_enabled:
            tr.disable_cache()
        h.remove()
        probe.remove()
    row.update(side="diffusers", cache=spec, full_passes=runs[0], fbc_metric_per_step=seen)
    return row, out.float().cpu()


_BYPASSES: list = []     # AOTAutograd's reasons for not caching a graph (it logs them at INFO)


class _BypassLog(logging.Handler):
    def emit(self, record):
        if "Bypassing autograd cache" in record.getMessage():
            _BYPASSES.append(record.getMessage()[:300])
            print(_BYPASSES[-1], file=sys.stderr, flush=True)


_aot_log = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
_aot_log.addHandler(_BypassLog(logging.INFO))
_aot_log.setLevel(logging.INFO)


class StepProfiler:
    """A progress callback: ``mark`` (the step clock) after every step, and torch.profiler over each
    step named in ``which`` ("3,4": 1-based), whose top ops by self CPU and by device time it keeps
    as text in ``tables`` (what a step spends outside the transformer blocks shows there)."""

    def __init__(self, which: str, mark):
        self.steps = {int(x) for x in which.split(",") if x.strip()}
        self.mark, self.tables, self._prof = mark, {}, None
        self.step1_modules, self._modules = None, None

    def begin(self):
        """Before the loop: step 1 (a restart's first step: its compile-cache loads and first kernel
        launches) has no callback ahead of it. The modules loaded so far are noted: what the first step
        imports (a process's first compile imports dynamo's, inductor's and their dependencies' modules:
        403 on torch 2.13, 0.03-0.84 s of a 2-core CPU's first step: bench_first_compile.py) goes into the row."""
        self._modules = set(sys.modules)
        if 1 in self.steps:
            self._start()

    def _start(self):
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts)
        self._prof.__enter__()

    def __call__(self, done, total):
        self.mark(done, total)
        if done == 1 and self._modules is not None:
            self.step1_modules = imported_since(self._modules)
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            avg = self._prof.key_averages()
            device = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            # by_cpu_total: the enclosing regions (compile's dynamo_timed phases, compiled-region calls)
            self.tables[str(done)] = {"by_self_cpu": avg.table(sort_by="self_cpu_time_total", row_limit=25),
                                      "by_cpu_total": avg.table(sort_by="cpu_time_total", row_limit=25),
                                      "by_device": avg.table(sort_by=device, row_limit=25)}
            for name, table in self.tables[str(done)].items():      # in the log too: a run cut short keeps them
                print(f"profile of step {done}, {name}:\n{table}", file=sys.stderr, flush=True)
            self._prof = None
        if done + 1 in self.steps:
            self._start()


def run_ours(s, spec, steps, args, peaks):
    from cogvid_core.model.vae import encode_image
    with torch.no_grad():
        latent = s.setdefault("latent", encode_image(s["vae"], ((s["image"][0] + 1) / 2).permute(1, 2, 0),
                                                      s["h"], s["w"], s["variant"], "crop", s["device"]))
    stats = []
    marks, mark = step_clock(s["device"], echo=True)
    profiled = StepProfiler(args.profile_steps, mark)
    with fast.applied(s["tr"], args.speed, s["device"]) as ran, torch.inference_mode():
        peaks.start()
        profiled.begin()
        out = sampling.sample(s["tr"], s["variant"], s["pos"], s["neg"], latent, s["frames"], steps=steps, cfg=6.0,
                              seed=42, device=s["device"], dtype=s["dtype"], cfg_mode=args.cfg_mode, cache=spec,
                              cache_stats=stats, progress=profiled)
        row = peaks.stop()
        row.update(_step_times(peaks.t0, marks))
    row.update(side="ours", cache=spec, speed=args.speed, speed_ran=ran.name, cfg_mode=args.cfg_mode,
               full_passes=stats[0].full_passes if stats else 2 * steps, stats=stats[0].line() if stats else "")
    if profiled.tables:
        row["profile"] = profiled.tables
    row["step1_new_modules"] = profiled.step1_modules
    if "compile" in ran.name:      # where a (re)start's first step goes: dynamo's trace, inductor, cache loads
        from torch._dynamo.utils import counters
        names, secs = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
        row["compile_times_s"] = {n: round(float(v), 3) for n, v in zip(names, secs) if float(v) >= 0.05}
        # which of torch's caches served the graphs (a restart should hit both), and why AOTAutograd's did not
        row["compile_cache_counters"] = {**{f"aot_autograd.{k}": v for k, v in counters["aot_autograd"].items()},
                                         **{f"inductor.{k}": v for k, v in counters["inductor"].items()
                                            if "cache" in k}}
        row["aot_cache_bypass_reasons"] = sorted(set(_BYPASSES))[:10]
    return row, out.samples.float()


def rel_l2(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def run_all(args) -> dict:
    s = build(args)
    peaks = Peaks(s["device"])
    rows, base = [], {}
    if args.ref and args.ref.exists() and "diffusers" not in args.sides.split(","):
        saved = torch.load(args.ref)
        base["diffusers"] = saved["latent"]
        rows.append(dict(saved["row"], taken_from=str(args.ref)))
    if args.ref_json:
        rows += reference_rows(args.ref_json, _env(s, args))
    for spec in args.caches.split(","):
        for side in args.sides.split(","):
            try:
                row, lat = run_diffusers(s, spec, args.steps, peaks) if side == "diffusers" else \
                    run_ours(s, spec, args.steps, args, peaks)
            except (ValueError, torch.cuda.OutOfMemoryError) as e:
                rows.append(dict(side=side, cache=spec, error=str(e)[:300]))
                continue
            if spec == "none":
                base.setdefault(side, lat)
            if side == "diffusers" and spec == "none" and args.ref:
                args.ref.parent.mkdir(parents=True, exist_ok=True)
                torch.save(dict(latent=lat, row=row), args.ref)
            if side in base:
                row["final_latent_rel_l2_vs_uncached"] = rel_l2(lat, base[side])
            if side == "ours" and "diffusers" in base:
                row["final_latent_rel_l2_vs_diffusers_uncached"] = rel_l2(lat, base["diffusers"])
            rows.append(row)
            print(table_line(row), flush=True)
    ref = {r["cache"]: r["seconds"] for r in rows if r.get("side") == "diffusers" and "seconds" in r}
    for r in rows:
        if "seconds" in r and ref.get("none"):
            r["x_diffusers_uncached"] = r["seconds"] / ref["none"]
    return dict(rows=rows, env=_env(s, args))


def reference_rows(path: Path, env: dict) -> list[dict]:
    """The diffusers rows of an earlier run of the same shape, card and steps (refused otherwise)."""
    old = json.loads(path.read_text())
    keys = ("card", "variant", "frames", "height", "width", "steps")
    differ = [f"{k}: {old['env'].get(k)} there, {env[k]} here" for k in keys if old["env"].get(k) != env[k]]
    if differ:
        raise SystemExit(f"--ref-json {path} is not this run's reference ({'; '.join(differ)})")
    return [dict(r, taken_from=str(path), taken_on=old["env"].get("date")) for r in old["rows"]
            if r.get("side") == "diffusers" and "seconds" in r]


def _env(s, args) -> dict:
    import diffusers
    dev = s["device"]
    return dict(card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                diffusers=diffusers.__version__, variant=s["variant"].key, frames=s["frames"], height=s["h"],
                width=s["w"], steps=args.steps, tiny=bool(args.tiny), speed=args.speed, cfg_mode=args.cfg_mode,
                time_embedding_shift=args.time_embedding_shift,
                note="final-latent differences on random weights are not a quality measure",
                environment={k: os.environ[k] for k in ("COGVID_COMPILE_CACHE", "TORCHINDUCTOR_COMPILE_THREADS",
                                                         "TORCHINDUCTOR_CACHE_DIR", "COGVID_EMULATE_CC") if k in os.environ})


HEADER = ("| side | cache | denoise s | x diffusers uncached | full passes | peak alloc / reserved GiB | host RSS GiB | "
          "latent rel L2 vs uncached (own side, else diffusers') |\n|---|---|---|---|---|---|---|---|")


def table_line(r: dict) -> str:
    if "error" in r:
        return f"| {r['side']} | {r['cache']} | {r['error']} | | | | | |"
    gpu = f"{r.get('peak_alloc_gib', 0):.2f} / {r.get('peak_reserved_gib', 0):.2f}"
    ratio = f"{r['x_diffusers_uncached']:.3f}" if "x_diffusers_uncached" in r else "-"
    l2 = r.get("final_latent_rel_l2_vs_uncached", r.get("final_latent_rel_l2_vs_diffusers_uncached"))
    side = f"{r['side']} {r['speed']}" if r.get("speed", "exact") != "exact" else r["side"]
    return (f"| {side} | {r['cache']} | {r['seconds']:.1f} | {ratio} | {r['full_passes']:g} | {gpu} | "
            f"{r['host_peak_rss_gib']:.2f} | {'-' if l2 is None else format(l2, '.2e')} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    data = run_all(args)
    data["env"].update(command=" ".join([sys.executable, *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    out = args.out or default_out("caches")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    e = data["env"]
    print(f"\n{e['card']}, torch {e['torch']}, diffusers {e['diffusers']}, {e['variant']} "
          f"{e['frames']}x{e['height']}x{e['width']}, {e['steps']} steps, ours: {e['speed']}, CFG {e['cfg_mode']}\n")
    print(HEADER)
    for r in data["rows"]:
        print(table_line(r))
    print(f"\n({e['note']})\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
