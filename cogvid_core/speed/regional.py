"""Regional torch.compile of the CogVideoX transformer (the ``compile`` part of a speed option).

Each block's ``forward`` is compiled once per block object and kept for later uses; the blocks share one
code object, so with torch's default inlining of nn modules one graph serves all of them. Module hooks
on the blocks (streaming, fp8) run outside the graphs. When a step cache's hooks replace the attention
modules' forward (PAB, FasterCache), the parts around them are compiled instead (:func:`_compile_parts`).
LoRAs are classes, not hooks (model/lora_linear.py), so they compile with the blocks.
"""
from __future__ import annotations

import functools
import logging
from contextlib import ExitStack

import torch
from torch import nn

log = logging.getLogger("cogvid_core.speed.fast")

_COMPILED = "_cogvid_compiled_forward"   # block attribute: its compiled forward, kept for later uses
# static shapes: a run's shapes never change (batched CFG: batch 2; sequential: batch 1 for both branches),
# so each block gets two graphs (the first block's input is a strided slice) and nothing recompiles per step
COMPILE_OPTIONS = {"dynamic": False}
# graphs one block code object may collect while the transformer runs. Torch's default (8) is reached in
# one ComfyUI session by switching options (CFG mode x cache x LoRA rank x attention kernel x fp8: each a
# graph, cached for the next time) and dynamo then runs those blocks eagerly for the rest of the process,
# silently (tests/test_fast.py drives 36 switches). Raised for our forward only (config.patch).
RECOMPILE_LIMIT = 64
# Python functions AOTAutograd's cache may keep in our graphs. With an attention kernel routed by a
# TorchFunctionMode (speed/attention.py), dynamo records diffusers' ``hidden_states.split([...])`` as a call to
# the Python method ``torch._tensor.Tensor.split``, which the cache does not know: every restart then re-ran
# AOTAutograd for both block graphs (2.9 s of the H100's first step; bench/caches15_ours_fast_teacache02_profile_h100.json
# gives the bypass reason, tests/test_compile_cache.py reproduces it on the CPU). Tensor.split is a pure
# function of its inputs; the version is part of the cache key (inductor's documented way to mark one).
CACHEABLE_FUNCTIONS = ("torch._tensor.split",)


def cacheable_functions() -> dict:
    """inductor's ``unsafe_marked_cacheable_functions`` with ours added."""
    import torch._inductor.config as inductor_config
    return {**inductor_config.unsafe_marked_cacheable_functions, **{f: torch.__version__ for f in CACHEABLE_FUNCTIONS}}


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    from cogvid_core.memory.activations import _blocks as blocks_of
    return blocks_of(transformer)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _cache_hooked(m: nn.Module) -> bool:
    """An attention module whose forward a diffusers cache hook replaced (PAB, FasterCache), nothing else."""
    return ("forward" in m.__dict__ and getattr(m, "_diffusers_hook", None) is not None
            and hasattr(m, "processor") and not (m._forward_hooks or m._forward_pre_hooks))


def _compile(transformer: nn.Module, stack: ExitStack) -> None:
    """Each block's ``forward`` compiled (once per block object, kept for later uses). The blocks
    share one code object, so with torch's default inlining of nn modules one graph serves all of
    them; module hooks on the blocks (streaming, fp8) run outside it. With a step cache's hooks on the
    attention modules (PAB, FasterCache), the parts around them: see :func:`_compile_parts`."""
    blocks = _blocks(transformer)
    inside = [m for b in blocks for m in b.modules() if m is not b and _hooked(m)]
    if inside and all(_cache_hooked(m) for m in inside):
        _compile_parts(blocks, stack)
        return
    if inside:
        # forward hooks inside a compiled block traced wrong from its second call (torch 2.13: LoRA's old
        # hooks, up to 0.09 off on outputs of order 1); LoRAs are classes now (model/lora_linear.py)
        log.warning("speed 'compile' is off: %d hooks inside the transformer blocks do not compile correctly; "
                    "the blocks run eagerly (the other speed parts stay on)", len(inside))
        return
    wrapped = 0
    for block in blocks:
        if "forward" in block.__dict__:   # someone else's forward wrapper (diffusers hooks): leave it alone
            wrapped += 1
            continue
        _compile_forward(block, stack)
    if wrapped:
        log.warning("speed 'compile': %d blocks run eagerly, their forward is wrapped by diffusers hooks (group "
                    "offloading of a model loaded into memory); resident, offload and file-backed streaming compile",
                    wrapped)


def _compile_forward(module: nn.Module, stack: ExitStack) -> None:
    fn = module.__dict__.get(_COMPILED)
    if fn is None:
        fn = torch.compile(module.forward, **COMPILE_OPTIONS)
        object.__setattr__(module, _COMPILED, fn)
    object.__setattr__(module, "forward", fn)
    stack.callback(_uncompile, module, fn)


def _compile_parts(blocks, stack: ExitStack) -> None:
    """A step cache's hook replaced the attention modules' forward (its Python state, e.g. the step
    counter it skips by, would be traced and guarded on in a compiled block): compile what it calls
    instead. Each block's other children (norms, feed-forward) are compiled whole, and each hooked
    attention's processor (projections, QK norms, rotary embedding, the attention kernel), which the
    hook runs when it computes; only the hook's decision and the residual adds run eagerly."""
    for block in blocks:
        for child in block.children():
            if _cache_hooked(child):
                _compile_processor(child, stack)
            elif not any(_hooked(m) for m in child.modules()):
                _compile_forward(child, stack)


class _CompiledCall:
    """Mixed into a processor's class: its call runs the compiled bound ``__call__`` kept on the
    processor."""


_PROCESSOR_CLASSES: dict[type, type] = {}


def _compiled_class(cls: type) -> type:
    """``cls`` calling the compiled ``__call__`` (one class per processor class, made once). Its
    ``__call__`` is a function of its own wrapping ``cls.__call__``: the signature stays the original's
    (diffusers' Attention filters the kwargs it passes by the processor's ``__call__`` signature)."""
    if cls not in _PROCESSOR_CLASSES:
        @functools.wraps(cls.__call__)
        def call(self, *args, **kwargs):
            return self.__dict__[_COMPILED](*args, **kwargs)
        _PROCESSOR_CLASSES[cls] = type(cls.__name__, (_CompiledCall, cls), {"__call__": call})
    return _PROCESSOR_CLASSES[cls]


def _compile_processor(attn: nn.Module, stack: ExitStack) -> None:
    proc = attn.processor
    if isinstance(proc, _CompiledCall):        # one processor object may serve every block
        return
    cls = type(proc)
    fn = proc.__dict__.get(_COMPILED)
    if fn is None:
        fn = torch.compile(cls.__call__.__get__(proc), **COMPILE_OPTIONS)
        proc.__dict__[_COMPILED] = fn
    proc.__class__ = _compiled_class(cls)
    stack.callback(setattr, proc, "__class__", cls)


def _enter(context):
    context.__enter__()
    return context


def _uncompile(block: nn.Module, fn) -> None:
    if block.__dict__.get("forward") is fn:
        del block.__dict__["forward"]


