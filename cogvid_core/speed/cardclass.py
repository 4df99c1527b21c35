"""Card classes for the speed options: what ``fastest`` runs on each kind of card, and the compute
capability every speed check reads (``capability``: the one place where ``COGVID_EMULATE_CC`` is read).

``fastest`` is not a recipe of its own: per card class below, a list of recipes (``fast`` names), best
first; ``fast.pick`` takes the first whose parts all run here (package installed, capability), and
``exact`` ends every list, so ``fastest`` runs wherever ``exact`` does. Only the Hopper row is measured
(H200, bench/speed_h200*.json, docs/performance.md "Speed options"); the other rows follow what the
kernels' authors publish and what each card has, and say so.

``COGVID_EMULATE_CC=8.6`` (bench/bench_speed.py ``--emulate-cc``) makes the capability checks (fp8's
>= 8.9, fa3fp8's 9.0, the class ``fastest`` picks from) see 8.6 instead of the real card's: for
measuring on an H100 what an Ampere or Ada card would be given. The kernels still run on the real card,
so the seconds are the H100's, not the emulated card's. Nothing else reads it (precision rules do not).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

EMULATE_CC = "COGVID_EMULATE_CC"
_said: set = set()          # emulated values already logged (once per process each)


def emulated() -> tuple[int, int] | None:
    """The capability COGVID_EMULATE_CC asks for (logged once per value), None when unset."""
    text = os.environ.get(EMULATE_CC, "").strip()
    if not text:
        return None
    major, dot, minor = text.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise ValueError(f"{EMULATE_CC}={text!r}: give a compute capability as MAJOR.MINOR, e.g. 8.6 (or unset it)")
    cc = (int(major), int(minor))
    if cc not in _said:
        _said.add(cc)
        log.warning("%s=%s: the speed options' capability checks see compute capability %d.%d, not this GPU's "
                    "(a bench setting: the kernels still run on this GPU)", EMULATE_CC, text, *cc)
    return cc


def capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA ``device`` as the speed checks see it (``COGVID_EMULATE_CC`` if set);
    None for any other device or without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return emulated() or tuple(torch.cuda.get_device_capability(device))


def describe(device) -> str:
    """'this GPU (NVIDIA GeForce RTX 4090, compute capability 8.9)' for the notes; 'the CPU' etc."""
    cc = capability(device)
    if cc is None:
        return f"this device ({torch.device(device).type}, no CUDA GPU)"
    try:
        name = torch.cuda.get_device_name(torch.device(device))
    except (RuntimeError, AssertionError):       # a CPU build of torch told it has CUDA (tests)
        name = "a CUDA GPU"
    emulated = f", emulated by {EMULATE_CC}" if os.environ.get(EMULATE_CC, "").strip() else ""
    return f"this GPU ({name}, compute capability {cc[0]}.{cc[1]}{emulated})"


@dataclass(frozen=True)
class CardClass:
    name: str
    lowest: tuple | None        # lowest capability of the class; None: no CUDA GPU
    recipes: tuple              # fast names, best first; exact last
    lacks: str = ""             # what this class cannot have, said in fastest's note


# Highest first; a card belongs to the first class whose ``lowest`` it reaches.
CLASSES = (
    # RTX 50xx (12.0), B200 (10.0). Nothing measured. FA3's FP8 kernels are Hopper's (attention._fa3_reason);
    # torch's per-row float8 matmul was sm_90 only at first (pytorch/pytorch#145728) and came to sm_12x later
    # (#155991), and `pip install sageattention` (1.0.6) is reported to give black frames on RTX 50xx
    # (Comfy-Org/ComfyUI discussion #11583): fastest keeps to compile here until one is measured. Asked by
    # name, fp8 and sage still run.
    CardClass("newer than Hopper", (10, 0), ("compile", "exact"),
              lacks="FlashAttention-3's FP8 is Hopper only; fp8 and sage are not measured on this card, ask for "
                    "them by name to try them"),
    # H100, H200 (9.0). Measured, H200, 1.5 at 81x768x1360, s/step against exact (bench/speed_h200_s6.json):
    # fp8+fa3fp8+compile 0.595x, fa3fp8+compile 0.649x (no torchao), fa3fp8 0.779x (no triton), fp8+compile
    # 0.836x (no FA3), compile 0.876x. sage is left out: 1.016x alone (bench/speed_h200.json), no faster
    # than the cuDNN attention torch already runs there; cudnn likewise (1.000x).
    CardClass("Hopper", (9, 0), ("fp8+fa3fp8+compile", "fa3fp8+compile", "fa3fp8", "fp8+compile", "compile", "exact")),
    # RTX 40xx, L4, L40S, RTX 6000 Ada (8.9). Not measured on such a card. float8 tensor cores from 8.9
    # (torchao's own check; torch's per-row float8 kernel for sm_89: pytorch/pytorch#144348). SageAttention's
    # README: kernels for Ampere, Ada and Hopper; its paper (arXiv 2410.02367): ~2.1x FlashAttention-2's
    # attention throughput, a kernel figure, not a CogVideoX step. On Hopper the fast attention added most
    # on top of fp8+compile (0.836x -> 0.595x with FA3), so fp8 with sage comes first; no FA3 FP8 for Ada.
    # Emulated on an H100 (bench/speed_emulate89_sage_h100.json): fp8+sage+compile 0.818x, fp8+compile 0.809x, but
    # there exact runs Hopper's cuDNN attention; an Ada card's SDPA runs the flash kernel (1.205x exact on the
    # H100, sage 0.84x of it: bench/speed_emulate86_h100.json).
    CardClass("Ada", (8, 9), ("fp8+sage+compile", "fp8+compile", "sage+compile", "compile", "exact"),
              lacks="FlashAttention-3's FP8 is Hopper only"),
    # RTX 30xx, A100, A10, A4000 (8.0-8.7). Not measured on such a card. No float8 matmuls (< 8.9); sage's
    # kernels cover Ampere (its README). cudnn is left out: torch's SDPA ranks cuDNN first from Hopper on and
    # runs its flash kernel here; putting cuDNN first is not measured on Ampere. Emulated on an H100
    # (bench/speed_emulate86_h100.json): sage+compile 0.869x, compile 0.854x with the H100's cuDNN attention.
    CardClass("Ampere", (8, 0), ("sage+compile", "compile", "exact"),
              lacks="float8 matmuls need compute capability 8.9 (Ada, Hopper); FlashAttention-3's FP8 is Hopper only"),
    # RTX 20xx, T4 (7.5), V100 (7.0). Not measured. Triton (torch.compile's GPU backend) needs 7.0
    # (torch._dynamo's is_triton_capable); SageAttention's README names kernels from Ampere on only.
    CardClass("Turing or Volta", (7, 0), ("compile", "exact"),
              lacks="fp8 needs compute capability 8.9; sage is not offered for cards before Ampere"),
    # GTX 10xx, P100 and older: torch.compile's Triton backend refuses cards under 7.0.
    CardClass("older than Volta", (0, 0), ("exact",),
              lacks="torch.compile's Triton backend needs compute capability 7.0 or newer"),
    # CPU (or MPS): every kernel above is CUDA's; compile on the CPU is a C++ build whose gain on this model
    # is not measured, and the CPU is the check path, not the video path.
    CardClass("no CUDA GPU", None, ("exact",), lacks="the speed options' kernels need a CUDA GPU"),
)


# AMD cards under ROCm report their gfx version as a capability (MI250: 9.0, MI300: 9.4): the classes above
# are NVIDIA's, and no recipe is measured on ROCm.
ROCM = CardClass("ROCm GPU", None, ("exact",),
                 lacks="the card classes are NVIDIA's; ask for a recipe by name to try it")


def card_class(cc: tuple | None) -> CardClass:
    """The class a capability (None: no CUDA GPU) belongs to."""
    if cc is None:
        return CLASSES[-1]
    return next(c for c in CLASSES if c.lowest is not None and tuple(cc) >= c.lowest)


def class_of(device) -> CardClass:
    """``device``'s class (ROCm's capabilities are not NVIDIA's: :data:`ROCM`)."""
    cc = capability(device)
    return ROCM if cc is not None and torch.version.hip else card_class(cc)
