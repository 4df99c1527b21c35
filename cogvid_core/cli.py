"""`python -m cogvid_core i2v|estimate|make-checkpoints|demo`: the engine without ComfyUI."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from cogvid_core import api as cv
from cogvid_core.api import AUTO, GiB, VARIANTS, CheckpointError, StageOOM

_PRECISION_HELP = ("bf16, fp16, fp32, fp8_e4m3fn (block matrices in 8 bits, computed in bf16) or auto (default): "
                   "bf16 where the card has it; on cards without (T4, V100, RTX 20xx) fp16 for T5, the VAE and "
                   "CogVideoX-5B-I2V, fp32 for CogVideoX1.5 (fp16 gives it NaN / black frames)")

# what a user can fix gets one line (exit 2); anything else (TypeError, KeyError, ...) is a bug: its
# traceback shows (exit 70, sysexits' EX_SOFTWARE; 1 is the estimate's "does not fit")
USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, FloatingPointError, StageOOM)
BUG_EXIT = 70


def _i2v_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF-layout model folder or hub repo id (e.g. THUDM/CogVideoX1.5-5B-I2V)")
    p.add_argument("--transformer", help="override: transformer folder, single .safetensors file or repo id")
    p.add_argument("--vae", help="override: VAE folder, single .safetensors file or repo id")
    p.add_argument("--text-encoder", help="override: T5 folder, single t5xxl .safetensors file or repo id")
    p.add_argument("--tokenizer", help="T5 tokenizer folder (needed with a single T5 file)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a CogVideoX LoRA .safetensors file and its strength (default 1.0, negative inverts "
                        "it); repeat for several")
    p.add_argument("--image", help="start image (required unless --from-latents)")
    p.add_argument("--prompt", help="what the video shows (required unless --from-latents)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, help="default: the variant's (49 for 1.0, 81 for 1.5)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--no-dynamic-cfg", action="store_true")
    p.add_argument("--scheduler", choices=["dpm", "ddim"], default="dpm")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8_e4m3fn", "auto"], default="auto",
                   help="every component's (fp8_e4m3fn: the transformer's; T5 and the VAE then auto): " + _PRECISION_HELP)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--devices", help="several GPUs (replaces --device): cuda:0,cuda:1 runs the two CFG branches at once, "
                                     "one per GPU; t5=DEV, vae=DEV, transformer=DEV[+DEV] put components on other cards")
    p.add_argument("--speed", default="exact", metavar="SPEED",
                   help="transformer speed option: exact (default, unchanged result); cudnn and compile (exact-class: "
                        "same math, other rounding); sage (8-bit attention) and fp8 (float8 matmuls, Ada/Hopper) change "
                        "the video slightly; combine with '+', e.g. fp8+compile; fastest: the best recipe this GPU "
                        "runs (per card class, exact on a CPU; a message says which). Choices: " + ", ".join(_speeds()))
    p.add_argument("--profile", default=AUTO, help="memory profile: auto, resident, balanced, lowvram")
    p.add_argument("--vram-budget", type=float, help="GiB the run may use (default: what the GPU has free)")
    p.add_argument("--resize", choices=["crop", "stretch", "pad"], default="crop")
    p.add_argument("--fps", type=float, help="default: the variant's (8 for 1.0, 16 for 1.5)")
    p.add_argument("--cache-dir", help="where hub downloads go (default: huggingface_hub's cache)")
    p.add_argument("--compile-cache", metavar="DIR", help="where speed 'compile' keeps its compiled kernels for the "
                   "next run (default ~/.cache/cogvid-i2v/compile; 'off': compile afresh every run)")
    p.add_argument("--cache", default="none", metavar="NAME[:ARGS]",
                   help="step cache: none (default, exact), fbc[:THRESHOLD] (first-block cache, 0.05), pab (pyramid "
                        "attention broadcast), fastercache (needs CFG batched: profile resident). A cache trades "
                        "quality for speed: the video differs from the uncached one")
    p.add_argument("--report", type=Path, help="write the per-stage memory/time summary as JSON here")
    p.add_argument("--out", required=True, type=Path, help="OUT.mp4 for an H.264 video, else a folder of PNG frames")
    p.add_argument("--from-latents", type=Path, metavar="FILE",
                   help="decode the OUT.latents.safetensors a failed or interrupted run kept (same --model), "
                        "without sampling again")


def _speeds():
    from cogvid_core.api import SPEEDS as CHOICES
    return CHOICES


def parse_lora(spec: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); a colon not followed by a number belongs to the path."""
    path, sep, tail = spec.rpartition(":")
    strength = 1.0
    if sep:
        try:
            strength = float(tail)
        except ValueError:
            path = spec
    else:
        path = tail
    if not path:
        raise ValueError(f"--lora {spec!r}: give FILE[:STRENGTH], e.g. --lora orbit.safetensors:0.8")
    if strength != strength or abs(strength) == float("inf"):
        raise ValueError(f"--lora {spec!r}: the strength must be a finite number")
    if not Path(path).is_file():
        raise ValueError(f"--lora {spec!r}: LoRA file not found: {path}")
    return path, strength


