"""Activation savers for diffusers' CogVideoXTransformer3DModel. Each does the same math as diffusers.

* Feed-forward in sequence chunks: each block's ``ff`` (a diffusers ``FeedForward``, 12288 wide) is
  replaced by :class:`ChunkedFeedForward`, which runs the same layers over slices of the token
  dimension and writes into one preallocated output. The 12288-wide intermediate then exists only
  for ``chunk_tokens`` tokens at a time. State-dict keys are unchanged (the wrapper holds the same
  ``net``), so loading, LoRA and offload hooks see the same parameters.
* Low-memory RoPE attention: :class:`LowMemCogVideoXAttnProcessor` is diffusers'
  ``CogVideoXAttnProcessor2_0`` (joint text+video attention, qk layer norm, SDPA) except that the
  rotary embedding is applied a few heads at a time, in fp32, written back in place, so no full fp32
  copies of Q and K exist at once. Per element it is the very same ``apply_rotary_emb`` call.

Both are installed through diffusers' extension points (module attribute replacement,
``set_attn_processor``) and removed the same way; :func:`apply_profile` sets both as a profile says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from cogvid_core.memory.profiles import Profile, get_profile


def _blocks(transformer: nn.Module):
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no transformer_blocks: not a CogVideoX transformer")
    return blocks


# ---------------------------------------------------------------------------------------------
# Feed-forward chunking
# ---------------------------------------------------------------------------------------------
class ChunkedFeedForward(nn.Module):
    """Runs a diffusers ``FeedForward``'s layers over ``chunk_tokens`` tokens at a time (dim 1)."""

    def __init__(self, ff: nn.Module, chunk_tokens: int):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.net = ff.net                     # same parameters, same state-dict keys (ff.net.*)
        self.chunk_tokens = int(chunk_tokens)
        object.__setattr__(self, "_original", ff)  # not registered: no duplicate parameters

    @property
    def original(self) -> nn.Module:
        return self._original

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n = hidden_states.shape[1]
        step = self.chunk_tokens
        if n <= step:
            return self._run(hidden_states)
        # One batch element at a time: hidden_states[b:b+1, s:e] of a contiguous input is contiguous,
        # so each chunk is the same GEMM as in a batch-1 run (a strided [:, s:e] slice of a batch of 2
        # takes other kernels and rounds differently in bf16).
        out = None
        for b in range(hidden_states.shape[0]):
            for start in range(0, n, step):
                y = self._run(hidden_states[b:b + 1, start:start + step])
                if out is None:
                    out = y.new_empty((hidden_states.shape[0], n, *y.shape[2:]))
                out[b:b + 1, start:start + step] = y
                del y
        return out


def set_ff_chunking(transformer: nn.Module, chunk_tokens: int | None) -> int:
    """Chunk every block's feed-forward over ``chunk_tokens`` tokens; ``None`` restores the original
    modules. Returns the number of blocks changed."""
    changed = 0
    for block in _blocks(transformer):
        ff = block.ff
        base = ff.original if isinstance(ff, ChunkedFeedForward) else ff
        if chunk_tokens is None:
            if ff is not base:
                block.ff = base
                changed += 1
        else:
            if isinstance(ff, ChunkedFeedForward):
                ff.chunk_tokens = int(chunk_tokens)
            else:
                block.ff = ChunkedFeedForward(base, chunk_tokens)
            changed += 1
    return changed


def ff_chunk_tokens(transformer: nn.Module) -> int | None:
    """Current chunk size (None: not chunked)."""
    ff = _blocks(transformer)[0].ff
    return ff.chunk_tokens if isinstance(ff, ChunkedFeedForward) else None


# ---------------------------------------------------------------------------------------------
# Low-memory rotary embedding inside attention
# ---------------------------------------------------------------------------------------------
def apply_rotary_emb_inplace_(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], start: int,
                              head_chunk: int) -> torch.Tensor:
    """``x[:, :, start:] = apply_rotary_emb(x[:, :, start:], freqs)`` (x is [B, H, S, D]), done
    ``head_chunk`` heads at a time so the fp32 temporaries cover only those heads."""
    heads = x.shape[1]
    for h in range(0, heads, head_chunk):
        part = x[:, h:h + head_chunk, start:]
        part.copy_(apply_rotary_emb(part, freqs))
    return x


class LowMemCogVideoXAttnProcessor:
    """``CogVideoXAttnProcessor2_0`` with the rotary embedding applied ``head_chunk`` heads at a time
    in place (same fp32 math, cast back to the activation dtype)."""

    def __init__(self, head_chunk: int = 8):
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("LowMemCogVideoXAttnProcessor needs torch.nn.functional.scaled_dot_product_attention")
        if head_chunk < 1:
            raise ValueError(f"head_chunk must be >= 1, got {head_chunk}")
        self.head_chunk = int(head_chunk)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        del hidden_states

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            apply_rotary_emb_inplace_(query, image_rotary_emb, text_seq_length, self.head_chunk)
            if not attn.is_cross_attention:
                apply_rotary_emb_inplace_(key, image_rotary_emb, text_seq_length, self.head_chunk)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        del query, key, value

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


def set_low_mem_attention(transformer: nn.Module, enabled: bool, head_chunk: int = 8) -> None:
    """Install :class:`LowMemCogVideoXAttnProcessor` on every attention layer (``enabled``), or put
    diffusers' ``CogVideoXAttnProcessor2_0`` back."""
    _blocks(transformer)  # type check
    proc = LowMemCogVideoXAttnProcessor(head_chunk) if enabled else CogVideoXAttnProcessor2_0()
    transformer.set_attn_processor(proc)


def low_mem_attention_enabled(transformer: nn.Module) -> bool:
    return isinstance(_blocks(transformer)[0].attn1.processor, LowMemCogVideoXAttnProcessor)


def apply_profile(transformer: nn.Module, profile: Profile | str) -> Profile:
    """Set the profile's activation savers on a CogVideoX transformer (and undo those it lacks)."""
    profile = get_profile(profile)
    set_ff_chunking(transformer, profile.ff_chunk)
    set_low_mem_attention(transformer, profile.low_mem_attention, profile.attn_head_chunk)
    return profile
