"""How a LoRA runs: the targeted ``nn.Linear`` modules change class for one run.

Each targeted Linear becomes a subclass of its own class (``LoraLinear``, ``LoraFp8Linear``...) whose
forward adds ``F.linear(F.linear(x, down), up, bias)`` to the base output: all LoRAs of one Linear as one
pair of matrices, ``[A1; A2]`` and ``[s1 B1, s2 B2]`` (s = strength * scale), so k LoRAs cost two GEMMs
per call. The pairs are built on the compute device, in the compute dtype (the scale applied in fp32),
by a pre-hook on the transformer, outside the blocks: no host copy, no state changed inside a block.

Why a class and not a forward hook (what this was before): a hook inside a ``torch.compile``d block
traced wrong from its second call (torch 2.13: up to 0.09 off on outputs of order 1), so compile turned
itself off with a LoRA. A class swap is plain module code to the compiler, and the pairs are tensors it
takes as inputs: a new strength is new values of the same shapes, no recompile. The math is the hook's,
operation for operation, so the frames are unchanged. fp8 (speed) quantizes the weight for each call:
it folds the LoRA into the weight first (:func:`folded`; the delta's own matmuls over 2 x 45k tokens cost
~4 % of a step beside float8 matmuls); fp8 storage's Fp8Linear is rebased on nn.Linear for a call with
:func:`rebased`.

Speed options other than ``exact`` fold too, per call (``LoraFold*`` classes, :class:`LoraFoldMixin`): the
delta's two skinny matmuls over every token cost 3.4 % of a ``compile`` step and 5.3 % of an ``fa3fp8``
one on an H100 (bench/lora_live_options_h100.log), one ``W + up @ down`` per call costs a weight-sized add.
Folding rounds the sum once in the compute dtype instead of adding two rounded outputs: the same math in
another order, as those options already are. ``exact`` keeps the delta, diffusers' LoRA path, for its
exactness.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class LoraMixin:
    """The LoRA delta on top of the base class's forward (``_lora``: down, up, bias, made from
    ``_lora_parts``; built for the run before the blocks, here only for a call on another device or
    dtype, e.g. the module called on its own)."""

    def forward(self, x):
        out = super().forward(x)
        down, up, bias = self._lora_for(x)
        # added in place: the same sum, bit for bit, without a third output-sized tensor (the feed-forward's
        # first Linear's output is 4 of the step's units: out + delta + sum held 12 where its phase counts 9)
        return out.add_(F.linear(F.linear(x, down), up, bias).to(out.dtype))

    def _lora_for(self, x) -> tuple:
        """(down, up, bias) on ``x``'s device and dtype (built for the run; made here for another one)."""
        lora = self.__dict__.get("_lora")
        if lora is None or lora[0].device != x.device or lora[0].dtype != x.dtype:
            lora = self._lora = _pair(self._lora_parts, x.device, x.dtype)
        return lora


class LoraFoldMixin(LoraMixin):
    """The LoRA folded into the weight for each call (speed options other than exact): one small matmul
    with the weight added in its epilogue, then the base matmul, none over the tokens for the LoRA. A base
    class that does not compute with its weight as stored (fp8 storage's Fp8Linear) keeps the delta."""

    def forward(self, x):
        if _base(type(self)) is not nn.Linear or self.weight.dtype != x.dtype:
            return super().forward(x)
        weight, bias = _with_lora(self.weight, self.bias, self._lora_for(x), x.dtype)
        return F.linear(x, weight, bias)


_CLASSES: dict[tuple, type] = {}


def lora_class(cls: type, fold: bool = False) -> type:
    """``cls`` with the LoRA delta, or folded into the weight per call (``fold``); one class per base
    class and kind, made once."""
    if issubclass(cls, LoraMixin):
        return cls
    if (cls, fold) not in _CLASSES:
        mixin, name = (LoraFoldMixin, "LoraFold") if fold else (LoraMixin, "Lora")
        _CLASSES[cls, fold] = type(f"{name}{cls.__name__}", (mixin, cls), {})
    return _CLASSES[cls, fold]


def rebased(cls: type, base: type) -> type:
    """``base``, with the LoRA (of the same kind) when ``cls`` has it (a module changing its base class for a call)."""
    return lora_class(base, issubclass(cls, LoraFoldMixin)) if issubclass(cls, LoraMixin) else base


