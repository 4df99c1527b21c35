"""The ``fp8`` speed part: each block's token-sized Linear layers run as torchao float8 matmuls.

How it stays out of every placement's way (resident, offload, file-backed streaming): see
:class:`_Fp8Block`. :mod:`fast` decides whether the part runs (capability, torchao) and calls :func:`_fp8`
at the transformer's first forward.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack

import torch
from torch import nn

from cogvid_core.memory.filestream import skipped as cache_skips
from cogvid_core.model import precision as P
from cogvid_core.model.lora_linear import LoraMixin, folded, rebased
from cogvid_core.speed.hooks import while_running
from cogvid_core.speed.regional import _blocks

log = logging.getLogger("cogvid_core.speed.fast")


def _computable(w: torch.Tensor) -> bool:
    """float8 matmuls run on CUDA tensors only (a test may say otherwise)."""
    return w.is_cuda


class _Fp8Block:
    """Swaps the block's token-sized Linear weights for torchao float8 copies for one call and puts
    the originals back after it: nothing is kept between calls, so every placement's own weight
    traffic (offload, file-backed streaming) is untouched, and memory grows by one block's float8
    copy. Re-quantizing a block costs reading its weights once, small beside a call's matmuls.
    Weights stored in fp8 (``precision=fp8_e4m3fn``, loading.Fp8Linear) are upcast and re-scaled per
    row: streamed bytes stay halved and the matmul runs in float8 too."""

    def __init__(self, block: nn.Module, config, skipped: list):
        # fp8 storage's rule (precision.fp8_module): attention and feed-forward, the token-sized matmuls;
        # never the AdaLN modulation (norm1/norm2.linear: one row per video, precision-sensitive)
        self.linears = [m for name, m in block.named_modules() if isinstance(m, nn.Linear) and P.fp8_module(name)]
        self.config, self.skipped, self.live = config, skipped, []

    def enter(self) -> None:
        from torchao.quantization import quantize_

        for lin in self.linears:
            w, cls, bias = lin.weight, type(lin), lin.bias
            if not _computable(w):
                self.skipped.append(lin)   # e.g. diffusers group offloading brings weights in later
                continue
            if w.element_size() == 1:   # fp8 storage (loading.Fp8Linear)
                # its forward would upcast torchao's tensor back to bf16 (a LoRA's delta is kept)
                lin.__class__ = rebased(cls, nn.Linear)
                lin.weight = nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
            if isinstance(lin, LoraMixin):     # the LoRA folded into the weight quantized for this call
                folded(lin, lin.weight.dtype)
            quantize_(lin, self.config)
            self.live.append((lin, w, lin.weight, cls, bias))

    def leave(self) -> None:
        for lin, w, q, cls, bias in self.live:
            lin.__dict__.pop("extra_repr", None)   # torchao's repr decoration, instance-level
            lin.__class__ = cls
            if lin.weight is q:   # else the placement has already swapped it (a streamed block dropped)
                lin.weight = w
                lin.bias = bias
        self.live = []


def _fp8(transformer: nn.Module, stack: ExitStack) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    # set_inductor_config=False: torchao would otherwise change process-wide settings (float32 matmul
    # precision among them) that other models in the same process would then run with
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    skipped: list = []
    for i, block in enumerate(_blocks(transformer)):
        swap = _Fp8Block(block, config, skipped)
        # a block a step cache skips runs none of its matmuls: quantizing it would only cost time (it was
        # 0.34 s of each step TeaCache skipped on an H200: 42 blocks' weights quantized for nothing)
        enter = (lambda swap=swap, i=i: None if cache_skips(transformer, i) else swap.enter())
        while_running(block, stack, enter, swap.leave)

    def report():
        if skipped:
            log.warning("speed 'fp8': %d Linear calls ran in bf16, their weights were not on the GPU when the block "
                        "started (diffusers group offloading of a model loaded into memory); load it file-backed or "
                        "use resident/offload placement", len(skipped))
    stack.callback(report)