def run_i2v(args) -> int:
    from cogvid_core.api import StageRecorder

    cv.check_writable(args.out)                 # before anything loads: a bad --out costs a second
    cv.set_compile_cache(args.compile_cache)
    sources = cv.Sources(transformer=args.transformer or args.model, vae=args.vae or args.model,
                         text_encoder=args.text_encoder or args.model, tokenizer=args.tokenizer,
                         scheduler=args.model, loras=tuple(parse_lora(x) for x in args.lora))
    device, devices = _devices(args)
    rec = StageRecorder(device)
    if args.from_latents:
        latents, tile, _ = cv.load_latents(args.from_latents)
        result = cv.decode_saved(sources, latents, tile, precision=args.precision,
                                 device=device, recorder=rec, cache_dir=args.cache_dir)
        return _write(args, result, rec)
    if not args.image or args.prompt is None:
        raise ValueError("i2v needs --image and --prompt (or --from-latents FILE to decode kept latents)")
    job = cv.Job(image=args.image, prompt=args.prompt, negative_prompt=args.negative_prompt,
                 frames=args.frames, height=args.height, width=args.width, steps=args.steps, cfg=args.cfg,
                 dynamic_cfg=not args.no_dynamic_cfg, scheduler=args.scheduler, seed=args.seed,
                 resize=args.resize, cache=args.cache)
    if not Path(args.image).is_file():
        raise ValueError(f"start image not found: {args.image}")
    bar = _Bar("denoise")
    try:
        result = cv.generate(sources, job, precision=args.precision, device=device, profile=args.profile,
                             vram_budget_gib=args.vram_budget, recorder=rec, progress=bar,
                             cache_dir=args.cache_dir, devices=devices, speed=args.speed)
    except BaseException as e:                   # the decode failed or was interrupted: keep what was sampled
        bar.close()
        if getattr(e, "latents", None) is not None:
            _keep(args, e.latents, getattr(e, "decode_tile", None))
        raise
    bar.close()
    if not cv.rank_writes_output():      # torchrun: rank 0 writes the video and the report
        return 0
    return _write(args, result, rec)


def _keep(args, latents, tile) -> None:
    where = cv.save_latents(latents, cv.latents_path(args.out), tile, settings={"model": args.model})
    print(f"note: {cv.kept_message(where, f'--model {args.model}')}", file=sys.stderr)


def _write(args, result, rec) -> int:

    fps = args.fps or result.fps
    out = args.out
    try:
        with rec.stage("write"):
            if out.suffix.lower() == ".mp4":
                cv.write_mp4(result.frames, out, fps)
            else:
                cv.write_pngs(result.frames, out)
    except BaseException as e:                   # a full disk, a lost drive, Ctrl-C: the latents outlive it
        if not args.from_latents:
            _keep(args, result.latents, result.tile)
        if isinstance(e, OSError):
            raise ValueError(f"could not write {out}: {e.strerror or e}") from e
        raise
    _summary(args, result, rec, fps, out)
    return 0


def _summary(args, result, rec, fps, out) -> None:
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(rec.table())
    print(f"profile {result.profile}: " + ", ".join(f"{k} {v}" for k, v in result.settings.items())
          + (" (on the CPU every placement is resident)" if rec.device.type == "cpu" else ""))
    if result.host_estimate:
        print("host RAM estimate (anonymous + pinned; file pages the page cache would keep): " + ", ".join(
            f"{k} {o / GiB:.2f} ({f / GiB:.2f})" for k, (o, f) in result.host_estimate.items()) + " GiB")
    print(f"{result.frames.shape[0]} frames "
          f"{result.frames.shape[2]}x{result.frames.shape[1]} @ {fps:g} fps -> {out}")
    if args.report:
        host = {k: dict(host_anon_pinned_gib=o / GiB, host_file_gib=f / GiB) for k, (o, f) in result.host_estimate.items()}
        args.report.write_text(rec.to_json(profile=result.profile, settings=result.settings,
                                           variant=result.variant.key, out=str(out), host_estimate=host))


def _devices(args):
    """(compute device, multigpu.DeviceMap or None) from --device/--devices; under torchrun, this
    rank's device in the launched group."""
    from cogvid_core.api import parse_devices
    devices = parse_devices(args.devices) if args.devices else None
    device = devices.primary if devices is not None else cv.pick_device(args.device)
    if cv.torchrun_launched():        # torchrun: one rank per GPU, the video tokens split over them
        if devices is not None:
            raise ValueError("--devices does not combine with torchrun (each rank computes on cuda:LOCAL_RANK): "
                             "drop --devices, or run without torchrun")
        device = cv.init_sequence_parallel(device.type)
    return device, devices


