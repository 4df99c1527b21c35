"""Predicted vs measured peak GPU memory per stage, over a grid of variants x sizes x profiles.

Runs the engine's own stage functions in the pipeline's order (text.encode_prompt, vae.encode_image,
sampling.sample, vae.decode; each component acquired for its stage through session.Component /
placement and given back after it, as pipeline.generate does) under report.StageRecorder, with
full-size random-weight models built directly on the GPU. One denoise step per row: the step's
peak does not change with the step count.

Stages whose inputs do not change between rows are measured once and shared (the text encode
depends only on T5's placement mode; the image encode on the size; the decode on frames, size and
tile), which keeps the grid within a few minutes of GPU time; a shared cell is marked '*'.

    python bench/bench_estimate.py --tiny --device cpu              # the code path, on CPU, seconds
    python bench/bench_estimate.py --out measured.json              # the GPU grid
    python bench/bench_estimate.py --fit measured.json --write-calibration   # fit constants (no GPU)

The measurements behind cogvid_core/calibration.json are kept in bench/estimate_h100_grid_part*.json
(H100 80GB, torch 2.11.0+cu130, diffusers 0.42.1, transformers 5.17.0; the grid ran in two parts,
the second after fixing the bench's VAE tiling state for the image encode).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cogvid_core import devmem  # noqa: E402
from cogvid_core import estimate as E  # noqa: E402
from cogvid_core import models as M  # noqa: E402
from cogvid_core import profiles  # noqa: E402
from cogvid_core.stages import STAGES  # noqa: E402

GiB = devmem.GiB
STAGE_REC = {"text_encode": "text encode", "image_encode": "image encode", "denoise_step": "denoise",
             "decode": "decode"}
BUDGETS_GIB = (8, 12, 16, 24, 40)

FULL_GRID = {   # cheap rows first: a run cut short still returns them
    M.V10.key: [(49, 480, 720), (33, 480, 720), (17, 480, 720)],
    M.V15.key: [(49, 480, 848), (33, 768, 1360), (81, 768, 1360)],
}
TINY_GRID = {
    M.V15.key: [(17, 64, 96), (33, 64, 96), (17, 96, 128)],
    M.V10.key: [(9, 64, 96), (5, 64, 96)],
}
PROFILE_NAMES = ("resident", "balanced", "lowvram")
SETTINGS = ("transformer", "text_encoder", "vae", "cfg_mode", "ff_chunk", "low_mem_attention")


# ------------------------------------------------------------------------------ measurement
class Models:
    """One random-weight set per variant; T5 and VAE shared (same configs for both variants)."""

    def __init__(self, device, dtype, tiny):
        from cogvid_core import testing
        self.device, self.dtype, self.tiny = device, dtype, tiny
        self._testing = testing
        self.t5 = testing.build_random("text_encoder", M.V15, tiny, dtype, device).to("cpu")
        self.vae = {}
        self.tr = {}
        tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
        testing.write_tokenizer(tok_dir)
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(tok_dir)
        _free()

    def transformer(self, v):
        if v.key not in self.tr:
            self.tr.clear()
            _free()
            self.tr[v.key] = self._testing.build_random("transformer", v, self.tiny, self.dtype, self.device).to("cpu")
            _free()
        return self.tr[v.key]

    def vae_of(self, v):
        if v.key not in self.vae:
            self.vae[v.key] = self._testing.build_random("vae", v, self.tiny, self.dtype, self.device).to("cpu")
            _free()
        return self.vae[v.key]


def _free():
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row_of(rec, name):
    rows = [r for r in rec.rows() if r["stage"] == name]
    return rows[-1] if rows else None


def measure_stage(stage, models, v, frames, h, w, prof, device, cache, inputs):
    """Run one stage through the engine under a StageRecorder; (peak alloc, peak reserved) bytes."""
    from cogvid_core import activations, report, sampling, session, text, vae as vae_mod

    tile = prof.vae_tile
    key = {"text_encode": ("te", prof.text_encoder == "stream"),
           "image_encode": ("ie", v.key, h, w),
           "denoise_step": ("ds", v.key, frames, h, w, prof.transformer, prof.cfg_mode, prof.ff_chunk,
                            prof.low_mem_attention),
           "decode": ("dec", v.key, frames, h, w, (tile.height, tile.width, tile.overlap) if tile else None)}[stage]
    if key in cache:
        return cache[key] + (True,)
    rec = report.StageRecorder(device)
    dtype = models.dtype
    if stage == "text_encode":
        c = session.Component("t5", models.t5, device, dtype, prof.text_encoder, tokenizer=models.tok)
        try:
            with rec.stage("text encode"):
                mod = c.acquire()
                pos = text.encode_prompt(mod, models.tok, "a red fox runs through snow", device)
                neg = text.encode_prompt(mod, models.tok, "", device)
        finally:
            c.release()
        inputs["prompt"] = (pos, neg)
    elif stage == "image_encode":
        from PIL import Image
        img = Image.new("RGB", (w, h), (120, 80, 40))
        vae = models.vae_of(v)
        vae.disable_tiling()   # a fresh VAE's state, as in the pipeline (decode leaves tiling on)
        c = session.Component("vae", vae, device, dtype, prof.vae, variant=v)
        try:
            with rec.stage("image encode"):
                inputs["latent", v.key, h, w] = vae_mod.encode_image(c.acquire(), img, h, w, v, "crop", device)
        finally:
            c.release()
    elif stage == "denoise_step":
        pos, neg = inputs["prompt"]
        tr = models.transformer(v)
        activations.apply_profile(tr, prof)
        c = session.Component("transformer", tr, device, dtype, prof.transformer, variant=v)
        try:
            with rec.stage("denoise", steps=1):
                lat = sampling.sample(c.acquire(), v, pos.embeds, neg.embeds, inputs["latent", v.key, h, w], frames,
                                      steps=1, cfg=6.0, scheduler="dpm", seed=0, device=device, dtype=dtype,
                                      cfg_mode=prof.cfg_mode)
        finally:
            c.release()
        inputs["video", v.key, frames, h, w] = lat
    else:
        lat = inputs.get(("video", v.key, frames, h, w))
        c = session.Component("vae", models.vae_of(v), device, dtype, prof.vae, variant=v)
        try:
            with rec.stage("decode"):
                vae_mod.decode(c.acquire(), lat, device, tile=tile)
        finally:
            c.release()
    _free()
    row = _row_of(rec, STAGE_REC[stage])
    res = (None, None) if row["peak_alloc_gib"] is None else (int(row["peak_alloc_gib"] * GiB),
                                                             int(row["peak_reserved_gib"] * GiB))
    cache[key] = res
    return res + (False,)


def run_grid(args) -> dict:

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = TINY_GRID if args.tiny else FULL_GRID
    variants = [M.VARIANTS[k] for k in (args.variants or grid)]
    t0 = time.perf_counter()
    models = Models(device, dtype, args.tiny)
    cache, inputs, rows = {}, {}, []
    for v in variants:
        shapes = grid[v.key][: args.max_rows] if args.max_rows else grid[v.key]
        if args.shapes:
            shapes = [s for s in shapes if "x".join(map(str, s)) in args.shapes]
        for frames, h, w in shapes:
            for pname in args.profiles:
                prof = profiles.PROFILES[pname]
                if args.tile:
                    th, tw = (int(x) for x in args.tile.lower().split("x"))
                    prof = prof.replace(vae_tile=dataclasses.replace(prof.vae_tile, height=th, width=tw))
                t = prof.vae_tile
                row = dict(variant=v.key, frames=frames, height=h, width=w, profile=pname, stages={},
                           tile=[t.height, t.width, t.overlap] if t else None,
                           settings={k: getattr(prof, k) for k in SETTINGS})
                for stage in STAGES:
                    t = time.perf_counter()
                    alloc, reserved, shared = measure_stage(stage, models, v, frames, h, w, prof, device, cache, inputs)
                    row["stages"][stage] = dict(alloc=alloc, reserved=reserved, shared=shared,
                                                seconds=round(time.perf_counter() - t, 2))
                rows.append(row)
                if args.out:
                    Path(args.out).write_text(json.dumps(dict(env=_env(device, dtype, args, t0), rows=rows), indent=2))
                print(f"measured {v.key} {frames}x{h}x{w} {pname} in {time.perf_counter() - t0:.0f}s", flush=True)
        models.tr.clear()
        _free()
    return dict(env=_env(device, dtype, args, t0), rows=rows)


def _env(device, dtype, args, t0):
    return dict(card=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, diffusers=_version("diffusers"), transformers=_version("transformers"),
                date=datetime.date.today().isoformat(), tiny=bool(args.tiny), dtype=str(dtype).replace("torch.", ""),
                seconds=round(time.perf_counter() - t0, 1))


def _version(name):
    try:
        return __import__(name).__version__
    except Exception:
        return None


# ------------------------------------------------------------------------------ comparison
def predict(row, constants_path=None, tiny=False):
    tile = row.get("tile", None)   # the decode tile the row ran with (profiles' defaults change)
    prof = profiles.PROFILES[row["profile"]]
    if row.get("settings"):        # the settings the row ran with, not today's profile of that name
        prof = prof.replace(**row["settings"])
    return E.estimate(row["variant"], row["frames"], row["height"], row["width"], prof,
                      tile=tuple(tile) if tile else None, calibration_path=constants_path, tiny=tiny)


def compare(data, constants_path=None, out=sys.stdout) -> dict:
    tiny = data["env"].get("tiny", False)
    errs, wrong, lines = [], [], []
    head = f"{'variant':<20}{'shape':>14} {'profile':<9}" + "".join(f"{STAGE_REC[s]:>24}" for s in STAGES)
    lines.append("peak allocated GiB per stage: predicted / measured / error ('*' = measured once, shared)")
    lines.append(head)
    for row in data["rows"]:
        est = predict(row, constants_path, tiny)
        cells = []
        for s in STAGES:
            m = row["stages"][s]
            p = est.stage(s).peak_allocated
            if m["alloc"] is None:
                cells.append(f"{p / GiB:7.2f} /    - /    -")
                continue
            e = (p - m["alloc"]) / m["alloc"]
            errs.append((abs(e), row, s, e))
            cells.append(f"{p / GiB:7.2f} /{m['alloc'] / GiB:6.2f}{'*' if m['shared'] else ' '}/{e * 100:+5.1f}%")
        shape = f"{row['frames']}x{row['height']}x{row['width']}"
        lines.append(f"{M.VARIANTS[row['variant']].label:<20}{shape:>14} {row['profile']:<9}" + "".join(f"{c:>24}" for c in cells))
        meas_res = [row["stages"][s]["reserved"] for s in STAGES]
        if None not in meas_res:
            peak_m = max(meas_res)
            # a wrong 'fits' is possible for some budget iff the needed estimate is below the real peak
            if est.needed_bytes < peak_m:
                wrong.append((row, None, est.needed_bytes, peak_m))
            lines.append(f"{'':<44}reserved peak predicted {est.peak_reserved / GiB:6.2f} (needed with margin "
                         f"{est.needed_bytes / GiB:6.2f}), measured {peak_m / GiB:6.2f} GiB "
                         f"({(est.peak_reserved - peak_m) / peak_m * 100:+.1f}%)")
    worst = max(errs, key=lambda x: x[0]) if errs else None
    lines.append("")
    if errs:
        within = sum(1 for e in errs if e[0] <= 0.10)
        lines.append(f"stages within +-10%: {within}/{len(errs)}; worst {worst[3] * 100:+.1f}% "
                     f"({worst[1]['variant']} {worst[1]['frames']}x{worst[1]['height']}x{worst[1]['width']} "
                     f"{worst[1]['profile']} {worst[2]})")
        lines.append(f"rows where a wrong 'fits' verdict is possible (needed estimate below the measured reserved "
                     f"peak, i.e. some budget between them would be judged 'fits' and run out): {len(wrong)}")
        for row, b, p, m in wrong:
            lines.append(f"  {row['variant']} {row['frames']}x{row['height']}x{row['width']} {row['profile']}: "
                         f"needed {p / GiB:.2f}, measured {m / GiB:.2f}")
    else:
        lines.append("no CUDA measurements (CPU run): predictions only")
    print("\n".join(lines), file=out)
    return dict(errors=[(r["variant"], r["frames"], r["height"], r["width"], r["profile"], s, e) for _, r, s, e in errs],
                wrong_verdicts=len(wrong), worst=worst[3] if worst else None)


# ------------------------------------------------------------------------------ calibration fit
FIT_KEYS = ("t5_act_units", "enc_act_mult", "step_live_units", "step_attn_units", "step_attn_units_lowmem",
            "step_ff_units", "step_ff_units_chunked", "step_ff_chunk_live_units", "stream_buffer_mult", "dec_tile_mult", "dec_accum_mult", "dec_post_mult", "fixed_bytes", "reserved_frag",
            "dec_reserved_frag", "dec_video_frag")   # stream_blocks stays 2: the block running + the one prefetched


def fit(data, start: dict | None = None) -> dict:
    """Fit the constants to the measured stage peaks (least squares on relative error, Nelder-Mead)."""
    import numpy as np
    from scipy.optimize import minimize

    tiny = data["env"].get("tiny", False)
    base = {**E.DEFAULT_CONSTANTS, **(start or {})}
    rows = [r for r in data["rows"] if all(r["stages"][s]["alloc"] is not None for s in STAGES)]
    if not rows:
        raise SystemExit("no measured rows to fit")
    def loss(x):
        c = dict(base, **{k: float(abs(v)) for k, v in zip(FIT_KEYS, x)})
        total = 0.0
        for r in rows:
            est = predict(r, c, tiny)
            for s in STAGES:
                m = r["stages"][s]
                e_a = (est.stage(s).peak_allocated - m["alloc"]) / m["alloc"]
                e_r = (est.stage(s).peak_reserved - m["reserved"]) / m["reserved"]
                total += e_a ** 2 + 0.25 * e_r ** 2 + (4 * e_a ** 2 if abs(e_a) > 0.08 else 0)
                total += 4 * e_r ** 2 if e_r < 0 else 0      # a low reserved estimate gives wrong 'fits'
        return total

    x0 = np.array([base[k] for k in FIT_KEYS], dtype=float)
    for _ in range(4):   # restarts: Nelder-Mead stalls in a shrunken simplex
        res = minimize(loss, x0, method="Nelder-Mead", options=dict(maxiter=3000, xatol=1e-3, fatol=1e-7))
        x0 = res.x
    fitted = dict(base, **{k: round(float(abs(v)), 4) for k, v in zip(FIT_KEYS, res.x)})
    fitted["fixed_bytes"] = int(fitted["fixed_bytes"])
    # verdict margin: the largest relative under-estimate of a row's overall reserved peak, + 2%
    under = 0.0
    for r in rows:
        est = predict(r, fitted, tiny)
        peak_m = max(r["stages"][s]["reserved"] for s in STAGES)
        under = max(under, peak_m / est.peak_reserved - 1)
    fitted["reserved_margin"] = round(under + 0.02, 3)
    return fitted


def write_calibration(data, constants, path=E.CALIBRATION_PATH, source=""):
    env = data["env"]
    doc = dict(card=env.get("card"), torch=env.get("torch"), diffusers=env.get("diffusers"),
               transformers=env.get("transformers"), date=env.get("date"), dtype=env.get("dtype"),
               source=source or "bench/bench_estimate.py grid: full-size random-weight models, 1 step per row; measurements: " + ", ".join(data.get("files", [])),
               constants=constants)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny random models and sizes (CPU smoke run)")
    p.add_argument("--variants", nargs="*", choices=sorted(M.VARIANTS))
    p.add_argument("--profiles", nargs="*", default=list(PROFILE_NAMES))
    p.add_argument("--max-rows", type=int, default=None, help="sizes per variant")
    p.add_argument("--tile", default=None, help="decode tile HEIGHTxWIDTH for every profile (held-out check)")
    p.add_argument("--shapes", nargs="*", default=None, help="only these FRAMESxHEIGHTxWIDTH shapes of the grid")
    p.add_argument("--out", default=None, help="write the measurements (JSON) here")
    p.add_argument("--fit", nargs="*", default=None,
                   help="measurements JSON file(s) to compare / fit instead of running the grid")
    p.add_argument("--write-calibration", action="store_true", help="fit the constants and write calibration.json")
    p.add_argument("--calibration", default=None, help="constants file to predict with (default: the package's)")
    args = p.parse_args(argv)

    if args.fit:
        parts = [json.loads(Path(f).read_text()) for f in args.fit]
        data = dict(env=parts[-1]["env"], rows=[r for d in parts for r in d["rows"]], files=list(args.fit))
    else:
        data = run_grid(args)
        if args.out:
            Path(args.out).write_text(json.dumps(data, indent=2))
    print(json.dumps(data["env"]))
    summary = compare(data, args.calibration)
    if args.write_calibration:
        if data["env"].get("tiny") or data["env"].get("card") in (None, "cpu"):
            print("not writing a calibration from a tiny/CPU run")
            return 1
        constants = fit(data, start={"enc_act_mult": 7.2, "dec_reserved_frag": 0.7, "step_live_units": 3.4, "step_ff_units": 9.9,
                                     "step_attn_units": 8.0, "step_attn_units_lowmem": 3.0, "step_ff_units_chunked": 6.1,
                                     "step_ff_chunk_live_units": 2.8, "stream_buffer_mult": 3.0})
        write_calibration(data, constants)
        E._load_calibration_file.cache_clear()
        print("after the fit:")
        summary = compare(data, None)
    if summary["worst"] is not None and (abs(summary["worst"]) > 0.10 or summary["wrong_verdicts"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
