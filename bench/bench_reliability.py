"""GPU check of cancel and soak (issue 5): what a run leaves behind on the GPU and in host RAM.

1. Cancel: for each variant, stage (text encode, denoise, decode) and profile, a run through
   ``pipeline.generate`` is interrupted the first time that stage's model runs (the interrupt
   callable is what the ComfyUI nodes pass: it raises at the next check). Reported: model calls
   made in the stage (a stop "within one step" is 1 call, 2 with one-branch-at-a-time CFG),
   seconds from the first call to the stop, and GPU memory allocated / reserved (after
   ``empty_cache``) before the run and after the exception is handled.
2. Nodes: the same cancel through the ComfyUI nodes (the test suite's ComfyUI stub, its device set
   to this GPU, ``interrupt_processing`` as ComfyUI's Cancel sets it), then "Unload models".
3. Soak: 20 consecutive runs alternating variants, sizes, profiles and CFG in one process; after
   each run: host RSS (after malloc_trim), GPU allocated and reserved.

Checkpoints are written by ``cogvid_core.model.testing`` in the HF layout at full widths but a few blocks
(``--layers``): every tensor shape, kernel and activation of a block is the real one, the files are
~3 GB per variant instead of 21 GB. Leaks depend on code paths, not on depth.

    python bench/bench_reliability.py --out bench/reliability_h100.json      # on the GPU
    python bench/bench_reliability.py --tiny --device cpu                   # same path in seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cogvid_core.device import devmem  # noqa: E402
from cogvid_core.run import pipeline  # noqa: E402
from cogvid_core.run import session  # noqa: E402
from bench.common.checkpoints import hf_checkpoints  # noqa: E402
from bench.common.provenance import card_name, log, provenance, write_json  # noqa: E402

V10, V15 = "cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"
MIB = 2 ** 20
STAGES = ("text_encode", "denoise", "decode")
REAL_EMPTY_HOST_CACHE = devmem.empty_host_cache    # --keep-host-cache replaces guard's


class Cancelled(Exception):
    pass


def host_pinned(device) -> dict:
    """torch's pinned host allocator: bytes in use / held (its cache included), where torch reports them.

    Judge pinned memory by ``allocated_bytes.current`` (what the allocator holds from the driver) or
    RssShmem (where cudaHostAlloc'd pages show up), never ``active_bytes.current``: in torch 2.11 that
    statistic is not decremented when a cached block is handed back by ``empty_host_cache``, so it
    climbs by each released block while the memory is gone (bench/hostmem_h200_run1.json "diag":
    1 GiB pinned, freed and released leaves active 1.0 GiB, allocated 0 and RssShmem back at 0.008;
    the soak's 63 -> 101 GB was that drift, RSS flat)."""
    try:
        st = torch.cuda.host_memory_stats() if device.type == "cuda" else {}
    except (RuntimeError, AttributeError):
        return {}
    return {k: v / MIB for k, v in st.items() if k.endswith(".current") and "bytes" in k}


def gpu(device) -> tuple[int, int]:
    """(allocated, reserved) bytes after gc and empty_cache; (0, 0) on CPU."""
    gc.collect()
    if device.type != "cuda":
        return 0, 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return devmem.allocated_bytes(device), int(torch.cuda.memory_reserved(device))


def stage_class(stage):
    if stage == "text_encode":
        from transformers import T5EncoderModel
        return T5EncoderModel
    if stage == "denoise":
        from diffusers import CogVideoXTransformer3DModel
        return CogVideoXTransformer3DModel
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXDecoder3D
    return CogVideoXDecoder3D   # one call per temporal chunk of one tile


class StageWatch:
    """Counts a stage's model calls; ``armed`` makes the interrupt raise once the stage has begun."""

    def __init__(self, stage):
        self.cls, self.calls, self.first = stage_class(stage), 0, None
        self.real = self.cls.forward
        watch = self

        def counting(module, *a, **k):
            watch.calls += 1
            if watch.first is None:
                watch.first = time.perf_counter()
            return watch.real(module, *a, **k)
        self.cls.forward = counting

    def interrupt(self):
        if self.calls:
            raise Cancelled()

    def close(self):
        self.cls.forward = self.real


# ------------------------------------------------------------------------------- 1. engine cancel
def job(frames, height, width, cfg=6.0, steps=3, seed=0, image=None):
    return pipeline.Job(image=image, prompt="a small red boat moves over the river, camera pans",
                        negative_prompt="blurry", frames=frames, height=height, width=width, steps=steps,
                        cfg=cfg, seed=seed)


def cancel_engine(ckpts, sizes, device, profiles, image):
    rows = []
    for key in (V10, V15):
        frames, h, w = sizes[key][0]
        for profile in profiles:
            for stage in STAGES:
                before = gpu(device)
                watch = StageWatch(stage)
                stopped, t0 = None, time.perf_counter()
                try:
                    pipeline.generate(pipeline.Sources.from_model(str(ckpts[key])),
                                      job(frames, h, w, image=image), precision=ckpts["precision"],
                                      device=device, profile=profile, interrupt=watch.interrupt)
                except Cancelled:
                    stopped = time.perf_counter()
                finally:
                    watch.close()
                after = gpu(device)
                row = dict(variant=key, profile=profile, stage=stage, frames=frames, height=h, width=w,
                           cancelled=stopped is not None, calls=watch.calls,
                           stop_s=round(stopped - watch.first, 3) if stopped and watch.first else None,
                           run_s=round(time.perf_counter() - t0, 2),
                           alloc_before_mib=before[0] / MIB, alloc_after_mib=after[0] / MIB,
                           reserved_before_mib=before[1] / MIB, reserved_after_mib=after[1] / MIB)
                row["ok"] = row["cancelled"] and after[0] == before[0]
                rows.append(row)
                log(f"cancel {key} {profile:9s} {stage:11s} calls {watch.calls} stop {row['stop_s']}s "
                    f"alloc {row['alloc_before_mib']:.1f} -> {row['alloc_after_mib']:.1f} MiB "
                    f"reserved {row['reserved_before_mib']:.1f} -> {row['reserved_after_mib']:.1f} MiB "
                    f"{'OK' if row['ok'] else 'FAIL'}")
    return rows


# ------------------------------------------------------------------------------- 2. node cancel
def cancel_nodes(ckpts, sizes, device, precision):
    """The ComfyUI graph (loaders -> encode -> sampler -> decode) cancelled in each stage."""
    sys.path.insert(0, str(REPO / "tests"))
    import comfy_stub
    from test_nodes import load_pack, run

    root = Path(tempfile.mkdtemp(prefix="cogvid_nodes_"))
    (root / "models" / "CogVideo").mkdir(parents=True)
    (root / "output").mkdir()
    for key in (V10, V15):
        os.symlink(ckpts[key], root / "models" / "CogVideo" / Path(ckpts[key]).name)
    mods = comfy_stub.install(str(root))
    mm = mods["comfy.model_management"]
    mm.get_torch_device = lambda: device
    nodes = load_pack("cogvid_bench_reliability")
    rows = []
    try:
        for key in (V10, V15):
            frames, h, w = sizes[key][0]
            for stage in STAGES:
                before = gpu(device)
                kw = dict(precision=precision, placement="auto", device="auto")
                model = f"CogVideo/{Path(ckpts[key]).name}"
                tr = run(nodes["CogVidTransformerLoader"], model=model, **kw)[0]
                t5 = run(nodes["CogVidT5Loader"], model=model, **kw)[0]
                vae = run(nodes["CogVidVAELoader"], model=model, **kw)[0]
                watch = StageWatch(stage)
                real_check = mm.throw_exception_if_processing_interrupted

                def check():
                    if watch.calls:                 # the user pressed Cancel once the stage began
                        mm.interrupt_processing = True
                    real_check()
                mm.throw_exception_if_processing_interrupted = check
                cancelled = False
                try:
                    cond = run(nodes["CogVidTextEncode"], t5=t5, positive="a red boat", negative="blurry")[0]
                    image = torch.rand(1, h, w, 3)
                    lat = run(nodes["CogVidImageEncode"], vae=vae, image=image, width=w, height=h, resize="crop")[0]
                    latent = run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat,
                                 frames=frames, steps=3, cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=0)[0]
                    run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="auto", overlap=0.1667)
                except comfy_stub.InterruptProcessingException:
                    cancelled = True
                finally:
                    watch.close()
                    mm.throw_exception_if_processing_interrupted = real_check
                    mm.interrupt_processing = False
                cached = gpu(device)                # what ComfyUI keeps loaded for the next prompt
                mm.unload_all_models()              # "Unload models" / POST /free
                mm.calls.clear()                    # the stub's call log holds the patchers
                del tr, t5, vae
                after = gpu(device)
                live = sum(isinstance(o, session.Component) for o in gc.get_objects())
                row = dict(variant=key, stage=stage, cancelled=cancelled, calls=watch.calls, live_components=live,
                           alloc_before_mib=before[0] / MIB, alloc_cached_mib=cached[0] / MIB,
                           alloc_after_unload_mib=after[0] / MIB, reserved_after_unload_mib=after[1] / MIB)
                row["ok"] = cancelled and after[0] == before[0] and live == 0
                rows.append(row)
                log(f"nodes  live components {live}")
                log(f"nodes  {key} {stage:11s} calls {watch.calls} alloc {row['alloc_before_mib']:.1f} -> "
                    f"{row['alloc_cached_mib']:.1f} (cached) -> {row['alloc_after_unload_mib']:.1f} MiB after unload "
                    f"{'OK' if row['ok'] else 'FAIL'}")
    finally:
        comfy_stub.uninstall()
    return rows


