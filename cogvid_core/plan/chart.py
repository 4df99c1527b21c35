"""How an estimate reads: the advice when it does not fit, the text report, and the bar chart
(per stage weights, activations and reserved memory against the budget)."""
from __future__ import annotations

import math

from cogvid_core.device.devmem import GiB
from cogvid_core.memory.profiles import PROFILES
from cogvid_core.model.tiles import exact_overlap
from cogvid_core.model.variants import VARIANTS
from cogvid_core.model.stages import COMPONENT_OF_STAGE, LABELS


def _blended(tile) -> tuple | None:
    """(h, w, blended rows, blended columns) of a decode tile (h, w, overlap), as diffusers runs it."""
    if tile is None:
        return None
    h, w, ov = int(tile[0]), int(tile[1]), float(tile[2])
    return h, w, int(h * exact_overlap(h, ov)), int(w * exact_overlap(w, ov))


def decode_tile_note(tile) -> str:
    """One line when the decode tile ((h, w, overlap) or None: untiled) is not the resident profile's, ""
    when it is. The encode and the sampling give the resident profile's numbers in every profile; diffusers'
    tiled decode blends tiles, so another tile (e.g. the planner's smaller ones on small budgets) gives
    slightly different frames."""
    res = PROFILES["resident"].vae_tile
    ref = (res.height, res.width, res.overlap)
    if _blended(tile) == _blended(ref):
        return ""
    mine = f"decode tile {tile[1]}x{tile[0]} (overlap {tile[2]:.3g})" if tile is not None else "untiled decode"
    return (f"note: {mine}, not the resident profile's {ref[1]}x{ref[0]} (overlap {ref[2]:.3g}): diffusers blends "
            f"decode tiles, so the frames differ slightly from the resident profile's")


def advice(est) -> str:
    """What to change when the estimate does not fit its budget; "" when it fits or has none."""
    if est.fits is not False:
        return ""
    worst = est.peak_stage
    comp = COMPONENT_OF_STAGE[worst]
    s = est.stage(worst)
    if s.weights >= s.activations:
        if est.keep_loaded:
            return (f"the {LABELS[worst]} is the peak and mostly weights: offload the models it does not "
                    f"use, stream the {comp} or store it in fp8; or use the 'lowvram' profile")
        return (f"the {LABELS[worst]} is the peak and mostly weights: stream the {comp} "
                f"or store it in fp8; or use the 'lowvram' profile")
    if worst == "decode":
        return "the decode is the peak: use smaller VAE tiles (e.g. 192x288 or 128x192)"
    if worst == "denoise_step":
        return ("the denoise step's activations are the peak: sequential CFG, smaller feed-forward chunks, "
                "low-memory attention, or fewer frames / a smaller size")
    return "use the 'lowvram' profile"


def headline(est, host_available: int | None = None) -> str:
    """The verdict in one plain line: first in the report, on the chart."""
    video = f"{est.frames} frames at {est.width}x{est.height}"
    need = est.needed_bytes / GiB
    if est.budget_bytes is None:
        line = f"No verdict (no CUDA device here): {video} needs ~{need:.1f} GiB of GPU memory, profile {est.profile_name}"
    elif est.fits:
        line = (f"FITS: {video} needs ~{need:.1f} GiB of your {est.budget_bytes / GiB:.1f} GiB "
                f"({(est.budget_bytes - est.needed_bytes) / GiB:.1f} GiB to spare), profile {est.profile_name}")
    else:
        line = (f"DOES NOT FIT: {video} needs ~{need:.1f} GiB, you have {est.budget_bytes / GiB:.1f} GiB: "
                f"{advice(est)}")
    if host_available is not None and est.host_peak_bytes > host_available:
        line += (f"; RAM too small: needs ~{est.host_peak_bytes / GiB:.1f} GiB, {host_available / GiB:.1f} GiB "
                 "available")
    return line


def report_text(est, host_available: int | None = None) -> str:
    """The verdict line first, then the per-stage table and how the verdict was reached, as the CLI
    and the estimate node show it; with ``host_available`` (MemAvailable) also whether this machine's
    RAM holds the plan."""
    from cogvid_core.memory.hostplan import verdict

    g = lambda b: f"{b / GiB:6.2f}"
    tile = f"{est.tile[1]}x{est.tile[0]}" if est.tile else "off"
    lines = [headline(est, host_available), "",
             f"{VARIANTS[est.variant_key].label}, {est.tokens} tokens: CFG {est.cfg_mode}, "
             f"feed-forward chunk {est.ff_chunk or 'off'}, VAE tile {tile}",
             "precision: " + ", ".join(f"{k} {v}" for k, v in est.precision.items()),
             f"{'GiB':<14}{'weights':>8}{'activ.':>8}{'alloc.':>8}{'reserved':>10}{'host':>7}{'file':>7}"]
    for s in est.stages:
        lines.append(f"{LABELS[s.name]:<14}{g(s.weights):>8}{g(s.activations):>8}"
                     f"{g(s.peak_allocated):>8}{g(s.peak_reserved):>10}{g(s.host_bytes):>7}{g(s.host_file_bytes):>7}")
    lines.append(f"{'overall peak':<14}{'':>8}{'':>8}{g(est.peak_allocated):>8}{g(est.peak_reserved):>10}"
                 f"  ({LABELS[est.peak_stage]})")
    name = est.needed_stage
    need, extra = est.stage(name), est.stage_margin_extra(name)
    seen = f"{est.stage_margin(name) * 100:.0f}%"
    if extra is not None and est.calibration.get("tolerance") is not None:
        seen += f", {extra / GiB:.2f} GiB; at least its {est.calibration['tolerance']:.0%} tolerance"
    if est.transfer_margin:
        seen += f"; then +{est.transfer_margin:.1%} for another card's calibration"
    lines.append(f"needed: {LABELS[name]} reserved {need.peak_reserved / GiB:.2f} + "
                 f"{(est.needed_bytes - need.peak_reserved) / GiB:.2f} GiB margin (largest misses "
                 f"seen for this stage: {seen}) = {est.needed_bytes / GiB:.2f} GiB")
    lines.append("host: RAM the process owns (anonymous + pinned); file: checkpoint bytes re-read per use, "
                 "which the page cache keeps when RAM allows (else read from disk, slower)")
    if host_available is not None or est.host_peak_bytes:
        lines.append(verdict(est.host_peak_bytes, host_available, max(s.host_file_bytes for s in est.stages)))
    if decode_tile_note(est.tile):
        lines.append(decode_tile_note(est.tile))
    lines.append(calibration_line(est))
    return "\n".join(lines)


