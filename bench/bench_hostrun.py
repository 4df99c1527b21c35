"""Issue 12's targets in one script: host memory and speed of whole runs from safetensors files.

Per recipe (diffusers resident = the reference; ours through ``pipeline.generate`` with a profile or
``auto@GIB``, i.e. ``--profile auto --vram-budget GIB``): per stage peak anonymous + pinned host
memory and the file-backed share (report.StageRecorder), s/step (the last step, GPU synchronised at
each step end), load + first step (from the start of the run, before any weight is read, to the end
of the first denoise step: loads, text encode and image encode included on both sides), and the
ratios to the reference. Each recipe runs in its own child process: host memory is per process, and
a recipe's freed heap would otherwise count in the next one's peaks.

    python3 bench/bench_hostrun.py --dir /tmp/ck --write --steps 2 --json bench/hostrun_h200.json
    python3 bench/bench_hostrun.py --dir /tmp/ckt --write --tiny --device cpu     # CPU smoke run
    python3 bench/bench_hostrun.py --dir /tmp/ck --recipes ours-auto@6,ours-auto@6+cold   # RAM < model: from disk
    python3 bench/bench_hostrun.py --dir /tmp/ck --recipes diffusers-resident,ours-auto@6~fp8+compile  # a speed option
    python3 bench/bench_hostrun.py --dir /tmp/ck --variant 1.0 --write --recipes diffusers-resident,ours-auto@4

``RECIPE%N`` adds N random rank-64 LoRAs (attention and feed-forward of every block, strength 1).
``RECIPE~SPEED`` runs our RECIPE with the transformer's speed option SPEED (cogvid_core.speed.fast); the s/step
of the last step (compile warms up in the first). ``RECIPE^CACHE`` adds the step cache CACHE (``i2v --cache``:
e.g. ``ours-auto@6~fp8+fa3fp8+compile^fbc:0.2``); each row also has the whole denoise's seconds (first step's
start to the last step's end, GPU synchronised) and the full transformer passes that ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.run.report import StageRecorder  # noqa: E402
from bench.common.checkpoints import hf_checkpoints, shift_time_embedding  # noqa: E402
from bench.common.provenance import GIB, allocator_name, card_name, log, provenance, write_json  # noqa: E402
from bench.common.reference import PROMPT, fbc_probe, run_staged, start_image  # noqa: E402
from bench.common.clock import step_clock  # noqa: E402
from bench.common.sampling import TreeSampler  # noqa: E402
from bench.common.tables import fmt  # noqa: E402

RECIPES = ("diffusers-resident", "ours-auto@6", "ours-balanced")
BASELINE = "diffusers-resident"


def run_diffusers(folder: Path, args, rec: StageRecorder, device, image, mark) -> dict:
    from diffusers import CogVideoXImageToVideoPipeline

    with rec.stage("load"):
        pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(folder), torch_dtype=args.dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if not args.tiny:             # diffusers' documented recipe (its tiled encode breaks at tiny sizes)
        pipe.vae.enable_tiling()
    seen, hook = fbc_probe(pipe.transformer.transformer_blocks[0])
    run_staged(pipe, rec, image, frames=args.frames, height=args.height, width=args.width, steps=args.steps,
               cfg=args.cfg, seed=42, on_step=mark)
    hook.remove()
    return dict(fbc_metric_per_step=seen)


def run_ours(recipe: str, folder: Path, args, rec: StageRecorder, device, image, mark) -> dict:
    from cogvid_core.run import pipeline

    recipe, _, n_loras = recipe.partition("%")
    recipe, _, cache = recipe.partition("^")
    name, _, speed = recipe.removeprefix("ours-").partition("~")
    budget = float(name[5:]) if name.startswith("auto@") else None
    job = pipeline.Job(image=image, prompt=PROMPT, frames=args.frames, height=args.height, width=args.width,
                       steps=args.steps, cfg=args.cfg, seed=42, cache=cache or "none")
    sources = replace(pipeline.Sources.from_model(str(folder)), loras=_loras(folder, int(n_loras or 0), args))
    with _capture_profile() as chosen:
        res = pipeline.generate(sources, job, precision="bf16", device=device,
                                profile="auto" if budget else name, vram_budget_gib=budget, recorder=rec,
                                progress=lambda done, total: mark(), speed=speed or "exact")
    passes = res.cache.full_passes if res.cache is not None else 2 * args.steps * (args.cfg > 1)
    predicted = _predicted(chosen[-1] if chosen else name, sources, res, args, speed or "exact", cache or "none", device)
    return dict(predicted=predicted, profile=res.profile, speed=speed or "exact", cache=cache or "none", full_passes=passes,
                cache_line=res.cache.line() if res.cache is not None else "", settings=res.settings,
                host_estimate_gib={k: [o / GIB, f / GIB] for k, (o, f) in res.host_estimate.items()})


@contextmanager
def _capture_profile():
    """The Profiles the pipeline's planner returns (auto's pick, tile snapped), in the list it yields."""
    from cogvid_core.plan import planner
    seen, resolve = [], planner.resolve_profile

    def recording(*a, **k):
        seen.append(resolve(*a, **k))
        return seen[-1]
    planner.resolve_profile = recording
    try:
        yield seen
    finally:
        planner.resolve_profile = resolve


# recorder stage -> estimate stage
STAGE_OF = {"text encode": "text_encode", "image encode": "image_encode", "denoise": "denoise_step", "decode": "decode"}


def _predicted(profile, sources, res, args, speed: str, cache: str, device) -> dict:
    """What `estimate` says of each stage of the plan that ran (its profile, bf16, the speed option, the
    LoRAs' bytes, the cache; this card's calibration file, or the nearest one with the transfer margin):
    {stage: {"allocated_gib", "reserved_gib"}} plus the calibration it used."""
    from cogvid_core.model import lora
    from cogvid_core.plan.estimate import estimate
    from cogvid_core.speed import fast
    loras = tuple((lora.load_lora(path), float(strength)) for path, strength in sources.loras)
    lora_bytes = lora.lora_bytes(loras, args.dtype)
    est = estimate(res.variant, args.frames, args.height, args.width, profile,
                   {"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"}, tiny=args.tiny,
                   lora_bytes=lora_bytes, speed=fast.recipe(speed, device), cache=cache, device=device)
    out = {s.name: dict(allocated_gib=s.peak_allocated / GIB, reserved_gib=s.peak_reserved / GIB,
                        verdict_gib=est.stage_needed(s.name) / GIB) for s in est.stages}
    out["lora_bytes"] = lora_bytes
    out["allocator"] = allocator_name(device)   # the set the estimate used (this process's)
    out["calibration"] = est.calibration_source
    out["transfer_margin"] = est.transfer_margin
    return out


def estimate_rows(results: list[dict]) -> list[dict]:
    """Per recipe and stage: predicted against measured GPU allocated / reserved peaks, error in % of the
    measurement (positive: the estimate is above)."""
    rows = []
    for r in results:
        pred = r.get("predicted")
        if not pred or r.get("error"):
            continue
        for st in r["stages"]:
            key = STAGE_OF.get(st["stage"])
            if key is None or key not in pred or st.get("peak_alloc_gib") is None:
                continue
            p, a, res_ = pred[key], st["peak_alloc_gib"], st["peak_reserved_gib"]
            rows.append(dict(recipe=r["recipe"], profile=r.get("profile"), stage=key,
                             allocated_gib=[p["allocated_gib"], a], reserved_gib=[p["reserved_gib"], res_],
                             verdict_gib=p["verdict_gib"], safe=res_ is None or res_ <= p["verdict_gib"],
                             allocated_err_pct=100 * (p["allocated_gib"] / a - 1) if a else None,
                             reserved_err_pct=100 * (p["reserved_gib"] / res_ - 1) if res_ else None))
    return rows


def estimate_table(rows: list[dict]) -> str:
    f = fmt
    lines = ["| recipe (profile) | stage | allocated GiB est / measured | err % | reserved GiB est / measured | err % "
             "| verdict asks GiB | safe |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (pa, ma), (pr, mr) = r["allocated_gib"], r["reserved_gib"]
        lines.append(f"| {r['recipe']} ({r['profile']}) | {r['stage']} | {f(pa)} / {f(ma)} | "
                     f"{f(r['allocated_err_pct'], '+.1f')} | {f(pr)} / {f(mr)} | {f(r['reserved_err_pct'], '+.1f')} | "
                     f"{f(r['verdict_gib'])} | {'yes' if r['safe'] else '**NO**'} |")
    return "\n".join(lines)


def _loras(folder: Path, n: int, args) -> tuple:
    """``n`` random rank-64 LoRAs on every block's attention and feed-forward (bf16, the variant's own
    layout), written beside the checkpoint once; strength 1."""
    from cogvid_core.model import testing
    key = M.V15.key if args.variant == "1.5" else M.V10.key
    paths = []
    for i in range(n):
        path = folder.parent / "loras" / f"{folder.name}-rank64-{i}.safetensors"
        if not path.exists():
            testing.write_lora(path, key, rank=64, seed=i, tiny=args.tiny, dtype=args.dtype)
        paths.append((str(path), 1.0))
    return tuple(paths)


def cold_cache(folder: Path) -> None:
    """Emulate a machine whose RAM cannot keep the checkpoint files: drop them from the page cache now
    and drop every range filestream reads (fileread) right after reading it, so each use reads from the disk."""
    from cogvid_core.memory import fileread

    for f in folder.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    read = fileread._pread_into

    def read_then_drop(fd, dst, offset, name):
        read(fd, dst, offset, name)
        os.posix_fadvise(fd, offset, dst.numel() * dst.element_size(), os.POSIX_FADV_DONTNEED)
    fileread._pread_into = read_then_drop


def child(recipe: str, args) -> dict:
    """One recipe in this process; returns its result row. ``RECIPE+cold``: RECIPE with the checkpoint
    never in the page cache (see cold_cache)."""
    name = recipe
    if recipe.endswith("+cold"):
        cold_cache(args.dir_model)
        recipe = recipe.removesuffix("+cold")

    device = torch.device(args.device)
    image = start_image(args.height, args.width)
    rec = StageRecorder(device)
    marks, mark = step_clock(device)
    t0 = time.perf_counter()
    extra = {}
    if recipe == BASELINE:
        extra = run_diffusers(args.dir_model, args, rec, device, image, mark)
    else:
        extra = run_ours(recipe, args.dir_model, args, rec, device, image, mark)
    rows = rec.rows()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    denoise = next((r for r in rows if r["stage"] == "denoise"), {})
    return dict(recipe=name, stages=rows, total=rec.total(), step_ends_s=[m - t0 for m in marks],
                s_per_step=steps[-1] if steps else None, denoise_s=denoise.get("seconds"),
                denoise_peak_reserved_gib=denoise.get("peak_reserved_gib"),
                load_plus_first_s=marks[0] - t0 if marks else None,
                first_step_s=denoise["seconds"] - (marks[-1] - marks[0]) if marks and denoise.get("seconds") else None,
                host_peak_anon_pinned_gib=max((r["host_peak_anon_pinned_gib"] or 0) for r in rows),
                host_peak_file_gib=max((r["host_peak_file_gib"] or 0) for r in rows), **extra)


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["recipe"] == BASELINE and not r.get("error")), None)

    f = fmt

    def ratio(r, key):
        return f(r.get(key) / base[key], ".3f") if base and r.get(key) and base.get(key) else "-"
    lines = ["| recipe | host anon+pinned GiB per stage | peak | estimated peak | file-backed peak GiB | s/step | "
             "x ref | load + 1st step s | x ref | 1st step s | denoise s | x ref | full passes | denoise reserved GiB | "
             "process tree anon+shmem peak GiB (processes) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            last = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
            lines.append(f"| {r['recipe']} | FAILED: {last[:160]} | | | | | | | | | | | | | |")
            continue
        per = ", ".join(f"{s['stage']} {f(s['host_peak_anon_pinned_gib'])}" for s in r["stages"])
        est = max((o for o, _ in r.get("host_estimate_gib", {}).values()), default=None)   # hostplan, GPU runs
        lines.append(f"| {r['recipe']}{' (' + r['profile'] + ')' if r.get('profile') else ''} | {per} | "
                     f"{f(r['host_peak_anon_pinned_gib'])} | {f(est)} | {f(r['host_peak_file_gib'])} | {f(r['s_per_step'])} | "
                     f"{ratio(r, 's_per_step')} | {f(r['load_plus_first_s'], '.1f')} | {ratio(r, 'load_plus_first_s')} | "
                     f"{f(r.get('first_step_s'), '.1f')} | {f(r.get('denoise_s'), '.1f')} | {ratio(r, 'denoise_s')} | "
                     f"{r.get('full_passes', '-')} | {f(r.get('denoise_peak_reserved_gib'))} | "
                     f"{f(r.get('tree_peak_anon_shmem_gib'))} ({r.get('tree_procs_at_peak', '-')}) |")
    return "\n".join(lines)


def _child_args(argv: list) -> list:
    """The parent's arguments a child needs (not --write, not --baseline-from and its value)."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--write" or a.startswith("--baseline-from"):
            skip = a == "--baseline-from"
            continue
        out.append(a)
    return out


