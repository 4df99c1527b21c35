"""Predicted vs measured peak GPU memory per stage, for every plan `auto` can choose (issue 14).

What runs is the engine's own default path, stage by stage as pipeline.generate does it:
text.encode_prompt, vae.encode_image, sampling.sample (1 step: the step's peak does not change with
the step count), vae.decode, each component through session.Component (its profile's placement and
activation savers, configured, used, released), under report.StageRecorder. The transformer and T5
are FILE-BACKED, as the loaders load them by default: full-size random checkpoints are written once
(`--write-checkpoints DIR`, testing's writer, one process per file) and read block by block through
filestream's staging buffers. In-memory models are not equivalent on the GPU: file-backed placement
allocates one flat buffer per block (on the stream the copy runs on), diffusers' group offloading one
tensor per parameter, and cudaMallocAsync's pool grows differently with each. The VAE is in memory
(loading.load_vae is eager), built at random here.

A measurement is a CELL: one stage, one shape, one stage configuration (the settings of a candidate
that the stage depends on), one allocator. Every candidate of planner.candidates() maps to one
configuration per stage; cells shared by candidates are measured once. The decode's input is
random latents of the denoiser's output shape (its peak does not depend on their values), so the
decodes run while the checkpoints are still being written.

The allocator is the process's (PYTORCH_CUDA_ALLOC_CONF, read by torch at start): run one process
per allocator; each cell records torch.cuda.get_allocator_backend().

    python bench/bench_estimate.py --tiny --device cpu --out /tmp/x.json    # the code path, CPU, seconds
    python bench/bench_estimate.py --write-checkpoints /tmp/ck              # once, before/with the grids
    python bench/bench_estimate.py --checkpoints /tmp/ck --out native.json  # one GPU, one allocator
    python bench/bench_estimate.py --fit bench/estimate_h200_*.json --write-calibration  # no GPU

Tasks run in priority order (the fit grid first, held-out shapes after, the slowest extras last)
and no task starts after --budget-s: a run cut short keeps what it measured and lists the rest as
skipped. The JSON is rewritten after every cell. Run the grid on the tree whose filestream.py, fileread.py
and placement.py users get: the env records their sha1 (streamed-block allocation changes the peaks).

The H200 run (2 GPUs, one allocator each, the writer beside them; carry .whl = diffusers):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; B=bench/bench_estimate.py; CK=/tmp/ck
    python3 $B --write-checkpoints $CK --out $OUT/estimate_h200_writer.json > $OUT/writer.log 2>&1 &
    CUDA_VISIBLE_DEVICES=0 timeout 480 python3 $B --checkpoints $CK --budget-s 400 \
      --out $OUT/estimate_h200_native.json > $OUT/native.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 480 python3 $B \
      --checkpoints $CK --budget-s 400 --out $OUT/estimate_h200_async.json > $OUT/async.log 2>&1 &
    wait

With 4 GPUs, `--part 0/2` and `--part 1/2` per allocator split the denoise and decode cells.
A grid cut short is finished later with `--resume earlier.json --out more.json` (same card, allocator,
checkpoints): its cells are kept, only the tasks it lacks run, and the encodes whose outputs they need
run again into "repeats" (the same cell at another point of a run: how reproducible its peak is).
`--only TEXT` measures just the tasks whose printed description contains TEXT (and the encodes they
need): the same cells again in a fresh process, to tell a reproducible peak from allocator history.
Each cell records alloc_before / reserved_before, what earlier cells left on the device when it
started (after empty_cache): a reserved peak depends on it.
``--speeds A,B`` adds cells of kind "speed": 1.5's denoise step at 81x768x1360 with each speed option in the
resident, balanced and lowvram plans (a compiled option runs 2 steps, its compile inside the measured stage as
in a run). An option this machine cannot run is recorded as not run, never measured as another. The exact
grid sees only the larger of the step's attention and feed-forward phases; the options move one or the other.
The fit takes them (the phase split, and what a compiled step does not hold; a set without them keeps
"nothing saved"):
`python3 bench/bench_estimate.py --checkpoints /tmp/ck --speeds compile,fa3fp8,fa3fp8+compile,fp8,fp8+compile,fp8+fa3fp8+compile --only "~" --out speed_cells.json`.
Expandable segments (the command line's setting) are a set of their own:
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ... --only decode` measured the stage where they differ;
a set without some stage's cells takes it from the plain native set (fit(base=...)).
Then, here: `python3 bench/bench_estimate.py --fit bench/estimate_h200_native.json
bench/estimate_h200_async.json bench/estimate_h200_expandable.json --write-calibration` writes
cogvid_core/plan/calibration/h200.json.

The code: estimate_cells.py (what a cell is, reading the files), estimate_grid.py (measuring them on
the GPU), estimate_replay.py (cells against today's estimate), estimate_fit.py (the calibration fit).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common.provenance import write_json  # noqa: E402
from bench.estimate_cells import load_cells  # noqa: E402
from bench.estimate_fit import covered, fit_allocators, outside_tolerance, write_calibration  # noqa: E402
from bench.estimate_grid import run_grid, write_checkpoints  # noqa: E402
from bench.estimate_replay import card_family, compare  # noqa: E402
from cogvid_core.plan import estimate as E  # noqa: E402


def _arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny random models and sizes (CPU smoke run)")
    p.add_argument("--write-checkpoints", default=None, metavar="DIR", help="write the full-size files and exit")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="files written by --write-checkpoints (waited for while being written)")
    p.add_argument("--budget-s", type=float, default=None, help="start no task after this many seconds "
                   "(default 400 full-size, unlimited tiny)")
    p.add_argument("--part", default=None, help="I/N: every N-th task from the I-th (several GPUs per allocator)")
    p.add_argument("--out", default=None, help="write the measurements (JSON) here")
    p.add_argument("--only", action="append", default=[], metavar="TEXT", help="measure only the tasks whose "
                   "description (as printed) contains TEXT, e.g. \"cogvideox-5b-i2v 33x480x720 denoise_step ('stream', "
                   "'sequential'\" (repeatable; the encodes they need run too)")
    p.add_argument("--speeds", default=None, metavar="A,B", help="also the denoise step of 1.5 at 81x768x1360 "
                   "with each of these speed options (e.g. compile,fa3fp8,fp8+fa3fp8+compile) in the resident, balanced "
                   "and lowvram plans: cells of kind 'speed', after the fit grid")
    p.add_argument("--resume", default=None, metavar="FILE", help="an earlier run's JSON (same card and "
                   "allocator): keep its cells, measure only the tasks it did not; --out gets old + new")
    p.add_argument("--fit", nargs="*", default=None, help="measurement files to compare / fit (no GPU)")
    p.add_argument("--write-calibration", action="store_true", help="fit and write cogvid_core/plan/calibration/<card>.json")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--exclude", action="append", default=[], metavar="STAGE=REASON",
                   help="leave a stage's cells out of the fit and the claim (e.g. measured with older code)")
    return p


def _measure(args) -> tuple[dict, list[dict]]:
    """The grid on this device; (its env, its cells), read back from --out where it wrote one."""
    data = run_grid(args)
    print(json.dumps(data["env"]))
    if args.out:     # also when no cell ran (the budget spent before the first): --resume reads it
        write_json(args.out, data)
    env, cells = load_cells([args.out]) if args.out else (data["env"], [
        {"allocator": data["env"]["allocator"], "card": data["env"]["card"], **c} for c in data["cells"]])
    if data["skipped"]:
        print(f"skipped (over --budget-s): {len(data['skipped'])} tasks")
    return env, cells


def _calibrate(args, env: dict, cells: list[dict], excluded: dict) -> dict | None:
    """Fit the card's constants on ``cells`` and write its calibration file; the comparison after the
    fit, or None where the cells cannot calibrate (a tiny / CPU run)."""
    if env.get("tiny") or env.get("card") in (None, "cpu"):
        print("not writing a calibration from a tiny/CPU run")
        return None
    family = card_family(env["card"])
    mine = [c for c in cells if card_family(c["card"]) == family]
    fitted, leans = fit_allocators(mine)
    write_calibration(fitted, env, list(args.fit), args.tolerance, covered(mine), excluded,
                      outside=outside_tolerance(mine, fitted, args.tolerance), leans=leans)
    E.clear_calibration_cache()
    print("after the fit:")
    return compare(mine, tolerance=args.tolerance)


def main(argv=None) -> int:
    args = _arguments().parse_args(argv)
    if args.write_checkpoints:
        info = write_checkpoints(Path(args.write_checkpoints), args.tiny)
        if args.out:
            write_json(args.out, info)
        return 0
    if args.budget_s is None:
        args.budget_s = None if args.tiny else 400.0
    env, cells = _measure(args) if args.fit is None else load_cells(args.fit)
    excluded = dict(x.split("=", 1) for x in args.exclude)
    cells = [c for c in cells if c["stage"] not in excluded]
    for c in cells:
        c["tiny"] = env.get("tiny", False)
    summary = compare(cells, out=sys.stdout, tolerance=args.tolerance)
    if args.write_calibration:
        summary = _calibrate(args, env, cells, excluded)
        if summary is None:
            return 1
    bad = [s for s in summary["summary"].values() if s["within"] < s["cells"]]
    return 1 if (bad or summary["wrong"] or summary["short"]) else 0


if __name__ == "__main__":
    sys.exit(main())
