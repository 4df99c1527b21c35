"""Replay: measured cells against today's estimate (bench_estimate --fit; tests/test_calibration_replay.py).

Per cell the relative error of the predicted peak allocated and reserved; per measured run (all 4
stages of a candidate at a shape) whether the verdict would have said "fits" for a budget it
overran; per cell whether its stage's verdict asks less than it reserved.
"""
from __future__ import annotations

import sys

from bench.estimate_cells import measured_key, profile_of, stage_key
from cogvid_core.device.devmem import GiB
from cogvid_core.model.stages import STAGES
from cogvid_core.plan import estimate as E
from cogvid_core.plan import planner


def estimate_of(cell, constants=None) -> E.Estimate:
    """The estimate of ``cell``'s run: its shape, settings, card and allocator."""
    return E.estimate(cell["variant"], cell["frames"], cell["height"], cell["width"], profile_of(cell),
                      calibration_path=constants, tiny=cell.get("tiny", False), allocator=cell["allocator"],
                      card=cell.get("card"), file_backed=cell.get("file_backed", True),
                      speed=cell.get("speed", "exact"))


def predict(cell, constants=None) -> E.StageEstimate:
    """The estimate of ``cell``'s stage."""
    return estimate_of(cell, constants).stage(cell["stage"])


def errors(cells, constants=None) -> list[tuple[dict, float, float]]:
    """(cell, relative error of peak allocated, of peak reserved) for every cell that ran."""
    out = []
    for c in cells:
        if c.get("error") or not c["reserved"]:
            continue
        p = predict(c, constants)
        out.append((c, (p.peak_allocated - c["alloc"]) / c["alloc"], (p.peak_reserved - c["reserved"]) / c["reserved"]))
    return out


def measured_runs(cells):
    """(card, allocator, variant, frames, height, width, candidate, its peak reserved) for every candidate
    of planner.candidates() whose 4 stage cells were measured at a shape: a run's peak is its largest
    stage's (inf where a stage ran out of memory)."""
    by, shapes = {}, set()
    for c in cells:
        if c.get("speed", "exact") != "exact":    # a speed cell is not the exact run's denoise step
            continue
        by[_cell_id(c["card"], c["allocator"], c["variant"], c["frames"], c["height"], c["width"], c["stage"],
                    profile_of(c))] = c
        shapes.add((c["card"], c["allocator"], c["variant"], c["frames"], c["height"], c["width"]))
    for (card, alloc, vk, f, h, w) in sorted(shapes):
        for prof in planner.candidates():
            cs = [by.get(_cell_id(card, alloc, vk, f, h, w, s, prof)) for s in STAGES]
            if None not in cs:
                yield card, alloc, vk, f, h, w, prof, max(float("inf") if c.get("error") else c["reserved"] for c in cs)


def wrong_fits(cells, constants=None, checked: list | None = None) -> list[tuple]:
    """Candidates judged to fit a budget they overran: for every measured run (measured_runs), the
    estimate's needed bytes must be at least its measured reserved peak (else a budget between the two
    is judged 'fits' and runs out)."""
    backed = {c["card"]: c.get("file_backed", True) for c in cells}
    out = []
    for card, alloc, vk, f, h, w, prof, measured in measured_runs(cells):
        if checked is not None:
            checked.append((card, alloc, vk, f, h, w, prof.name))
        est = E.estimate(vk, f, h, w, prof, calibration_path=constants, allocator=alloc, card=card,
                         file_backed=backed[card])
        if est.needed_bytes < measured:
            out.append((card, alloc, vk, f, h, w, prof.name, est.needed_bytes, measured))
    return out


def short_stages(cells, constants=None) -> list[tuple[dict, int]]:
    """(cell, what the verdict asks of its stage) for every cell whose measured reserved peak is above
    it: the per-stage form of wrong_fits, for cells of runs not measured whole (the held-out shapes,
    the expandable-segments decode grid)."""
    out = []
    for c in cells:
        if c.get("error") or not c["reserved"]:
            continue
        needed = estimate_of(c, constants).stage_needed(c["stage"])
        if needed < c["reserved"]:
            out.append((c, needed))
    return out