class _Bar:
    """A plain stderr progress line (no tqdm dependency in the engine's output path)."""

    def __init__(self, label):
        self.label = label
        self.shown = False

    def __call__(self, done, total):
        print(f"\r{self.label} {done}/{total}", end="", file=sys.stderr, flush=True)
        self.shown = True

    def close(self):
        if self.shown:
            print(file=sys.stderr)


def run_demo(args) -> int:
    """Write tiny random checkpoints and a start image, then run i2v on them: the whole path offline."""
    import numpy as np
    from PIL import Image


    root = Path(args.dir)
    key = args.variant
    paths = cv.write_checkpoints(root / "models", key, tiny=True, layouts=("hf",))
    img = root / "start.png"
    yy, xx = np.mgrid[0:64, 0:96]
    Image.fromarray(np.stack([xx * 2.6, yy * 4, 128 + 0 * xx], -1).astype(np.uint8)).save(img)
    argv = ["--model", str(paths["hf"]), "--image", str(img), "--prompt", "a red fox runs through snow",
            "--steps", str(args.steps), "--device", args.device, "--out", str(args.out)]
    return run_i2v(build_parser().parse_args(["i2v", *argv]))


def _estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="cogvideox1.5-5b-i2v", choices=sorted(VARIANTS))
    p.add_argument("--frames", type=int, default=None, help="default: the variant's")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--profile", default=AUTO,
                   help="placement profile name; 'auto' picks the fastest that fits the budget")
    p.add_argument("--precision", default="auto", help="transformer: " + _PRECISION_HELP)
    p.add_argument("--text-encoder-precision", default="auto", help="T5: bf16, fp16 (its wo layers in fp32), fp32, auto")
    p.add_argument("--vae-precision", default="auto", help="VAE: bf16, fp16, fp32, auto")
    p.add_argument("--tile", default=None, help="decode tile HEIGHTxWIDTH in pixels (default: the profile's)")
    p.add_argument("--budget-gib", type=float, default=None, help="default: free memory of --device")
    p.add_argument("--reserve-gib", type=float, default=0.0, help="keep this much of the free memory unused")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep-loaded", action="store_true", help="resident models stay on the GPU in every stage")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    p.add_argument("--cache", default="none", metavar="NAME[:ARGS]",
                   help="step cache (as i2v --cache): the activations it holds count in the denoise step")
    p.add_argument("--chart", default=None, help="also write the chart as a PNG here")
    # i2v's memory-changing options, same names and meanings, so an estimate can be asked for the exact run
    p.add_argument("--speed", default="exact", metavar="SPEED",
                   help="as i2v --speed: what the speed option adds to the denoise step counts (fastest: what it "
                        "picks on --device). Choices: "
                        + ", ".join(_speeds()))
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="as i2v --lora (repeat for several): the file's tensors count with the transformer's weights")
    p.add_argument("--lora-mib", type=float, default=0.0, metavar="N",
                   help="LoRA memory in MiB without a file (as the VRAM Estimate node's lora_mib); adds to --lora")
    p.add_argument("--devices", help="as i2v --devices: the budget is the smallest free memory of its GPUs; a CFG "
                                     "pair (cuda:0,cuda:1) estimates one GPU's share (one CFG branch)")


def _estimate_budget(args) -> int | None:
    from cogvid_core.api import gpu_budget

    if args.budget_gib is not None:
        return int((args.budget_gib - args.reserve_gib) * GiB)
    if args.devices:                     # several GPUs: each must hold its stages, so the smallest decides
        free = [b for d in cv.parse_devices(args.devices).gpus() if (b := gpu_budget(d, int(args.reserve_gib * GiB)))
                is not None]
        return min(free) if free else None
    dev = None if args.device in (None, "", "auto") else args.device
    return gpu_budget(dev, int(args.reserve_gib * GiB))


