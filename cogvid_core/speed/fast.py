"""Speed options for the CogVideoX transformer, active only while a Component value is in use.

A speed is a name (the public contract, shown in the loader's combo and the CLI's ``--speed``):

* ``exact``    today's math, bit for bit (the default).
* ``cudnn``    attention through cuDNN's fused kernel first (torch SDPA backend choice). Exact-class:
               the same math in another summation order.
* ``compile``  regional ``torch.compile`` of each transformer block's ``forward``. Exact-class.
* ``sage``     attention with 8-bit Q·K (SageAttention, Triton). Quantized: small, measured error.
* ``fp8``      the blocks' attention and feed-forward Linear layers in float8 e4m3 (torchao dynamic
               quantization, per-row scales of activations and weights). Quantized; needs compute
               capability >= 8.9 (Ada, Hopper).
* ``fa3fp8``   attention in FP8 through FlashAttention-3 (Hopper only; PyPI ``tokenspeed-fa3``): q, k, v in
               float8 with one scale per batch row and head. Quantized.

Parts combine with ``+`` (``fp8+compile``, ``sage+compile``...). A part that cannot run here (no CUDA,
an older card, a package missing) is dropped with a message saying what to do; the rest runs.

``fastest`` is no recipe of its own: :func:`resolve` turns it into the best recipe this device runs
(per card class, ``speed.cardclass``), with a note saying which and why; it runs wherever ``exact`` does.

How each part is applied, without copying diffusers' code and without changing the shared module for
other values: attention calls are redirected by a ``TorchFunctionMode`` entered while the transformer
runs (diffusers' CogVideoX processor, and ours in ``activations``, call
``F.scaled_dot_product_attention``); the kernels are ``torch.library`` custom ops, so a compiled
block treats them as one opaque call. fp8 swaps each block Linear's weight for a torchao float8 copy
in a block pre-hook, after the placement's own hooks have brought the block in, so resident, offload
and file-backed streaming all work (streamed blocks are quantized again at each call, as they are
read again). Compile sets a compiled ``forward`` on each block instance; module hooks (file-backed
streaming, LoRA) stay outside it. Everything is undone when the use ends.

Split runs: a CFG pair's second copy gets the same parts on its own device, with the first's (``applied``);
under sequence parallel each rank applies the speed to its own copy, and seqpar's exchange wraps the
kernel's attention call (seqpar enters its mode per block, above the redirect).
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from cogvid_core.speed import cardclass, compile_cache, fp8
from cogvid_core.speed.hooks import while_running
from cogvid_core.speed.attention import ATTENTION, AttentionKernel, RouteAttention, cuda_reason, mode_of, register_attention, triton_reason  # noqa: F401
from cogvid_core.speed.multigpu import second_of

log = logging.getLogger(__name__)

EXACT = "exact"
FASTEST = "fastest"      # the best recipe of this card's class that runs here (resolve / pick)
# what the loader offers, cheapest in quality first (any "+" combination of known parts parses)
# (new names go at the end: saved workflows hold the combo's value)
CHOICES = (EXACT, "cudnn", "compile", "cudnn+compile", "fp8", "fp8+compile", "sage", "sage+compile",
           "fp8+sage+compile", "fa3fp8", "fa3fp8+compile", "fp8+fa3fp8+compile", FASTEST)
FP8_MIN_CC = (8, 9)
TRITON_MIN_CC = (7, 0)
FP8_ADA_TORCH = "2.7"


class SpeedError(ValueError):
    pass


@dataclass(frozen=True)
class Speed:
    attention: str = "sdpa"     # "sdpa" (torch's own choice) or a name in ATTENTION
    fp8: bool = False
    compile: bool = False
    notes: tuple = field(default=(), compare=False)   # why parts were dropped (resolve)

    @property
    def exact(self) -> bool:
        return self.attention == "sdpa" and not self.fp8 and not self.compile

    @property
    def quantized(self) -> bool:
        """False: exact-class (the same math in another order); True: lower-precision arithmetic."""
        return self.fp8 or (self.attention != "sdpa" and not ATTENTION[self.attention].exact_class)

    @property
    def name(self) -> str:
        parts = (["fp8"] if self.fp8 else []) + ([self.attention] if self.attention != "sdpa" else []) \
            + (["compile"] if self.compile else [])
        return "+".join(parts) or EXACT


# ============================================================================ parsing and checks
def is_fastest(name) -> bool:
    return isinstance(name, str) and name.strip().lower() == FASTEST


def check_name(name: str) -> None:
    """A bad name fails (SpeedError); ``fastest`` and every recipe :func:`parse` takes pass."""
    if not is_fastest(name):
        parse(name)


def parse(name: str) -> Speed:
    """``"fp8+compile"`` -> Speed; SpeedError names the valid parts. ``fastest`` depends on the device:
    :func:`resolve` (or :func:`recipe`) takes it."""
    if not isinstance(name, str) or not name.strip():
        raise SpeedError(f"speed must be a name such as {', '.join(CHOICES)}; got {name!r}")
    if is_fastest(name):
        raise SpeedError("speed 'fastest' is picked per device: resolve it for one (fast.resolve, fast.recipe)")
    parts = [p.strip().lower() for p in name.split("+")]
    if parts == [EXACT]:
        return Speed()
    known = ("fp8", "compile", *ATTENTION)
    bad = [p for p in parts if p not in known]
    if bad or len(set(parts)) != len(parts):
        raise SpeedError(f"unknown or repeated speed part(s) {bad or parts} in {name!r}: combine 'exact' alone, or "
                         f"{', '.join(known)} with '+' (e.g. fp8+compile)")
    attention = [p for p in parts if p in ATTENTION]
    if len(attention) > 1:
        raise SpeedError(f"{name!r} names two attention kernels ({' and '.join(attention)}): pick one")
    return Speed(attention=attention[0] if attention else "sdpa", fp8="fp8" in parts, compile="compile" in parts)


def _fp8_reason(device) -> str | None:
    reason = cuda_reason(device)
    if reason:
        return reason
    cc = cardclass.capability(device)
    if cc < FP8_MIN_CC:
        return (f"float8 matmuls need compute capability >= {FP8_MIN_CC[0]}.{FP8_MIN_CC[1]} (Ada, Hopper); "
                f"this GPU has {cc[0]}.{cc[1]}")
    if cc < (9, 0) and torch.__version__ < FP8_ADA_TORCH:
        # torch's per-row float8 matmul was Hopper's only before pytorch/pytorch#144348 (sm_89, torch 2.7):
        # the first call would fail, not drop
        return f"per-row float8 matmuls on Ada need torch >= {FP8_ADA_TORCH}; this is torch {torch.__version__}"
    if importlib.util.find_spec("torchao") is None:
        return "the torchao package is not installed (pip install torchao, a version made for your torch)"
    return None


def _compile_reason(device) -> str | None:
    if torch.device(device).type == "cuda":
        cc = cardclass.capability(device)
        if cc is not None and cc < TRITON_MIN_CC and not torch.version.hip:
            # torch's inductor refuses such a card at the first compiled call, mid-run
            return (f"torch.compile's Triton kernels need compute capability >= {TRITON_MIN_CC[0]}.{TRITON_MIN_CC[1]}; "
                    f"this GPU has {cc[0]}.{cc[1]}")
        return triton_reason()
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++), none found"
    return None


def _reasons(speed: Speed, device) -> list[tuple[str, str, str]]:
    """(part, why it cannot run on ``device``, what runs instead) for each part of ``speed`` that cannot."""
    out = []
    if speed.attention != "sdpa":
        why = ATTENTION[speed.attention].check(device)
        if why:
            out.append((speed.attention, why, "attention runs torch's exact SDPA"))
    if speed.fp8:
        why = _fp8_reason(device)
        if why:
            out.append(("fp8", why, "the matmuls run in the exact bf16 path"))
    if speed.compile:
        why = _compile_reason(device)
        if why:
            out.append(("compile", why, "the blocks run eagerly"))
    return out


def resolve(speed: Speed | str, device) -> Speed:
    """The parts of ``speed`` that can run on ``device``; each dropped part leaves a note (what was
    asked, why not, what runs instead). ``fastest``: :func:`pick`."""
    if is_fastest(speed):
        return pick(device)
    speed = parse(speed) if isinstance(speed, str) else speed
    notes = list(speed.notes)
    for part, why, instead in _reasons(speed, device):
        notes.append(f"speed '{part}' is off: {why}; {instead}")
        speed = replace(speed, attention="sdpa") if part in ATTENTION else replace(speed, **{part: False})
    return replace(speed, notes=tuple(notes))


def pick(device) -> Speed:
    """``fastest`` on ``device``: the first recipe of its card class (cardclass.CLASSES) whose parts
    all run here, with one note saying which, what was passed over and why. ``exact`` ends every list."""
    klass = cardclass.class_of(device)
    skipped: dict[str, list[str]] = {}          # why -> recipes passed over for it, in order
    for name in klass.recipes:
        speed = parse(name)
        reasons = _reasons(speed, device)
        if not reasons:
            break
        part, why, _instead = reasons[0]
        skipped.setdefault(f"{part}: {why}", []).append(name)
    said = [f"not {', '.join(names)} ({why})" for why, names in skipped.items()]
    said += [klass.lacks] if klass.lacks else []
    note = f"speed 'fastest' on {cardclass.describe(device)}: {speed.name}" + "".join(f"; {s}" for s in said)
    return replace(speed, notes=(note,))


def recipe(name: str, device, second=None) -> str:
    """The recipe name ``name`` stands for on ``device``: ``fastest`` -> its pick there (with a CFG pair's
    ``second`` device: what both run, as :func:`resolve_alone` gives it); any other name as given (the
    estimate counts a part the device drops as asked). What the estimate counts."""
    if not is_fastest(name):
        return name
    return resolve_alone(name, device, second).name


def resolve_alone(speed: Speed | str, device, second=None) -> Speed:
    """:func:`resolve` before any load, for the run as it is split: with a CFG pair (``second``: its
    second device) the parts both devices run, so both branches use the same kernels (a part the second
    GPU cannot run is off on both, with a note). Sequence parallel (torchrun) needs nothing more: each
    rank runs the speed on its own device, the kernel under seqpar's exchange (seqpar._inside).
    ``fastest`` picks on ``device`` (a pair: then keeps what the second device runs of it)."""
    resolved = resolve(speed, device)
    if second is None or torch.device(second) == torch.device(device):
        return resolved
    other = resolve(replace(resolved, notes=()), second)
    notes = tuple(f"{note} (on the CFG pair's second device {second}: both branches run the same parts)"
                  for note in other.notes)
    return replace(other, notes=resolved.notes + notes)


# ============================================================================ applying
from cogvid_core.speed.regional import COMPILE_OPTIONS, RECOMPILE_LIMIT, _COMPILED, _CompiledCall, _compile, _enter, cacheable_functions  # noqa: F401,E501


_CACHE_LOCK = threading.Lock()


@contextmanager
def _compile_config():
    """While our compiled blocks run (and compile): dynamo's recompile limit raised, and the Python functions
    our graphs call marked cacheable for AOTAutograd (regional.CACHEABLE_FUNCTIONS)."""
    import torch._inductor.config as inductor_config
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), \
            inductor_config.patch(unsafe_marked_cacheable_functions=cacheable_functions()):
        yield


def _route(transformer: nn.Module, kernel: AttentionKernel, stack: ExitStack) -> None:
    mode = mode_of(kernel)
    while_running(transformer, stack, mode.__enter__, lambda: mode.__exit__(None, None, None))


@contextmanager
def applied(transformer: nn.Module, speed: Speed | str, device):
    """Inside: ``transformer`` runs with the parts of ``speed`` that work on ``device`` (each dropped
    part logged once, with what to do). Parts that need weights on the GPU (fp8) or a placed module
    (compile) are set up at the transformer's first forward, after the placement's own hooks ran.
    Yields the resolved Speed; everything is undone on exit.

    A transformer with a CFG pair's second copy (multigpu.attach_second) gets the same parts on that copy,
    on its device: the unconditional branch runs there (multigpu.ParallelCfg), and both branches must use
    the same kernels. The copy's hooks come and go with the first's."""
    second = second_of(transformer)
    speed = resolve_alone(speed, device, second.device if second is not None else None)
    for note in speed.notes:
        log.warning(note)
    with ExitStack() as stack:
        if not speed.exact:
            _setup_at_first_call(transformer, speed, stack, device)
            if second is not None:
                _setup_at_first_call(second.module, speed, stack, second.device)
        yield speed


def _setup_at_first_call(transformer: nn.Module, speed: Speed, stack: ExitStack, device) -> None:
    done = []

    def setup(_module, _args):
        if done:
            return
        done.append(True)
        if speed.compile:
            with _CACHE_LOCK:   # a CFG pair's two copies start in two threads at once
                compile_cache.prepare(device)
            stack.callback(compile_cache.save, device)
            _compile(transformer, stack)
        if speed.fp8:
            fp8._fp8(transformer, stack)

    if speed.compile or speed.fp8:
        stack.callback(transformer.register_forward_pre_hook(setup).remove)
    if speed.compile:
        # dynamo's config patches are per thread: a CFG pair's copy (run in a worker thread) enters its own
        patches = []
        while_running(transformer, stack, lambda: patches.append(_enter(_compile_config())),
                      lambda: patches.pop().__exit__(None, None, None))
    if speed.attention != "sdpa":
        _route(transformer, ATTENTION[speed.attention], stack)