# ------------------------------------------------------------------------------- 3. soak
def soak(ckpts, sizes, device, profiles, image, n=20):
    runs = [(V15, 0), (V10, 0), (V15, 1), (V10, 1), (V15, 2)]
    rows, base, rss_before = [], gpu(device), devmem.host_rss_bytes()
    for i in range(n):
        key, s = runs[i % len(runs)]
        frames, h, w = sizes[key][s % len(sizes[key])]
        profile = profiles[i % len(profiles)]
        cfg = 6.0 if i % 2 == 0 else 1.0
        t0 = time.perf_counter()
        res = pipeline.generate(pipeline.Sources.from_model(str(ckpts[key])),
                                job(frames, h, w, cfg=cfg, steps=2, seed=i, image=image),
                                precision=ckpts["precision"], device=device, profile=profile)
        finite = bool(torch.isfinite(res.frames).all())
        del res
        alloc, reserved = gpu(device)
        rows.append(dict(run=i + 1, variant=key, frames=frames, height=h, width=w, profile=profile, cfg=cfg,
                         seconds=round(time.perf_counter() - t0, 2), finite=finite,
                         rss_mib=devmem.host_rss_bytes() / MIB,
                         alloc_mib=alloc / MIB, reserved_mib=reserved / MIB, host_pinned_mib=host_pinned(device),
                         shmem_mib=devmem.host_memory().get("shmem", 0) / MIB))
        r = rows[-1]
        r["pinned_mib"] = r["host_pinned_mib"].get("allocated_bytes.current", 0.0)
        pinned = r["host_pinned_mib"].get("allocated_bytes.current")
        log(f"soak {i + 1:2d} {key:20s} {frames}x{h}x{w} {profile:9s} cfg {cfg:.0f} {r['seconds']:6.2f}s "
            f"RSS {r['rss_mib']:8.1f} MiB  pinned {pinned if pinned is None else round(pinned, 1)}  "
            f"alloc {r['alloc_mib']:.1f}  reserved {r['reserved_mib']:.1f} MiB")
    rss_mib = [r["rss_mib"] for r in rows]
    warm = max(rss_mib[4:8] or rss_mib[:1])   # after each variant/size/profile ran once
    verdict = dict(rss_before_mib=rss_before / MIB, rss_max_mib=max(rss_mib),
                   soak_seconds=round(sum(r["seconds"] for r in rows), 1),
                   base_alloc_mib=base[0] / MIB, base_reserved_mib=base[1] / MIB,
                   alloc_flat=all(r["alloc_mib"] == base[0] / MIB for r in rows),
                   reserved_max_mib=max(r["reserved_mib"] for r in rows),
                   rss_runs_5_8_max_mib=warm, rss_last5_max_mib=max(rss_mib[-5:]),
                   rss_growth_mib=max(rss_mib[-5:]) - warm, all_finite=all(r["finite"] for r in rows))
    verdict["rss_flat"] = verdict["rss_growth_mib"] <= 64
    for key in ("pinned_mib", "shmem_mib"):   # see host_pinned: not active_bytes
        vals = [r[key] for r in rows]
        verdict[key.replace("_mib", "_growth_mib")] = max(vals[-5:]) - max(vals[4:8] or vals[:1])
    verdict["pinned_flat"] = verdict["pinned_growth_mib"] <= 64 and verdict["shmem_growth_mib"] <= 64
    # diagnosis only, after the last run: what an extra pinned-cache release would still return
    released = device.type == "cuda" and REAL_EMPTY_HOST_CACHE()
    gc.collect()
    verdict.update(extra_host_release=bool(released),
                   rss_after_extra_release_mib=devmem.host_rss_bytes() / MIB,
                   host_pinned_after_extra_release_mib=host_pinned(device))
    return rows, verdict