def _estimate_counts(args, dev, precision) -> tuple[int, bool, str]:
    """(LoRA device bytes, CFG pair?, speed counted) as i2v counts them; a bad --speed, --lora or --devices
    fails here with i2v's message. The speed counted is the one asked, as i2v's planner counts it;
    ``fastest`` the recipe it picks on ``dev`` (with a CFG pair: what both of its devices run, as i2v runs it)."""
    second = cv.parse_devices(args.devices).second if args.devices else None
    pair = second is not None
    for note in cv.check_speed_alone(args.speed, dev, second).notes:
        print(f"note: {note}", file=sys.stderr)
    speed = cv.speed_recipe(args.speed, dev, second)
    if not args.lora_mib >= 0 or args.lora_mib == float("inf"):
        raise ValueError(f"--lora-mib {args.lora_mib:g}: give the LoRAs' size in MiB, a finite number >= 0")
    loras = [(cv.load_lora(path), strength) for path, strength in map(parse_lora, args.lora)]
    dtype = cv.precision_dtypes(precision["transformer"])[0]      # the pipeline's compute dtype (_prepare)
    return cv.lora_bytes(loras, dtype) + int(args.lora_mib * 1024 ** 2), pair, speed


def run_estimate(args) -> int:
    """Print the estimate (of the given profile, or for 'auto' of the plan's pick); exit 1 when it does
    not fit the budget."""
    from cogvid_core.api import estimate
    from cogvid_core.api import check_video_shape, transformer_config
    from cogvid_core.api import plan_run as plan

    v = VARIANTS[args.variant]
    frames, height, width = args.frames or v.default_frames, args.height or v.default_height, args.width or v.default_width
    check_video_shape(v, transformer_config(v), frames, height, width)
    asked = {"transformer": args.precision, "text_encoder": args.text_encoder_precision, "vae": args.vae_precision}
    dev = cv.default_device() if args.device in (None, "", "auto") else args.device
    dev = cv.parse_devices(args.devices).primary if args.devices else dev
    precision = cv.resolve_precisions(asked, dev, v)      # the loaders' rule: 1.5 in fp16 refused, auto for this card
    lora_bytes, pair, speed = _estimate_counts(args, dev, precision)
    tile = None
    if args.tile:
        th, tw = (int(x) for x in args.tile.lower().split("x"))
        tile = (th, tw, 1 / 6)
    budget = _estimate_budget(args)
    counts = dict(keep_loaded=args.keep_loaded, cache=args.cache, lora_bytes=lora_bytes, speed=speed)
    if args.profile == AUTO and budget is None:
        print("no CUDA device and no --budget-gib: showing the 'balanced' profile without a verdict", file=sys.stderr)
        est = estimate(v, frames, height, width, _pair_form("balanced", pair), precision, tile, None, **counts)
    elif args.profile == AUTO:
        _prof, est = plan(v, frames, height, width, budget, precision, cfg_pair=pair, **counts)
    else:
        est = estimate(v, frames, height, width, _pair_form(args.profile, pair), precision, tile, budget, **counts)
    counted = {"speed": args.speed, "speed_recipe": speed, "lora_mib": round(lora_bytes / 1024 ** 2, 1),
               "cfg_pair": pair}
    if args.chart:
        from PIL import Image

        from cogvid_core.api import chart_image
        Image.fromarray(chart_image(est)).save(args.chart)
    if args.json:
        print(json.dumps({**est.to_dict(), "counted": counted}, indent=2))
    else:
        print(est.report())
        print(f"counted: speed {args.speed}" + (f" ({speed} here)" if speed != args.speed else "")
              + f", LoRA {counted['lora_mib']:g} MiB"
              + (", one CFG branch per GPU (--devices pair)" if pair else ""))
    return 0 if est.fits is not False else 1


def _pair_form(name: str, pair: bool):
    """The profile each GPU of a CFG pair runs: its one-branch form (sampling runs the pair as
    'sequential' does); without a pair, the name itself."""
    return cv.one_branch([cv.get_profile(name)])[0] if pair else name


def build_parser() -> argparse.ArgumentParser:

    # no abbreviations: `--cache pab` was read as `--cache-dir pab` (a new flag must never steal an old one's prefix)
    parser = argparse.ArgumentParser(prog="python -m cogvid_core", description=__doc__, allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _i2v_arguments(sub.add_parser("i2v", help="image-to-video", allow_abbrev=False))
    cv.checkpoint_arguments(sub.add_parser("make-checkpoints", help="write random checkpoints in the real layouts",
                                         allow_abbrev=False))
    demo = sub.add_parser("demo", help="tiny random checkpoints + i2v, offline, in seconds on a CPU", allow_abbrev=False)
    demo.add_argument("--dir", default="demo", help="work folder")
    demo.add_argument("--variant", default="cogvideox1.5-5b-i2v", choices=["cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"])
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--out", default="demo/demo.mp4")
    _estimate_arguments(sub.add_parser("estimate", help="predict peak VRAM per stage and pick settings that fit",
                                       allow_abbrev=False))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.command == "i2v":
            return run_i2v(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "make-checkpoints":
            cv.make_checkpoints(args)
            return 0
        return run_estimate(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("this is a bug in cogvid_core, not in your input: please report it with the traceback above",
              file=sys.stderr)
        return BUG_EXIT
