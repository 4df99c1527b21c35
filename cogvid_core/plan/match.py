"""Does a plan belong to the video being made?

A plan (an estimate.Estimate, the VRAM Estimate node's output) is made for one variant, frame count and
size, typed on the estimate; the run's are typed elsewhere: the variant comes from the loaded transformer,
the frames from the Sampler, the size from the Image Encode. A plan applied to another video picks its
memory settings (and told the user "fits") for a video that is not made, so each node that takes a plan
compares it with what it knows of the run and refuses a mismatch with the fix: which widget to change.
"""
from __future__ import annotations

from cogvid_core.device.devmem import GiB
from cogvid_core.model.variants import VARIANTS
from cogvid_core.speed import caches

ESTIMATE = "the VRAM Estimate"


def _label(key) -> str:
    v = VARIANTS.get(key) if isinstance(key, str) else key
    return v.label if v is not None else str(key)


def _key(variant) -> str | None:
    return variant if isinstance(variant, str) or variant is None else variant.key


def plan_mismatch(plan, variant=None, frames: int | None = None, height: int | None = None,
                  width: int | None = None, variant_source: str = "the loaded transformer",
                  cache: str | None = None) -> str | None:
    """One line saying how ``plan`` differs from the run and what to change, None when it matches (or
    there is no plan). ``variant`` (a Variant or its key), ``frames``, ``height``/``width`` and the
    Sampler's step ``cache`` are what the calling node knows of the run (None: not known there, not
    compared); ``variant_source`` names where the run's variant comes from."""
    if plan is None:
        return None
    made, fixes = [], []
    key, planned_key = _key(variant), getattr(plan, "variant_key", None)
    if key is not None and planned_key is not None and key != planned_key:
        made.append(f"{variant_source} is {_label(key)}")
        fixes.append(f"set {ESTIMATE}'s variant to {_label(key)}")
    planned_frames = getattr(plan, "frames", None)
    if frames is not None and planned_frames is not None and frames != planned_frames:
        made.append(f"the Sampler makes {frames} frames")
        fixes.append(f"set {ESTIMATE}'s frames to {frames} (or the Sampler's to {planned_frames})")
    ph, pw = getattr(plan, "height", None), getattr(plan, "width", None)
    if height is not None and width is not None and ph is not None and (height, width) != (ph, pw):
        made.append(f"the Image Encode makes {width}x{height}")
        fixes.append(f"set {ESTIMATE}'s width/height to {width}x{height} (or the Image Encode's to {pw}x{ph})")
    planned_cache = getattr(plan, "cache", None)
    other_cache = cache is not None and planned_cache is not None and str(caches.parse(cache)) != planned_cache
    if other_cache:
        made.append(f"the Sampler's cache is {cache}")
        fixes.append(f"set {ESTIMATE}'s cache to {cache} (a cache holds GiBs the plan must count)")
    if not made:
        return None
    planned = f"{planned_frames} frames at {pw}x{ph} of {_label(planned_key)}"
    if other_cache:
        planned += f" with cache {planned_cache}"
    return (f"{ESTIMATE}'s plan is for {planned}, but {', '.join(made)}: {'; '.join(fixes)}, so that the plan "
            "and its verdict are for the video you make")


class PlanMismatch(ValueError):
    """A plan made for another video than the one running (the message says which widget to change)."""


def check_plan(plan, variant=None, frames: int | None = None, height: int | None = None, width: int | None = None,
               variant_source: str = "the loaded transformer", cache: str | None = None) -> None:
    """Raise PlanMismatch with plan_mismatch's line when ``plan`` is for another video."""
    message = plan_mismatch(plan, variant, frames, height, width, variant_source, cache)
    if message is not None:
        raise PlanMismatch(message)


def plan_beyond_card(plan, card_bytes: int | None, card_name: str = "this GPU") -> str | None:
    """One line when ``plan`` cannot run on a card of ``card_bytes`` (its whole memory less the front end's
    reserve) whatever else is on it: a plan typed for a bigger card (the 24 GB workflow's budget_gib 22 on
    a 12 GB card) would read the weights and then run out of memory, minutes in. Judged on the plan's
    predicted reserved peak without the verdict's margins (measured within -12 %/+15 % on the H100): above
    the whole card, the run fails more often than not, and budget_gib 0 gives a plan that fits. None when
    it may fit, or when the card or the plan's budget is not known."""
    if plan is None or card_bytes is None or getattr(plan, "budget_bytes", None) is None:
        return None
    if plan.peak_reserved <= card_bytes:
        return None
    return (f"{ESTIMATE}'s plan ({plan.profile_name}, made for a {plan.budget_bytes / GiB:.1f} GiB budget) needs "
            f"~{plan.peak_reserved / GiB:.1f} GiB at its peak ({plan.peak_stage.replace('_', ' ')}), but {card_name} "
            f"has {card_bytes / GiB:.1f} GiB in all: set {ESTIMATE}'s budget_gib to 0 to plan for this GPU (or "
            "open the workflow made for a smaller card)")


class PlanBeyondCard(PlanMismatch):
    """A plan made for a bigger card than the one running (the message says what to change)."""


def check_plan_fits_card(plan, card_bytes: int | None, card_name: str = "this GPU") -> None:
    """Raise PlanBeyondCard with plan_beyond_card's line, before anything is loaded for the plan."""
    message = plan_beyond_card(plan, card_bytes, card_name)
    if message is not None:
        raise PlanBeyondCard(message)
