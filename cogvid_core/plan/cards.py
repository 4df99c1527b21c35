"""Which calibration the estimate uses: one file per card family (cogvid_core/calibration/<family>.json,
written by ``bench/bench_estimate.py --fit ... --write-calibration``), one constants set per CUDA
allocator inside it, chosen at run time from the device's name and torch's allocator backend.

Cards with no file of their own take the first of FALLBACK that has one (the estimate's report then
says the card it was calibrated on is another one: the tolerance was not checked on this card). The
H200 grid measured the file-backed loading users run; the H100 one in-memory models.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from cogvid_core.device.info import ALLOCATORS, allocator_backend, allocator_key, device_card  # noqa: F401  (re-exported)

CALIBRATION_DIR = Path(__file__).with_name("calibration")
# the margin a card with no file of its own gets (bench/estimate_transfer.py --write): not a card's file
TRANSFER = CALIBRATION_DIR / "transfer.json"
# family -> substrings of torch.cuda.get_device_name() (upper case) that belong to it
FAMILIES = {"h200": ("H200",), "h100": ("H100",), "a100": ("A100",), "l40": ("L40",), "rtx4090": ("RTX 4090",)}
FALLBACK = ("h200", "h100")


def family_of(card: str | None) -> str | None:
    """"h200" for "NVIDIA H200", None for a card no family names (or no card)."""
    if not card:
        return None
    name = card.upper()
    return next((fam for fam, keys in FAMILIES.items() if any(k in name for k in keys)), None)


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CALIBRATION_DIR.glob("*.json")) if p != TRANSFER}


@lru_cache(maxsize=None)
def _read(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def read(path: Path) -> dict:
    return _read(str(path), path.stat().st_mtime)


def choose(card: str | None, allocator: str) -> tuple[dict, dict]:
    """(the calibration file's document, what was chosen and why) for this card and allocator.

    The second dict: card (calibrated on), family, allocator (whose constants), matched (this card
    is of that family), tolerance, path; `note` says what is not covered, or "" when all is."""
    files = available()
    fam = family_of(card)
    matched = fam in files
    path = files.get(fam) if matched else next((files[f] for f in FALLBACK if f in files),
                                               next(iter(files.values()), None))
    if path is None:
        return {}, dict(card=None, family=None, allocator=allocator, matched=False, tolerance=None, path=None,
                        note="no calibration file: built-in constants, tolerance unknown")
    doc = read(path)
    allocs = doc.get("allocators", {})
    used = allocator if allocator in allocs else ("native" if "native" in allocs else next(iter(allocs), allocator))
    notes = []
    if not matched:
        notes.append(f"not calibrated on {card or 'this device'}: the {doc.get('card')} calibration is used, "
                     "its tolerance was not checked here")
    if used != allocator:
        notes.append(f"the {allocator} allocator was not measured on this card: the {used} constants are used" +
                     (" (it reserves more than expandable segments: the estimate errs high)"
                      if (allocator, used) == ("native:expandable", "native") else ""))
    lean = allocs.get(used, {}).get("leans_on", {})
    if lean.get("stages"):
        lo, hi = lean.get("base_reserved_over_own") or (0, 0)
        notes.append(f"{'/'.join(lean['stages'])} not measured under {used}: the {lean['from']} constants are used" +
                     (f" ({lean['from']} reserved {lo - 1:.0%}-{hi - 1:.0%} more in every cell measured under both: "
                      "these stages err high)" if lo > 1 else ""))
    missed = [c for c in doc.get("outside_tolerance", []) if c.get("allocator") == used]
    if missed:
        notes.append(f"{len(missed)} measured {'/'.join(sorted({c['stage'] for c in missed}))} cells outside "
                     f"the tolerance (listed in {path.name})")
    for stage, why in doc.get("excluded", {}).items():
        notes.append(f"{stage} not calibrated on this card ({why}): first-principles constants")
    return doc, dict(card=doc.get("card"), family=path.stem, allocator=used, matched=matched,
                     tolerance=doc.get("tolerance"), path=str(path), note="; ".join(notes))


def load(path, card: str | None, allocator: str, defaults: dict) -> dict:
    """{"constants": {...}, "choice": {...}, "card", "torch", "diffusers", "date"}: the constants for
    ``allocator`` from the file of ``card``'s family (``path`` None), from ``path``, or ``path``
    itself when it is a dict of constants (fitting, tests); ``defaults`` where they lack one (a
    per-stage fragmentation share a file lacks: the step's)."""
    if isinstance(path, dict):
        doc, choice = {"allocators": {allocator: {"constants": path}}}, dict(
            card="given constants", family=None, allocator=allocator, matched=True, tolerance=path.get("tolerance"),
            path=None, note="")
    elif path is None:
        doc, choice = choose(card, allocator)
    else:
        doc = read(Path(path))
        choice = dict(card=doc.get("card"), family=Path(path).stem, allocator=allocator, matched=True,
                      tolerance=doc.get("tolerance"), path=str(path), note="")
    sets = doc.get("allocators", {})
    if choice["allocator"] not in sets and sets:
        choice["allocator"] = "native" if "native" in sets else next(iter(sets))
    given = sets.get(choice["allocator"], {}).get("constants", {})
    c = {**defaults, **given}
    for k in ("text_reserved_frag", "enc_reserved_frag", "reserved_frag_lowmem"):
        if k not in given:         # files fitted with one share for every stage but the decode
            c[k] = c["reserved_frag"]
    if "vae_fixed_bytes" not in given:   # files fitted with one fixed share for every stage
        c["vae_fixed_bytes"] = c["fixed_bytes"]
    return {"constants": c, "choice": choice, **{k: doc.get(k) for k in ("card", "torch", "diffusers", "date")}}
