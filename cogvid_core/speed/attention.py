"""Attention kernels for the speed options (``fast``): each a ``torch.library`` custom op, so a compiled
block treats it as one opaque call, chosen per call by a ``TorchFunctionMode`` that redirects
``F.scaled_dot_product_attention`` (diffusers' CogVideoX processor and ours in ``activations`` call it)
while the transformer runs. A kernel refuses calls it cannot take (a mask, dropout, another head size):
those run torch's SDPA unchanged."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cogvid_core.speed.cardclass import capability


@dataclass(frozen=True)
class AttentionKernel:
    """``run(q, k, v, scale) -> out`` for [B, H, S, D] tensors without mask, dropout or causality;
    ``accepts(q, k, v)`` says whether this call can take it (else torch's SDPA runs); ``check(device)``
    returns why the kernel cannot run on that device, or None."""
    name: str
    run: object
    accepts: object
    check: object
    exact_class: bool


ATTENTION: dict[str, AttentionKernel] = {}


def register_attention(kernel: AttentionKernel) -> None:
    """Make a kernel selectable by name (also how tests plug in a counting kernel)."""
    ATTENTION[kernel.name] = kernel


def cuda_reason(device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    return None


def _sdpa_backend_op(backend_name: str, first_of_all: bool):
    """One opaque op per backend: a compiled block calls it as is (inductor would otherwise pick the
    backend itself while tracing). ``first_of_all``: the backend goes first and torch's others follow
    for shapes it refuses; else it alone runs (an error where it cannot: the bench's yardstick)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    order = [backend, *[b for b in others if b != backend]] if first_of_all else [backend]

    def run(q, k, v, scale):
        with sdpa_kernel(order, set_priority=first_of_all):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return _opaque_op(f"sdpa_{backend_name.lower()}", run,
                      fake=lambda q, k, v, scale: q.new_empty((*q.shape[:-1], v.shape[-1])))


def _opaque_op(name: str, run, fake=lambda q, k, v, scale: torch.empty_like(q)):
    """``run(q, k, v, scale)`` as the custom op ``cogvid::<name>``, ``fake`` its output's shape for tracing:
    a compiled block calls it as one opaque call."""
    @torch.library.custom_op(f"cogvid::{name}", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return run(q, k, v, scale)

    op.register_fake(fake)
    return op


def _sage(q, k, v, scale):
    from sageattention import sageattn
    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)


def _sage_reason(device) -> str | None:
    if importlib.util.find_spec("sageattention") is None:
        return "the sageattention package is not installed (pip install sageattention==1.0.6)"
    return cuda_reason(device) or triton_reason()


def triton_reason() -> str | None:
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _cuda_half(q, k, v) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype


for _backend, _label, _first in (("CUDNN_ATTENTION", "cudnn", True), ("FLASH_ATTENTION", "flash", False),
                                 ("EFFICIENT_ATTENTION", "efficient", False)):
    register_attention(AttentionKernel(_label, _sdpa_backend_op(_backend, _first), lambda q, k, v: q.is_cuda,
                                       cuda_reason, exact_class=True))
# sageattention 1.0.6 has kernels for head_dim 64, 96 and 128 (CogVideoX: 64), equal q/k/v lengths not needed
register_attention(AttentionKernel("sage", _opaque_op("sageattn", _sage),
                                   lambda q, k, v: _cuda_half(q, k, v) and q.shape[-1] in (64, 96, 128),
                                   _sage_reason, exact_class=False))


E4M3_MAX = 448.0


def fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, H, D] -> (float8 e4m3 tensor, float32 descale [B, H]): one scale per batch row and head,
    the granularity FlashAttention-3's FP8 forward takes."""
    amax = x.abs().amax(dim=(1, 3)).float().clamp_min(1e-6)            # [B, H]
    # scaled in the input's dtype (no float32 copy of a 45k-token tensor); the descale is the exact
    # inverse of the multiplier used, and values are clamped (a cast past 448 gives NaN in e4m3fn)
    mult = (E4M3_MAX / amax).to(x.dtype)
    x8 = (x * mult[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, 1.0 / mult.float()


def _fa3_fp8(q, k, v, scale):
    from flash_attn_interface import flash_attn_func

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))     # FA3 takes [B, S, H, D]
    # each query row's scores shift by one constant when a per-head mean of K is taken out: the
    # softmax is unchanged and K's outliers no longer set its float8 scale
    k = k - k.mean(dim=1, keepdim=True)
    (q8, qs), (k8, ks), (v8, vs) = fp8_per_head(q), fp8_per_head(k), fp8_per_head(v)
    out = flash_attn_func(q8, k8, v8, softmax_scale=scale, q_descale=qs, k_descale=ks, v_descale=vs)
    return out.to(q.dtype).transpose(1, 2).contiguous()


def _fa3_reason(device) -> str | None:
    if importlib.util.find_spec("flash_attn_interface") is None:
        return "FlashAttention-3 is not installed (pip install tokenspeed-fa3)"
    try:   # a wheel built for another torch fails here (its compiled extension), not in the middle of a run
        import flash_attn_interface  # noqa: F401
    except (ImportError, OSError) as e:
        return (f"FlashAttention-3 does not load ({type(e).__name__}: {e}); install the tokenspeed-fa3 build "
                f"for torch {torch.__version__}")
    why = cuda_reason(device)
    if why is None and capability(device) != (9, 0):
        why = "its FP8 kernels are for Hopper GPUs (H100, H200: compute capability 9.0)"
    return why


# FlashAttention-3's FP8 forward (Hopper): q, k, v quantized per batch row and head (H200: README "Speed options")
register_attention(AttentionKernel("fa3fp8", _opaque_op("fa3_fp8", _fa3_fp8),
                                   lambda q, k, v: _cuda_half(q, k, v) and q.shape[-1] in (64, 128, 256)
                                   and q.shape[-1] == v.shape[-1],
                                   _fa3_reason, exact_class=False))


class RouteAttention(TorchFunctionMode):
    """While entered, ``F.scaled_dot_product_attention`` calls the kernel takes go to ``kernel``; the
    others (a mask, dropout, causal, a shape it lacks) run torch's SDPA unchanged."""

    def __init__(self, kernel: AttentionKernel):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _plain_call(args, kwargs):
            q, k, v = args[:3]
            if self.kernel.accepts(q, k, v):
                scale = kwargs.get("scale")
                return self.kernel.run(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))
        return func(*args, **kwargs)


def _plain_call(args, kwargs) -> bool:
    if len(args) != 3:   # mask, dropout or causality given positionally: leave it to torch
        return False
    return (kwargs.get("attn_mask") is None and not kwargs.get("dropout_p", 0.0) and not kwargs.get("is_causal", False)
            and not kwargs.get("enable_gqa", False))


_MODES: dict[str, RouteAttention] = {}   # one mode per kernel: a compiled block sees the same object each use


def mode_of(kernel: AttentionKernel) -> RouteAttention:
    mode = _MODES.get(kernel.name)
    if mode is None or mode.kernel is not kernel:
        mode = _MODES[kernel.name] = RouteAttention(kernel)
    return mode
