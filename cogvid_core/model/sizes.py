"""Parameter counts of each component, exact (the real configs built on the meta device), and the
bytes its weights take in a storage precision: the estimate's weights terms and the host plan's."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from cogvid_core.device.devmem import precision_bytes
from cogvid_core.model import precision as P
from cogvid_core.model.variants import VARIANTS, t5_config, transformer_config, vae_config


@dataclass(frozen=True)
class ComponentSize:
    params: int            # all parameters
    matrix_params: int     # weights fp8 storage stores in 1 byte (see _sizes)
    buffer_elems: int      # buffers cast with the model (1.0's learned positional embedding)
    block_params: int      # one repeated block (for streaming)
    blocks: int
    largest_layer: int     # largest single weight (fp8 per-layer upcast transient)
    fp32_in_fp16: int = 0  # parameters the model class keeps in fp32 in an fp16 load (T5's wo layers)
    fp32_in_bf16: int = 0  # ... in a bf16 load (``_keep_in_fp32_modules_strict``)

    def params_kept_fp32(self, precision: str) -> int:
        """Parameters stored in fp32 when the component loads in ``precision`` (precision.mark_keep_fp32)."""
        return {P.FP16: self.fp32_in_fp16, P.BF16: self.fp32_in_bf16}.get(_name(precision), 0)


def _name(precision) -> str:
    """A precision as the widgets name it (also from 'float16', 'torch.bfloat16' ...)."""
    text = str(precision).replace("torch.", "")
    return {"float16": P.FP16, "bfloat16": P.BF16, "float32": P.FP32}.get(text, text)


def _kept_fp32(module, component: str, dtype) -> int:
    patterns = P.keep_fp32_patterns(P.model_class(component), dtype)
    return sum(p.numel() for name, p in module.named_parameters() if patterns and P.kept_fp32(name, patterns))


def _sizes(module, blocks, component: str) -> ComponentSize:
    import torch

    params = sum(p.numel() for p in module.parameters())
    matrix = sum(p.numel() for name, p in module.named_parameters() if P.is_fp8_layer(name, p.shape))
    largest = max((p.numel() for p in module.parameters()), default=0)
    bufs = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    blocks = list(blocks) if blocks is not None else []
    bp = sum(p.numel() for p in blocks[0].parameters()) if blocks else params
    return ComponentSize(params, matrix, bufs, bp, len(blocks) or 1, largest,
                         _kept_fp32(module, component, torch.float16), _kept_fp32(module, component, torch.bfloat16))


@lru_cache(maxsize=None)
def component_sizes(variant_key: str, tiny: bool = False) -> dict[str, ComponentSize]:
    """Parameter counts of each component, from the real configs built on the meta device."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    v = VARIANTS[variant_key]
    with torch.device("meta"):
        tr = CogVideoXTransformer3DModel(**transformer_config(v, tiny))
        vae = AutoencoderKLCogVideoX(**vae_config(v, tiny))
        t5 = T5EncoderModel(T5Config(**t5_config(tiny)))
    return {"transformer": _sizes(tr, tr.transformer_blocks, "transformer"),
            "text_encoder": _sizes(t5, t5.encoder.block, "text_encoder"),
            "vae": _sizes(vae, None, "vae")}


def weight_bytes(size: ComponentSize, precision: str, compute_bytes: int = 2) -> int:
    """Bytes of a component's weights stored in `precision` (fp8: the fp8 layers 1 byte, the rest,
    the modulation included, in the compute dtype; the modules the class keeps in fp32, 4 bytes)."""
    b = precision_bytes(precision)
    if b == 1:
        return size.matrix_params + (size.params - size.matrix_params + size.buffer_elems) * compute_bytes
    return (size.params + size.buffer_elems) * b + size.params_kept_fp32(precision) * (4 - b)


def compute_bytes(precision: str) -> int:
    return 4 if precision_bytes(precision) == 4 else 2
