"""Which calibration the estimate uses: one file per card family (cogvid_core/calibration/<family>.json,
written by ``bench/bench_estimate.py --fit ... --write-calibration``), one constants set per CUDA
allocator inside it, chosen at run time from the device's name and torch's allocator backend.

A card with no file of its own (every user card so far: RTX 30xx/40xx, L4, A4000...) takes the NEAREST
file (:func:`nearest`) and its verdicts ask the TRANSFER MARGIN more (calibration/transfer.json, written
by ``bench/estimate_transfer.py --write``: the most a cell of one measured card reserved over what the
other card's file asked of it, where that file measured the configuration); the estimate's report says so. Nearest means, in this order:
- the same major compute capability, then the nearest minor one (the current device's; a card named but
  not present has none to compare): the kernels a stage runs (attention backend, cuDNN convolution
  algorithms and workspaces, cuBLAS workspace) are chosen per architecture, and they are what differs
  in a stage's allocations between cards running the same code and shapes. Memory size is not a
  criterion: it does not change a peak (only at the limit, where the allocator frees its cache and
  reserves less);
- then the file that calibrates the most: fewer stages excluded, file-backed weights (what the loaders
  load), fitted with speed cells (the step's attention / feed-forward split and what a compiled option
  saves: without them a compiled option is counted as if compile saved nothing), more allocator sets.
  Both files today are Hopper (9.0), every stage, three allocators, file-backed; the H100's has the speed
  cells (session 18), so it is the nearest.
A card whose own file has no speed cells (the H200's) estimates a compiled speed option the same way: the
nearest file that has them, plus the margin (choose's ``compiled``).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from cogvid_core.device.info import ALLOCATORS, allocator_backend, allocator_key, device_card  # noqa: F401  (re-exported)
from cogvid_core.device.info import device_capability
from cogvid_core.model.stages import STAGES
from cogvid_core.plan import speedmem

CALIBRATION_DIR = Path(__file__).with_name("calibration")
# the margin a card with no file of its own gets (bench/estimate_transfer.py --write): not a card's file
TRANSFER = CALIBRATION_DIR / "transfer.json"
# family -> substrings of torch.cuda.get_device_name() (upper case) that belong to it
FAMILIES = {"h200": ("H200",), "h100": ("H100",), "a100": ("A100",), "l40": ("L40",), "rtx4090": ("RTX 4090",)}
# compute capability of the card each family's file was measured on (what nearest() compares)
CAPABILITY = {"h200": (9, 0), "h100": (9, 0), "a100": (8, 0), "l40": (8, 9), "rtx4090": (8, 9)}


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


def _rank(fam: str, doc: dict, capability: tuple | None) -> tuple:
    """nearest()'s order for one file (smaller is nearer): architecture, then what the file calibrates."""
    cc = CAPABILITY.get(fam)
    arch = (cc[0] != capability[0], abs(cc[0] * 10 + cc[1] - capability[0] * 10 - capability[1])) \
        if cc and capability else (False, 0)
    return (arch, len(doc.get("excluded") or {}), not str(doc.get("weights", "")).startswith("file-backed"),
            not _speed_fitted(doc),
            -len(doc.get("allocators") or {}), fam)


def nearest(files: dict[str, Path], capability: tuple | None = None) -> str | None:
    """The family whose file a card with none of its own uses (see the module's docstring)."""
    return min(files, key=lambda f: _rank(f, read(files[f]), capability), default=None)


def transfer() -> dict:
    """calibration/transfer.json: {"margin", "between": the measured cards, ...}; {} where there is none."""
    return read(TRANSFER) if TRANSFER.exists() else {}


def _capability_of(card: str | None) -> tuple | None:
    """The compute capability of ``card`` where it is this process's device (None: not known here)."""
    here = device_card()
    return device_capability() if here and card in (None, here) else None


