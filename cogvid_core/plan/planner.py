"""The planner: the fastest profile whose estimated peak fits a VRAM budget.

Candidates run from fastest to slowest (resident, balanced, lowvram, then lowvram with smaller
feed-forward chunks and VAE tiles); :func:`plan` returns the first that fits, per
:func:`cogvid_core.plan.estimate.estimate`. :func:`resolve_profile` is how a run turns ``"auto"`` into
a profile.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from cogvid_core.device.devmem import GiB, device_free_bytes, device_total_bytes
from cogvid_core.plan.estimate import Estimate, cache_bytes, estimate, tokens
from cogvid_core.model.precision import PrecisionError
from cogvid_core.speed import caches, fast
from cogvid_core.model.variants import VARIANTS
from cogvid_core.memory.profiles import AUTO, PROFILES, Profile, TileSpec, get_profile, snap_tile
from cogvid_core.model.stages import LABELS

log = logging.getLogger(__name__)

# smaller tiles than lowvram's, multiples of 40 px: with overlap 0.2 they split into whole latent steps
SMALLER_TILES = ((200, 320), (160, 240), (120, 160), (80, 120))
SMALLER_CHUNKS = (4096, 2048, 1024)
# From this many tokens a branch computes long enough to hide a second pass of streamed weights, so
# batched CFG only doubles the activations. H200, 1.5 at 81x768x1360 (45,106 tokens): lowvram with
# one branch at a time 7.75 s/step, batched 7.90 (ComfyUI) and 7.94 (CLI), denoise reserved 3.3 vs
# 5.7 GiB (bench/hostrun_h200_c5.json, comfyui_gpu_h200_c6.json, estimate_h200_async.json). At
# 17,550 tokens (1.0 at 49x480x720) batched is the faster one. Slower GPUs compute longer per block,
# which hides the weight pass better still.
SEQUENTIAL_FIRST_TOKENS = 32768


def candidates(base_profiles: dict[str, Profile] | None = None, tokens: int | None = None) -> list[Profile]:
    """Profiles from fastest to slowest: resident, balanced, lowvram, then lowvram with smaller
    feed-forward chunks and VAE tiles (the slowest last). ``tokens`` (the run's sequence length): at
    :data:`SEQUENTIAL_FIRST_TOKENS` or more, streamed profiles run CFG one branch at a time only
    (batched would be as fast and hold twice the activations)."""
    profiles = base_profiles if base_profiles is not None else PROFILES
    out = [profiles[k] for k in ("resident", "balanced") if k in profiles]
    low = profiles.get("lowvram")
    if low is None:
        return out
    lows = [low, *_lowvram_variants(low)]
    # Streamed weights cross PCIe once per transformer call: a batched CFG step moves them once, one
    # branch at a time twice (1.43x s/step at 1.0 on an H100), so each batched variant comes first,
    # unless the sequence is long enough to hide the second pass.
    batched_first = tokens is None or tokens < SEQUENTIAL_FIRST_TOKENS
    for prof in lows:
        if batched_first and prof.cfg_mode == "sequential" and prof.transformer == "stream":
            out.append(_derive(prof, cfg_mode="batched"))
        out.append(prof)
    return out


def one_branch(profiles: list[Profile]) -> list[Profile]:
    """Candidates for a CFG pair (two GPUs, one branch each: batched CFG is off): each candidate in
    its sequential form, once, fastest first; a profile already sequential keeps its name."""
    out: dict[Profile, Profile] = {}
    for prof in profiles:
        seq = prof if prof.cfg_mode == "sequential" else _derive(prof, cfg_mode="sequential")
        key = dataclasses.replace(seq, name="")
        if key not in out or prof.cfg_mode == "sequential":
            out[key] = seq
    return list(out.values())


def _lowvram_variants(low: Profile) -> list[Profile]:
    """``low`` with smaller feed-forward chunks and/or tiles, fewest and mildest changes first
    (each step down a list costs a little speed); tiles the decode cannot use are left out."""
    chunk0 = low.ff_chunk or 16384
    t0 = low.vae_tile or TileSpec(240, 360, 1 / 6)
    chunks = [None] + [c for c in SMALLER_CHUNKS if c < chunk0]
    tiles = [None] + [TileSpec(th, tw, t0.overlap) for th, tw in SMALLER_TILES if th * tw < t0.height * t0.width]
    combos = sorted(((i, j) for i in range(len(chunks)) for j in range(len(tiles)) if i or j),
                    key=lambda ij: (ij[0] + ij[1], ij[0]))
    out = []
    for i, j in combos:
        change = {}
        if chunks[i]:
            change["ff_chunk"] = chunks[i]
        if tiles[j]:
            change["vae_tile"] = tiles[j]
        prof = _derive(low, **change)
        try:
            prof.validate()
        except ValueError:
            continue
        out.append(prof)
    return out


def _derive(profile: Profile, **changes) -> Profile:
    """``profile`` with ``changes``, named after them (e.g. ``lowvram+ff4096+tile240x160``)."""
    tag = []
    if "ff_chunk" in changes:
        tag.append(f"ff{changes['ff_chunk']}")
    if "cfg_mode" in changes:
        tag.append(f"cfg-{changes['cfg_mode']}")
    if "vae_tile" in changes:
        tag.append(f"tile{changes['vae_tile'].width}x{changes['vae_tile'].height}")
    return dataclasses.replace(profile, name=f"{profile.name}+{'+'.join(tag)}", **changes)


def plan(variant, frames: int, height: int, width: int, budget_bytes: int, precision: dict | None = None,
         profiles: dict | None = None, calibration_path: Path | None = None, tiny: bool = False,
         keep_loaded: bool = False, lora_bytes: int = 0, cfg_pair: bool = False,
         speed: str = "exact", cache: str = "none") -> tuple[Profile, Estimate]:
    """(profile, estimate) of the fastest profile whose peak reserved fits budget_bytes (``cfg_pair``:
    the per-GPU budget of a CFG pair, among :func:`one_branch` candidates). ``cache``: a step cache,
    its held activations counted (on a CFG pair each GPU holds one branch's; fastercache cannot run there);
    fastercache only among batched-CFG profiles (it needs the batched pair).

    Raises ValueError saying what the smallest option needs when none fits."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    spec = caches.check(cache, "sequential", True, caches.PAIR) if cfg_pair else caches.parse(cache)
    args = (v, frames, height, width, budget_bytes, precision, profiles, calibration_path, tiny, keep_loaded,
            lora_bytes, cfg_pair, speed)
    prof, est, last = _first_fit(*args, spec)
    if prof is not None:
        return prof, est
    if last is None:
        raise ValueError("no placement profiles to choose from")
    fits = _caches_that_fit(args, spec) if spec.on else ""
    raise ValueError(f"{frames} frames at {width}x{height} needs ~{last.needed_bytes / GiB:.1f} GiB with profile "
                     f"{last.profile_name} (peak: {LABELS[last.peak_stage]}), the budget is "
                     f"{budget_bytes / GiB:.1f} GiB: {fits}reduce frames or size, or free GPU memory")


def _first_fit(v, frames, height, width, budget_bytes, precision, profiles, calibration_path, tiny, keep_loaded,
               lora_bytes, cfg_pair, speed, spec):
    """(profile, estimate, None) of the first candidate that fits, else (None, None, the last estimate)."""
    last = None
    for prof in (one_branch if cfg_pair else list)(candidates(profiles, tokens(v, frames, height, width))):
        if spec.name == "fastercache" and prof.cfg_mode != "batched":
            continue
        est = estimate(v, frames, height, width, prof, precision, budget_bytes=budget_bytes,
                       calibration_path=calibration_path, tiny=tiny, keep_loaded=keep_loaded,
                       lora_bytes=lora_bytes, speed=speed, cache=str(spec), cache_branches=1 if cfg_pair else 2)
        if est.fits:
            return prof, est, None
        last = est
    return None, None, last


def _runs_on_pair(name: str) -> bool:
    """Whether the cache runs on a CFG pair (caches.check's rule, the one the sampler applies)."""
    try:
        caches.check(name, "sequential", True, caches.PAIR)
    except ValueError:
        return False
    return True


def _caches_that_fit(args: tuple, spec) -> str:
    """'step cache X holds ~N GiB on the GPU; what fits: cache a, b; or ' for the refusal of a plan."""
    v, frames, height, width, _budget, precision, _p, _c, tiny = args[:9]
    pair = args[11]
    held = cache_bytes(v, frames, height, width, str(spec), precision, tiny, 1 if pair else 2)
    runs = [name for name in caches.NAMES if not pair or _runs_on_pair(name)]
    fit = [name for name in runs if name != spec.name and _first_fit(*args, caches.parse(name))[0] is not None]
    return (f"step cache {spec} holds ~{held / GiB:.1f} GiB of activations on the GPU; "
            f"{'what fits: cache ' + ', '.join(fit) if fit else 'no cache fits either'}; or ")


def best_estimate(variant, frames: int, height: int, width: int, budget_bytes: int | None,
                  lora_bytes: int = 0, speed: str = "exact", precision: dict | None = None,
                  cache: str = "none") -> Estimate:
    """The plan's estimate (fastest profile that fits); without a budget the 'balanced' one; when
    nothing fits, the leanest profile's estimate (its report says DOES NOT FIT and what to change).
    ``precision``: {component: name} (missing: auto, as the loaders pick)."""
    if budget_bytes is None:
        return estimate(variant, frames, height, width, "balanced", precision, lora_bytes=lora_bytes, speed=speed,
                        cache=cache)
    try:
        return plan(variant, frames, height, width, budget_bytes, precision, lora_bytes=lora_bytes, speed=speed,
                    cache=cache)[1]
    except PrecisionError:
        raise
    except ValueError:
        return estimate(variant, frames, height, width, candidates()[-1], precision, budget_bytes=budget_bytes,
                        lora_bytes=lora_bytes, speed=speed, cache=cache)


def gpu_budget(device=None, reserve_bytes: int = 0) -> int | None:
    """Free bytes on a CUDA device (default: the current one) minus a reserve; None for CPU or no CUDA."""
    if device is None and torch.cuda.is_available():
        device = "cuda"
    free = device_free_bytes(device)
    return None if free is None else max(0, free - int(reserve_bytes))


def own_budget(free_bytes: int, held_bytes: int) -> int:
    """The budget for a component's own plan: the device's free bytes plus those it already holds there,
    which its next placement reuses or gives back. On free memory alone a card that fits 'resident' only
    without the transformer on it (32-40 GB for 1.5 at 81x768x1360) chose resident, then balanced with
    the resident weights counted as taken, then resident again: ~11 GB re-read every other queue."""
    return int(free_bytes) + max(0, int(held_bytes))


def _free_budget(devices, dev: torch.device, held_bytes: int) -> int | None:
    """The smallest free memory of ``devices`` (None without CUDA), ``dev``'s with ``held_bytes`` back."""
    budgets = []
    for d in devices:
        free = gpu_budget(d)
        if free is not None:
            budgets.append(own_budget(free, held_bytes if torch.device(d) == dev else 0))
    return min(budgets) if budgets else None


def check_budget_fits_card(budget_bytes: int, device) -> None:
    """A budget typed for a bigger card (``--vram-budget 40`` on a 24 GB card) would give a plan that reads
    the weights and runs out of memory minutes later: refused before anything loads."""
    total = device_total_bytes(device) if device is not None else None
    if total is not None and budget_bytes > total:
        raise ValueError(f"the VRAM budget ({budget_bytes / GiB:.1f} GiB) is more than {device} has in all "
                         f"({total / GiB:.1f} GiB): give at most {total / GiB:.1f} GiB, or leave the budget out to "
                         "plan with what the GPU has free")


def resolve_profile(name: str | Profile, budget_bytes: int | None = None, estimate_fn=None, *,
                    variant=None, frames: int | None = None, height: int | None = None, width: int | None = None,
                    device=None, budget_gib: float | None = None, precision: dict | None = None,
                    lora_bytes: int = 0, devices=(), cfg_pair: bool = False, speed: str = "exact",
                    held_bytes: int = 0, cache: str = "none") -> Profile:
    """A named profile, or for ``"auto"`` the fastest profile that fits the VRAM budget.

    ``estimate_fn(budget_bytes) -> Profile`` overrides the choice (tests, other planners); by default
    :func:`plan` picks. The budget is ``budget_bytes``, else ``budget_gib``, else the device's free
    memory (:func:`gpu_budget`). On a CPU device ``auto`` is ``resident``. ``lora_bytes``: the
    LoRAs' device bytes, counted with the transformer's weights. ``devices``: every GPU the run uses
    (components on different cards, a CFG pair): the free-memory budget is the smallest one's;
    ``cfg_pair``: each GPU runs one CFG branch (:func:`plan`); ``speed``: the transformer's speed option
    (its memory counts in the estimate; ``fastest``: what it picks on ``device``); ``held_bytes``: what the component being planned already holds
    on ``device`` (a transformer left resident by the last run), free for its own plan (:func:`own_budget`).
    """
    if not (isinstance(name, str) and name == AUTO):
        return get_profile(name)
    dev = torch.device(device) if device is not None else None
    if dev is not None:
        speed = fast.recipe(speed, dev)
    if budget_bytes is None and budget_gib is not None:
        budget_bytes = int(budget_gib * GiB)
        check_budget_fits_card(budget_bytes, dev)
    if budget_bytes is None:
        if dev is None or dev.type == "cpu" or not torch.cuda.is_available():
            return PROFILES["resident"]
        budget_bytes = _free_budget(devices or [dev], dev, held_bytes)
        if budget_bytes is None:
            return PROFILES["resident"]
    if estimate_fn is not None:
        return get_profile(estimate_fn(budget_bytes))
    if variant is None or frames is None or height is None or width is None:
        raise ValueError("profile 'auto' needs the variant, frames, height and width to pick from a budget")
    prof, est = plan(variant, frames, height, width, budget_bytes, precision, lora_bytes=lora_bytes,
                     cfg_pair=cfg_pair, speed=speed, cache=cache)
    if prof.vae_tile is not None:        # derived candidates may carry inexact tiles
        prof = dataclasses.replace(prof, vae_tile=snap_tile(prof.vae_tile))
    log.info("auto placement: %s (estimated peak %.1f GiB of %.1f GiB)%s", prof.name,
             est.peak_reserved / GiB, budget_bytes / GiB, f"; {est.decode_note()}" if est.decode_note() else "")
    return get_profile(prof)