# ------------------------------------------------------------------------------- main
def write(root: Path, tiny: bool, layers: int | None, precision: str) -> dict:
    """Both variants' checkpoints under ``root`` (reused where an earlier run wrote them: --ckpt-dir)."""
    return {key: hf_checkpoints(root, key, full=not tiny, layers=layers, trained_size=tiny, dtype=precision)
            for key in (V10, V15)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=4, help="transformer and T5 blocks (full widths)")
    ap.add_argument("--profiles", default="lowvram,balanced,resident")
    ap.add_argument("--soak-runs", type=int, default=20)
    ap.add_argument("--skip", default="", help="comma list of: engine, nodes, soak")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="write (or reuse) the checkpoints here")
    ap.add_argument("--keep-host-cache", action="store_true",
                    help="never empty torch's pinned host cache (the behaviour before it was emptied; to compare)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    precision = "fp32" if args.tiny else "bf16"
    profiles = args.profiles.split(",")
    skip = set(filter(None, args.skip.split(",")))
    root = args.ckpt_dir or Path(tempfile.mkdtemp(prefix="cogvid_rel_"))
    if args.keep_host_cache:
        devmem.empty_host_cache = lambda: False
    ckpts = write(root, args.tiny, None if args.tiny else args.layers, precision)
    ckpts["precision"] = precision
    # (frames, height, width) per variant; 1.0 is pinned to 480x720
    sizes = {V10: [(13, 480, 720), (25, 480, 720), (49, 480, 720)],
             V15: [(17, 480, 720), (33, 768, 1360), (17, 320, 480)]}
    if args.tiny:   # CPU smoke run: small videos (1.0 stays at its pinned size, few frames)
        sizes = {V10: [(5, 480, 720), (9, 480, 720)], V15: [(17, 64, 96), (17, 96, 160), (33, 64, 96)]}
    image = torch.rand(1, 600, 900, 3)   # an IMAGE tensor, resized/cropped per run
    env = dict(provenance(card_name(device)), device=card_name(device),
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
               layers=None if args.tiny else args.layers, tiny=args.tiny, keep_host_cache=args.keep_host_cache,
               rss_start_mib=devmem.host_rss_bytes() / MIB)
    log(json.dumps(env))
    # warm-up: CUDA context, cuBLAS/cuDNN workspaces and kernels, so "before" already holds them
    pipeline.generate(pipeline.Sources.from_model(str(ckpts[V15])), job(*sizes[V15][2], steps=1, image=image),
                      precision=precision, device=device, profile="resident")
    result = dict(env=env)
    if "engine" not in skip:
        result["cancel_engine"] = cancel_engine(ckpts, sizes, device, profiles, image)
    if "nodes" not in skip:
        result["cancel_nodes"] = cancel_nodes(ckpts, sizes, device, precision)
    if "soak" not in skip:
        result["soak"], result["soak_verdict"] = soak(ckpts, sizes, device, profiles + ["auto"], image,
                                                      args.soak_runs)
        log(json.dumps(result["soak_verdict"]))
    ok = all(r["ok"] for k in ("cancel_engine", "cancel_nodes") for r in result.get(k, []))
    v = result.get("soak_verdict")
    ok = ok and (v is None or (v["alloc_flat"] and v["rss_flat"] and v["all_finite"]))
    result["ok"] = ok
    log("ALL OK" if ok else "SOME CHECKS FAILED")
    if args.out:
        write_json(args.out, result)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