def _base(cls: type) -> type:
    """The class under the LoRA mixins."""
    return next(c for c in cls.__mro__[1:] if not issubclass(c, LoraMixin))


def _with_lora(weight, bias, lora, dtype) -> tuple:
    """``W + up @ down`` in ``dtype`` as one matmul with the weight added in its epilogue (fp32 accumulation,
    one rounding: no fp32 copy of the weight, a feed-forward Linear's would be 151 MB beside the block on
    a small card), and the bias with the LoRA's bias added in fp32."""
    down, up, lora_bias = lora
    w = torch.addmm(weight.to(dtype), up.to(dtype), down.to(dtype))
    if lora_bias is None:
        return w, bias
    total = lora_bias.float() if bias is None else bias.float() + lora_bias.float()
    return w, total.to(bias.dtype if bias is not None else dtype)


def folded(module: nn.Module, dtype: torch.dtype) -> None:
    """For one call of a LoRA Linear (fp8 quantizes its weight per call, speed/fp8.py): its weight with the
    LoRA folded in (``W + up @ down`` in ``dtype``), its bias likewise, and its class without the LoRA
    delta, so the LoRA costs no matmul over the tokens. The caller keeps the weight, bias and class it had
    and puts them back after the call."""
    w, bias = module.weight, module.bias
    lora = module.__dict__.get("_lora")
    if lora is None or lora[0].device != w.device:
        lora = _pair(module._lora_parts, w.device, dtype)
    module.__class__ = _base(type(module))
    w, new_bias = _with_lora(w, bias, lora, dtype)
    module.weight = nn.Parameter(w, requires_grad=False)
    if new_bias is not bias:
        module.bias = nn.Parameter(new_bias, requires_grad=False)


def _pair(parts, device, dtype) -> tuple:
    down = torch.cat([p.down.to(device, dtype) for p, _ in parts])
    up = torch.cat([(p.up.to(device, torch.float32) * (s * p.scale)).to(dtype) for p, s in parts], dim=1)
    biases = [p.bias.to(device, torch.float32) * (s * p.scale) for p, s in parts if p.bias is not None]
    return down, up, torch.stack(biases).sum(0).to(dtype) if biases else None


@contextmanager
def swapped(transformer: nn.Module, modules: dict[str, nn.Module], per_layer: dict[str, list], fold: bool = False):
    """``modules[name]`` runs with the LoRA ``per_layer[name]`` ((LoraLayer, strength) pairs) inside the
    ``with`` body (``fold``: folded into the weight per call, :class:`LoraFoldMixin`); classes and
    attributes are put back on exit, whatever ends the body."""
    built: dict[tuple, dict] = {}
    targets = [(modules[name], parts) for name, parts in per_layer.items()]

    def build(_module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        key = (x.device, x.dtype)
        if key not in built:
            built[key] = {id(m): _pair(parts, *key) for m, parts in targets}
        for m, _ in targets:
            m._lora = built[key][id(m)]

    handle = transformer.register_forward_pre_hook(build, with_kwargs=True)
    try:
        with _given([(m, parts) for m, parts in targets], fold):
            yield transformer
    finally:
        handle.remove()


@contextmanager
def _given(pairs, fold: bool):
    """Each module of ``pairs`` ((module, LoRA parts)) a LoRA class for the ``with`` body; its class back,
    and its LoRA attributes gone, on exit."""
    classes = [(m, type(m)) for m, _ in pairs]
    try:
        for m, parts in pairs:
            m.__class__ = lora_class(type(m), fold)
            m._lora_parts = parts
        yield
    finally:
        for m, cls in classes:
            m.__class__ = cls
            m.__dict__.pop("_lora", None)
            m.__dict__.pop("_lora_parts", None)


@contextmanager
def mirrored(primary: nn.Module, replica: nn.Module):
    """``replica`` (a copy of ``primary`` on another device) runs the LoRAs ``primary`` runs now, inside
    the ``with`` body: same layers, same parts; the matrices are made on the replica's device at its
    first call."""
    layers = dict(replica.named_modules())
    ours = [(name, m) for name, m in primary.named_modules() if isinstance(m, LoraMixin)]
    fold = any(isinstance(m, LoraFoldMixin) for _, m in ours)
    with _given([(layers[name], m._lora_parts) for name, m in ours], fold):
        yield replica