def _child_env(args) -> dict:
    env = dict(os.environ)
    if args.compile_cache:
        env["COGVID_COMPILE_CACHE"] = str(args.compile_cache)
    if args.fresh_inductor_cache:        # as after a reboot or on another machine: only our file carries over
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    return env


def _run_child(cmd: list, recipe: str, args) -> dict:
    """The recipe's child process, its host memory summed over its process tree (compile workers)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(args))
    tree = TreeSampler(p.pid)
    tree.start()
    try:
        out, err = p.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        tree.stop()
        return dict(recipe=recipe, error=f"timed out after {args.timeout:.0f} s")
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    row = json.loads(line[7:]) if line else dict(recipe=recipe, error=(err or out)[-600:])
    row.update(tree.stop())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="checkpoint root (CogVideoX1.5-5B-I2V/ inside)")
    ap.add_argument("--variant", choices=("1.5", "1.0"), default="1.5")
    ap.add_argument("--write", action="store_true", help="write random checkpoints of the variant there first if missing")
    ap.add_argument("--tiny", action="store_true", help="tiny checkpoints and size (CPU smoke run)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per recipe")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--budget-s", type=float, help="start no recipe after this many seconds (the JSON says which)")
    ap.add_argument("--baseline-from", type=Path, help="take the diffusers-resident row from this earlier JSON "
                    "(same card, same checkpoints: a 50-step 1.5 reference and our recipes do not fit one command)")
    ap.add_argument("--compile-cache", type=Path, help="COGVID_COMPILE_CACHE for every recipe (speed 'compile' "
                    "keeps its kernels there: the second run of a compiled recipe is a restart)")
    ap.add_argument("--fresh-inductor-cache", action="store_true", help="each recipe gets an empty inductor cache "
                    "(torch's own /tmp cache would otherwise carry compiled kernels from one recipe to the next)")
    ap.add_argument("--time-embedding-shift", type=float, default=None,
                    help="set the transformer file's time-embedding bias this far above its written random values "
                         "(teacache mechanism rows: 1.25 brings random weights' per-step change to 6-8%%; 0 undoes "
                         "it); not the trained weights' skips")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    v = M.V15 if args.variant == "1.5" else M.V10
    d = M.default_size(v, M.transformer_config(v, tiny=True)) if args.tiny else \
        (v.default_frames, v.default_height, v.default_width)
    args.frames, args.height, args.width = args.frames or d[0], args.height or d[1], args.width or d[2]
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.child:
        args.dir_model = args.dir / v.folder
        print("RESULT " + json.dumps(child(args.child, args), default=str), flush=True)
        return 0
    folder = hf_checkpoints(args.dir, v.key, full=not args.tiny) if args.write else args.dir / v.folder
    if args.time_embedding_shift is not None:
        shift_time_embedding(folder, args.time_embedding_shift)
    log(f"# bench_hostrun: {folder}, {args.frames}x{args.height}x{args.width}, {args.steps} steps, {args.device}")
    results = []
    if args.baseline_from:
        old = json.loads(args.baseline_from.read_text())
        row = next(r for r in old["results"] if r["recipe"] == BASELINE and not r.get("error"))
        results.append(dict(row, taken_from=str(args.baseline_from)))
        assert old["steps"] == args.steps and old["frames"] == args.frames, "baseline made for another run"
    t_start = time.perf_counter()
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            log(f"## {recipe}: not started, past --budget-s {args.budget_s:.0f}")
            results.append(dict(recipe=recipe, error="not started (budget)"))
            continue
        cmd = [sys.executable, __file__, "--child", recipe, *_child_args(argv or sys.argv[1:])]
        t0 = time.perf_counter()
        row = _run_child(cmd, recipe, args)
        row["wall_s"] = time.perf_counter() - t0
        log(f"## {recipe}: {row['wall_s']:.0f} s" + (f" ERROR {row['error']}" if row.get("error") else ""))
        results.append(row)
    out = table(results)
    log(out)
    est_rows = estimate_rows(results)
    if est_rows:
        log(estimate_table(est_rows))
    if args.json:
        env = dict(provenance(card_name(args.device) if args.device.startswith("cuda") else "cpu"), device=args.device,
                   time_embedding_shift=args.time_embedding_shift)
        write_json(args.json, dict(env=env, frames=args.frames, height=args.height, width=args.width,
                                   steps=args.steps, results=results, table=out,
                                   estimate_rows=est_rows), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
