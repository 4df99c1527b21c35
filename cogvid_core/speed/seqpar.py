"""Sequence parallel (Ulysses) for CogVideoXTransformer3DModel over torch.distributed ranks.

Every rank runs the whole sampling loop; inside the transformer each rank holds 1/N of the video
tokens from the first block to the last (the 226 text tokens stay whole on every rank):

* forward pre-hooks on each block hand it this rank's slice of the video tokens (the first block)
  and of the RoPE tables (every block: the model passes them whole);
* around attention, a ``TorchFunctionMode`` catches ``F.scaled_dot_product_attention`` (diffusers'
  CogVideoX processor and ours call it directly): the video part of Q, K, V goes all-to-all from
  [heads, tokens/N] to [heads/N, all tokens], the text part keeps this rank's heads; attention runs
  on H/N heads over the whole sequence, and the output goes back the same way (text heads
  all-gathered, so every rank keeps identical text tokens). The mode is entered for each block's
  call, so it lies above a speed option's attention redirect (fast): the speed's kernel runs the
  local attention on the gathered heads, and compile traces the blocks with the exchange left eager;
* a forward hook on the last block all-gathers the video tokens, so the final norm, projection
  and unpatchify see the whole sequence, as on one GPU.

Norms, feed-forward and the block's gates act per token, attention per head: each rank does the
same arithmetic as one process on its share, so results equal the one-process run up to the
attention kernel's rounding. Tokens and heads must divide by N (1.5 at 81x768x1360: 44880 tokens,
48 heads: N = 2, 4, 8 work). Per step and transformer call each rank sends 4 all-to-alls per
block (Q, K, V in, output back) of (N-1)/N of its [B, H, tokens/N, D] share: see
:func:`alltoall_bytes`.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cogvid_core.speed.hooks import while_running


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def writes() -> bool:
    """Whether this process writes the outputs: the only one, or rank 0 of a torchrun group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init(device_type: str = "cuda") -> torch.device:
    """Join the torchrun group (NCCL for GPUs, gloo for the CPU); returns this rank's device."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type != "cuda":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if local >= torch.cuda.device_count():
        raise ValueError(f"rank {dist.get_rank()} wants cuda:{local}, torch sees {torch.cuda.device_count()} GPU(s): "
                         "start torchrun with --nproc-per-node at most the number of GPUs")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _shard(x: torch.Tensor, dim: int, rank: int, n: int) -> torch.Tensor:
    return x.chunk(n, dim=dim)[rank].contiguous()


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all over dim 0 (one slice per rank)."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def heads_to_tokens(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """[B, H, S/N, D] (all heads, this rank's tokens) -> [B, H/N, S, D] (this rank's heads, all tokens)."""
    b, h, s, d = x.shape
    parts = _exchange(x.reshape(b, n, h // n, s, d).transpose(0, 1).contiguous(), group)   # [N(src), B, H/N, S/N, D]
    return parts.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def tokens_to_heads(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """The inverse of :func:`heads_to_tokens`."""
    b, hn, s, d = x.shape
    parts = _exchange(x.reshape(b, hn, n, s // n, d).permute(2, 0, 1, 3, 4).contiguous(), group)   # [N(src heads)..]
    return parts.transpose(0, 1).reshape(b, n * hn, s // n, d)


class UlyssesAttention(TorchFunctionMode):
    """Catches SDPA calls over [text; this rank's video tokens] and runs them Ulysses-style."""

    def __init__(self, group=None):
        super().__init__()
        self.text_len, self.local_len, self.group = 0, None, group   # set by the first block's hook
        self.n, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.sent_bytes = 0           # all-to-all bytes this rank sent (measured, for the scaling estimate)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or args[0].shape[2] != self.text_len + self.local_len:
            return func(*args, **kwargs)
        return self._attend(func, args, kwargs)

    @torch.compiler.disable
    def _attend(self, func, args, kwargs):
        """The exchange, the attention and the way back, run eagerly inside a compiled block (speed
        'compile'): traced, the byte count became a guard (a new graph at every call) and the collectives
        in-graph ones. ``func`` reaches the mode below this one: a speed's attention kernel, else SDPA."""
        q, k, v = args[:3]
        t, n = self.text_len, self.n
        if q.shape[1] % n:
            raise ValueError(f"sequence parallel over {n} ranks needs the heads ({q.shape[1]}) to divide by {n}")
        whole = [torch.cat([_shard(x[:, :, :t], 1, self.rank, n), heads_to_tokens(x[:, :, t:], n, self.group)], dim=2)
                 for x in (q, k, v)]
        self.sent_bytes += alltoall_bytes(q.shape[0], q.shape[1], t, q.shape[2] - t, q.shape[3], q.element_size(), n)
        out = func(*whole, *args[3:], **kwargs)
        text = [torch.empty_like(out[:, :, :t]) for _ in range(n)]
        dist.all_gather(text, out[:, :, :t].contiguous(), group=self.group)
        return torch.cat([torch.cat(text, dim=1), tokens_to_heads(out[:, :, t:].contiguous(), n, self.group)], dim=2)


def alltoall_bytes(batch: int, heads: int, text: int, local: int, head_dim: int, elsize: int, n: int) -> int:
    """Bytes one rank sends for one attention layer: Q, K, V and the output, each (N-1)/N of its
    [B, H, local tokens, D] share, plus its text heads to the N-1 others."""
    video = 4 * batch * heads * local * head_dim * elsize * (n - 1) // n
    return video + batch * (heads // n) * text * head_dim * elsize * (n - 1)


@contextmanager
def sequence_parallel(transformer, group=None):
    """Inside: ``transformer`` (a CogVideoXTransformer3DModel) computes with its video tokens split
    over the group's ranks; every rank must call it with the same inputs. Yields the attention
    mode (its ``sent_bytes`` counts what this rank sent)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = transformer.transformer_blocks
    mode = UlyssesAttention(group)

    def before(block, args, kwargs):
        if block is blocks[0]:
            hs = kwargs["hidden_states"]
            if hs.shape[1] % n:
                raise ValueError(f"sequence parallel over {n} ranks needs the video tokens ({hs.shape[1]}) to divide "
                                 f"by {n}: change the size or frame count, or use fewer GPUs")
            mode.text_len, mode.local_len = kwargs["encoder_hidden_states"].shape[1], hs.shape[1] // n
            kwargs["hidden_states"] = _shard(hs, 1, rank, n)
        rope = kwargs.get("image_rotary_emb")
        if rope is not None:     # the model hands every block the whole tables
            kwargs["image_rotary_emb"] = tuple(_shard(r, 0, rank, n) for r in rope)
        return args, kwargs

    def after(block, args, kwargs, output):
        hs, enc = output
        parts = [torch.empty_like(hs) for _ in range(n)]
        dist.all_gather(parts, hs.contiguous(), group=group)
        mode.local_len = None
        return torch.cat(parts, dim=1), enc

    with ExitStack() as stack:
        for block in blocks:
            stack.callback(block.register_forward_pre_hook(before, with_kwargs=True).remove)
            _inside(block, mode, stack)
        stack.callback(blocks[-1].register_forward_hook(after, with_kwargs=True).remove)
        yield mode


def _inside(block, mode: UlyssesAttention, stack: ExitStack) -> None:
    """``mode`` entered for each call of ``block`` only. Entered at the block, it lies on top of any mode
    entered around the whole transformer (a speed's attention redirect, fast._route), whatever the order
    the two were set up in: Ulysses catches the attention call first and hands the gathered Q, K, V to
    the mode below, so the speed's kernel runs the local attention instead of bypassing the exchange."""
    while_running(block, stack, mode.__enter__, lambda: mode.__exit__(None, None, None))


def active(transformer):
    """sequence_parallel over the default group when torchrun started several ranks, else nothing."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return sequence_parallel(transformer)
    return nullcontext()