def _unmatched_note(card: str | None, doc: dict, fam: str, capability: tuple | None, margin: float,
                    between: list, stages: list | None = None, allocator: str = "native",
                    allocators: list | None = None, missing: str = "measurements") -> str:
    """What a card with no file (or, ``missing``, without some of its measurements) gets, in plain words."""
    cc = CAPABILITY.get(fam)
    why = (f"nearest architecture measured: compute capability {cc[0]}.{cc[1]}, this card's "
           f"{capability[0]}.{capability[1]}" if cc and capability else
           "the file that calibrates the most: this card's architecture is not known here")
    left = [s.replace("_", " ") for s in STAGES if stages and s not in stages]
    allocators = allocators or [allocator]
    added = (f"with {margin:.1%} added for the difference between cards (measured {' <-> '.join(between)}"
             f"{', no ' + ' or '.join(left) + ' compared' if left else ''}"
             f"{', under the ' + ' and '.join(allocators) + ' allocator' if allocator not in allocators else ''})"
             if between else "with nothing added for the difference between cards (no transfer measured)")
    return f"No {missing} for {card or 'this device'}: using the {doc.get('card')}'s ({why}), {added}"


def _speed_fitted(doc: dict) -> bool:
    return any(speedmem.fitted(a.get("constants") or {}) for a in (doc.get("allocators") or {}).values())


def choose(card: str | None, allocator: str, compiled: bool = False) -> tuple[dict, dict]:
    """(the calibration file's document, what was chosen and why) for this card and allocator.

    The second dict: card (calibrated on), family, allocator (whose constants), matched (this card
    is of that family), tolerance, path, transfer_margin (what a card with no file adds to its
    verdicts, 0 for a matched one); `note` says what is not covered, or "" when all is.

    ``compiled`` (a compiled speed option): a card whose own file has no speed cells takes the nearest
    file that has them, as a card with no file does (margin and note): its own would count compile as
    saving nothing. The H200's compiled resident and lowvram steps (bench/speed_h200.json,
    speed_h200_s6.json, hostrun_h200_s6.json): h200.json +8.6% to +20.3% allocated, h100.json -1.6% to +3.9%."""
    files = available()
    fam = family_of(card)
    matched = fam in files
    capability = None if matched else _capability_of(card)
    missing = "measurements"       # what the note says this card lacks, where it takes another card's file
    if matched and compiled and not _speed_fitted(read(files[fam])):
        with_speed = {f: p for f, p in files.items() if _speed_fitted(read(p))}
        if with_speed:     # its own file says which architecture it is
            files, matched, capability = with_speed, False, _capability_of(card) or CAPABILITY.get(fam)
            missing = "speed measurements"
    fam = fam if matched else nearest(files, capability)
    if fam is None:
        return {}, dict(card=None, family=None, allocator=allocator, matched=False, tolerance=None, path=None,
                        transfer_margin=0.0, note="no calibration file: built-in constants, tolerance unknown")
    path = files[fam]
    doc = read(path)
    allocs = doc.get("allocators", {})
    used = allocator if allocator in allocs else ("native" if "native" in allocs else next(iter(allocs), allocator))
    notes, margin = [], 0.0
    if not matched:
        t = transfer()
        margin = float(t.get("margin", 0.0))
        notes.append(_unmatched_note(card, doc, fam, capability, margin, t.get("between", []), t.get("stages"),
                                     used, t.get("allocators"), missing))
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
                     tolerance=doc.get("tolerance"), path=str(path), transfer_margin=margin, note="; ".join(notes))


def load(path, card: str | None, allocator: str, defaults: dict, compiled: bool = False) -> dict:
    """{"constants": {...}, "choice": {...}, "card", "torch", "diffusers", "date"}: the constants for
    ``allocator`` from the file of ``card``'s family (``path`` None), from ``path``, or ``path``
    itself when it is a dict of constants (fitting, tests); ``defaults`` where they lack one (a
    per-stage fragmentation share a file lacks: the step's)."""
    if isinstance(path, dict):
        doc, choice = {"allocators": {allocator: {"constants": path}}}, dict(
            card="given constants", family=None, allocator=allocator, matched=True, tolerance=path.get("tolerance"),
            path=None, transfer_margin=0.0, note="")
    elif path is None:
        doc, choice = choose(card, allocator, compiled)
    else:
        doc = read(Path(path))
        choice = dict(card=doc.get("card"), family=Path(path).stem, allocator=allocator, matched=True,
                      tolerance=doc.get("tolerance"), path=str(path), transfer_margin=0.0, note="")
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