def calibration_line(est) -> str:
    """The card the estimate was calibrated on, the allocator and the tolerance, and what is not covered."""
    cal = est.calibration or {}
    if not cal.get("card"):
        return f"calibration: {est.calibration_source or 'built-in defaults'} (tolerance unknown)"
    tol = cal.get("tolerance")
    line = (f"calibrated on {cal['card']} ({cal['allocator']} allocator): peak allocated and reserved of the "
            f"stages it covers within {'+-' + format(tol, '.0%') if tol else 'an unknown tolerance'} of measured "
            f"on its grid; "
            f"{est.calibration_source}")
    return line + (f". NOTE: {cal['note']}" if cal.get("note") else "")


STAGE_COLORS = {"weights": (70, 110, 190), "activations": (230, 150, 60), "reserved": (200, 200, 200)}
SHORT = {"text_encode": "text", "image_encode": "image", "denoise_step": "denoise", "decode": "decode"}
# Font heights as a fraction of the chart's width: the workflows show the chart in a Preview Image
# node a few hundred screen pixels wide at their saved zoom (tests/test_ux_details.py holds >= 9 px).
FONT_BIG, FONT_TEXT = 0.042, 0.034


def _font(px: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=px)       # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):                     # noqa: PERF203  (older Pillow: its small bitmap font)
        return ImageFont.load_default()


def chart_image(est, width: int = 800, height: int = 480):
    """The verdict on top, then bars per stage (weights + activations, reserved behind) against the
    budget line: uint8 HxWx3."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    big, text = _font(round(width * FONT_BIG)), _font(round(width * FONT_TEXT))
    th = round(width * FONT_TEXT)
    ok = est.fits is not False
    color = (0, 130, 0) if est.fits else (200, 0, 0) if est.fits is False else (60, 60, 60)
    need = est.needed_bytes / GiB
    if est.budget_bytes is None:
        title = f"needs ~{need:.1f} GiB (no GPU: no verdict)"
    else:
        title = f"{'FITS' if ok else 'DOES NOT FIT'}: ~{need:.1f} of {est.budget_bytes / GiB:.1f} GiB"
    d.text((8, 4), title, fill=color, font=big)
    d.text((8, 8 + round(width * FONT_BIG)), f"{VARIANTS[est.variant_key].label}  {est.frames}f {est.width}x"
           f"{est.height}  {est.profile_name}", fill=(40, 40, 40), font=text)
    left, right = round(th * 2.2), width - 8
    top, bottom = 24 + round(width * FONT_BIG) + th + th // 2, height - th - 12
    top_val = max([est.needed_bytes] + ([est.budget_bytes] if est.budget_bytes else [])) * 1.08 or 1
    y = lambda b: bottom - (bottom - top) * b / top_val
    step = max(1, math.ceil(top_val / GiB / 4))
    for gb in range(0, int(top_val / GiB) + 1, step):
        d.line([(left, y(gb * GiB)), (right, y(gb * GiB))], fill=(232, 232, 232))
        d.text((4, y(gb * GiB) - th // 2), f"{gb}G", fill=(90, 90, 90), font=text)
    slot = (right - left) / len(est.stages)
    for i, s in enumerate(est.stages):
        x0, x1 = left + slot * i + slot * 0.15, left + slot * (i + 1) - slot * 0.15
        d.rectangle([x0, y(s.peak_reserved), x1, bottom], fill=STAGE_COLORS["reserved"])
        d.rectangle([x0, y(s.weights), x1, bottom], fill=STAGE_COLORS["weights"])
        d.rectangle([x0, y(s.peak_allocated), x1, y(s.weights)], fill=STAGE_COLORS["activations"])
        d.text((x0, bottom + 4), SHORT[s.name], fill=(0, 0, 0), font=text)
        d.text((x0, y(s.peak_reserved) - th - 2), f"{s.peak_reserved / GiB:.1f}", fill=(0, 0, 0), font=text)
    d.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    if est.budget_bytes:
        yy = y(est.budget_bytes)
        d.line([(left, yy), (right, yy)], fill=color, width=max(2, width // 250))
        d.text((right - th * 7, yy - th - 2), f"budget {est.budget_bytes / GiB:.1f}", fill=color, font=text)
    return np.asarray(img, dtype=np.uint8).copy()