def _settings(c) -> str:
    speed = c.get("speed", "exact")
    return (f"{c['profile']}~{speed}" if speed != "exact" else str(stage_key(c["stage"], profile_of(c))))


def _cell_id(card, alloc, variant, frames, height, width, stage, prof) -> tuple:
    """What a cell's measurement depends on (measured_key), per card and allocator."""
    return (card, alloc, *measured_key(stage, variant, frames, height, width, stage_key(stage, prof)))


def compare(cells, constants=None, out=sys.stdout, tolerance=0.10) -> dict:
    errs = errors(cells, constants)
    lines = [f"{'card':<10}{'alloc':<7}{'kind':<8}{'variant':<8}{'shape':>13} {'stage':<13}{'settings':<34}"
             f"{'alloc GiB pred/meas':>20}{'err':>7}{'reserved pred/meas':>20}{'err':>7}"]
    for c, ea, er in errs:
        p = predict(c, constants)
        flag = " <--" if max(abs(ea), abs(er)) > tolerance else ""
        lines.append(f"{card_family(c['card']):<10}{c['allocator'][:6]:<7}{c['kind']:<8}{c['variant'][-8:-6]:<8}"
                     f"{c['frames']}x{c['height']}x{c['width']:>5} {c['stage']:<13}{_settings(c)[:33]:<34}"
                     f"{p.peak_allocated / GiB:9.2f} /{c['alloc'] / GiB:6.2f}{ea * 100:+6.1f}%"
                     f"{p.peak_reserved / GiB:9.2f} /{c['reserved'] / GiB:6.2f}{er * 100:+6.1f}%{flag}")
    checked = []
    # the verdicts with the tolerance the calibration file will claim (Estimate.stage_needed uses it)
    judged = dict(constants, tolerance=tolerance) if isinstance(constants, dict) else constants
    wrong = wrong_fits(cells, judged, checked)
    summary = {}
    for kind in ("fit", "heldout", "speed"):
        e = [(ea, er) for c, ea, er in errs if c["kind"] == kind]
        if e:
            within = sum(1 for ea, er in e if abs(ea) <= tolerance and abs(er) <= tolerance)
            worst = max((x for pair in e for x in pair), key=abs)
            summary[kind] = dict(cells=len(e), within=within, worst=worst)
            lines.append(f"{kind}: {within}/{len(e)} cells with allocated AND reserved within +-{tolerance:.0%}; "
                         f"worst {worst * 100:+.1f}%")
    lines.append(f"candidates judged 'fits' for a budget they overran (needed < measured reserved peak): {len(wrong)} "
                 f"of {len(checked)} (candidate, shape) pairs with all 4 stages measured")
    lines += [f"  {w[0]} {w[1]} {w[2]} {w[3]}x{w[4]}x{w[5]} {w[6]}: needed {w[7] / GiB:.2f}, measured {w[8] / GiB:.2f}"
              for w in wrong[:20]]
    short = short_stages(cells, judged)
    lines.append(f"cells whose stage's verdict (needed) is below its measured reserved peak: {len(short)} of {len(errs)}")
    lines += [f"  {c['allocator']} {c['kind']} {c['variant']} {c['frames']}x{c['height']}x{c['width']} {c['stage']} "
              f"{c['profile']}: needed {n / GiB:.2f}, measured {c['reserved'] / GiB:.2f}" for c, n in short[:20]]
    oom = [c for c in cells if c.get("error")]
    lines += [f"  did not run: {c['variant']} {c['frames']}x{c['height']}x{c['width']} {c['stage']} {c['error'][:60]}" for c in oom]
    print("\n".join(lines), file=out)
    return dict(summary=summary, wrong=wrong, errors=errs, checked=len(checked), short=short)


def card_family(card) -> str:
    from cogvid_core.plan import cards
    return cards.family_of(card) or str(card)[:9]
