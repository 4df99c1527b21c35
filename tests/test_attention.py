"""FlashAttention-3 FP8 attention (cogvid_core.speed.attention "fa3fp8"): the quantization and layout around the
kernel, checked on the CPU with a stand-in for flash_attn_interface that computes attention from the
float8 inputs and their descales, as the kernel's contract says (q, k, v [B, S, H, D] float8 e4m3,
descales float32 [B, H], bf16 output)."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from cogvid_core.speed import attention as A
from cogvid_core.speed import fast


@pytest.fixture
def fake_fa3(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, q_descale=None, k_descale=None, v_descale=None, **_):
        assert q.dtype == k.dtype == v.dtype == torch.float8_e4m3fn
        assert q_descale.shape == q.shape[:1] + q.shape[2:3] and q_descale.dtype == torch.float32
        calls.append(q.shape)
        deq = [x.float() * s[:, None, :, None] for x, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in deq), scale=softmax_scale)
        return out.transpose(1, 2).to(torch.bfloat16)

    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = flash_attn_func
    module.__spec__ = types.SimpleNamespace(name="flash_attn_interface")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    return calls


def _qkv(seed=0, b=2, h=4, s=96, d=64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    k = k + 3.0 * torch.randn(1, h, 1, d, generator=g)          # a per-head offset in K (outliers of the scale)
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fa3_fp8_matches_exact_attention_within_float8_error(fake_fa3):
    q, k, v = _qkv()
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = A.ATTENTION["fa3fp8"].run(q, k, v, 64 ** -0.5)
    assert fake_fa3 == [torch.Size([2, 96, 4, 64])]                # [B, S, H, D] reached the kernel
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert _rel(got, want) < 0.05
    # without taking K's per-head mean out, its offset sets the scale and the error grows
    k8, ks = A.fp8_per_head(k.transpose(1, 2))
    plain = F.scaled_dot_product_attention(q.float(), (k8.float() * ks[:, None, :, None]).transpose(1, 2), v.float())
    assert _rel(got, want) < _rel(plain, want)


def test_fp8_per_head_scales_each_head_to_the_float8_range():
    x = torch.randn(2, 50, 3, 64).to(torch.bfloat16) * torch.tensor([1.0, 100.0, 1e-3]).view(1, 1, 3, 1).to(torch.bfloat16)
    x8, descale = A.fp8_per_head(x)
    assert descale.shape == (2, 3)
    assert not torch.isnan(x8.float()).any() and x8.float().abs().amax() <= A.E4M3_MAX
    assert _rel(x8.float() * descale[:, None, :, None], x) < 0.05


def test_fa3_fp8_is_refused_with_a_reason():
    why = A.ATTENTION["fa3fp8"].check("cpu")
    assert why and ("tokenspeed-fa3" in why or "CUDA" in why)
    speed = fast.resolve("fa3fp8", "cpu")
    assert speed.attention == "sdpa" and "fa3fp8" in speed.notes[0]


def test_fa3_that_does_not_load_is_refused_before_the_run(monkeypatch):
    """An installed FlashAttention-3 whose extension does not load (built for another torch) is dropped with
    the error, when the speed is resolved, not at the first attention call of a run."""
    import importlib.util
    import sys
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn_interface" else None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)      # import raises ImportError
    why = A._fa3_reason("cpu")
    assert "does not load" in why and torch.__version__ in why
