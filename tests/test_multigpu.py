"""Two devices in one process: CFG branches at once on a second copy of the transformer, device
names, components on different devices. CPU runs take the very code path of two GPUs (two
"devices" that are both the CPU), so the result must equal the one-device run."""
from __future__ import annotations

import pytest
import torch

from cogvid_core import models as M
from cogvid_core import multigpu as MG
from cogvid_core import sampling
from cogvid_core.placement import place, placed_of, unplace
from cogvid_core.testing import build_random
from cogvid_core.vae import ImageLatent

KEY = "cogvideox1.5-5b-i2v"


def _inputs(variant, seed=3):
    cfg = M.transformer_config(variant, tiny=True)
    frames, h, w = M.default_size(variant, cfg)
    g = torch.Generator().manual_seed(seed)
    dim = cfg["text_embed_dim"]
    pos, neg = (torch.randn(1, M.MAX_TEXT_TOKENS, dim, generator=g) for _ in range(2))
    lat = ImageLatent(mean=torch.randn(1, 16, 1, h // 8, w // 8, generator=g),
                      std=torch.rand(1, 16, 1, h // 8, w // 8, generator=g) * 0.1, height=h, width=w, scale=0.7)
    return frames, pos, neg, lat


def _sample(tr, variant, cfg_mode="sequential", steps=3, cfg=6.0):
    frames, pos, neg, lat = _inputs(variant)
    return sampling.sample(tr, variant, pos, neg, lat, frames, steps=steps, cfg=cfg, seed=5, device="cpu",
                           dtype=torch.float32, cfg_mode=cfg_mode).samples


@pytest.fixture
def transformer():
    return build_random("transformer", KEY, tiny=True, dtype=torch.float32)


def test_cfg_parallel_equals_one_device(transformer):
    variant = M.VARIANTS[KEY]
    one = _sample(transformer, variant, "sequential")
    batched = _sample(transformer, variant, "batched")
    MG.attach_second(transformer, "cpu")
    calls = []
    handle = MG.second_of(transformer).module.register_forward_pre_hook(lambda m, a, k: calls.append(1),
                                                                        with_kwargs=True)
    two = _sample(transformer, variant, "batched")    # the pair ignores batching: one branch per device
    handle.remove()
    assert len(calls) == 3, "the second copy ran the unconditional branch once per step"
    assert torch.equal(two, one), (two - one).abs().max()
    torch.testing.assert_close(two, batched, rtol=1e-5, atol=1e-5)
    assert two.abs().max() > 0.1


def test_cfg_parallel_sees_a_different_second_branch(transformer):
    """The check above can fail: a second copy with other weights changes the result."""
    variant = M.VARIANTS[KEY]
    one = _sample(transformer, variant)
    second = MG.attach_second(transformer, "cpu")
    with torch.no_grad():
        second.module.proj_out.weight.mul_(1.01)
    assert not torch.allclose(_sample(transformer, variant), one, atol=1e-4)


def test_no_cfg_runs_on_the_first_device_only(transformer):
    variant = M.VARIANTS[KEY]
    one = _sample(transformer, variant, cfg=1.0)
    calls = []
    second = MG.attach_second(transformer, "cpu")
    second.module.register_forward_pre_hook(lambda m, a: calls.append(1))
    assert torch.equal(_sample(transformer, variant, cfg=1.0), one)
    assert not calls


def test_replica_shares_weights_but_moves_alone(transformer):
    rep = MG.replicate(transformer)
    a, b = next(transformer.parameters()), next(rep.parameters())
    assert a is not b and a.data_ptr() == b.data_ptr()
    rep.to(torch.float64)               # placing one copy never converts or moves the other
    assert next(transformer.parameters()).dtype == torch.float32


def test_replica_refused_after_placement(transformer):
    place(transformer, "cpu", "resident")
    with pytest.raises(RuntimeError, match="before it is placed"):
        MG.replicate(transformer)
    unplace(transformer)
    transformer.proj_out.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="hooked"):
        MG.replicate(transformer)


def test_second_copy_takes_the_first_ones_settings(transformer):
    from cogvid_core.activations import apply_profile, ff_chunk_tokens, low_mem_attention_enabled

    second = MG.attach_second(transformer, "cpu")
    apply_profile(transformer, "lowvram")
    place(transformer, "cpu", "offload")
    with MG.mirrored(transformer, second) as rep:
        assert rep is second.module
        assert ff_chunk_tokens(rep) == ff_chunk_tokens(transformer) is not None
        assert low_mem_attention_enabled(rep)
        assert placed_of(rep).requested == "offload"


def test_parse_devices():
    m = MG.parse_devices("cpu,cpu")
    assert m.transformer == (torch.device("cpu"),) * 2 and m.second == torch.device("cpu")
    m = MG.parse_devices("transformer=cpu,t5=cpu")
    assert m.second is None and m.of("vae") == torch.device("cpu")
    assert MG.parse_pair("cpu+cpu") == (torch.device("cpu"),) * 2
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        MG.parse_devices("cpu,unet=cpu")
    with pytest.raises(ValueError, match="one device or two"):
        MG.parse_devices("cpu,cpu,cpu")
    with pytest.raises(ValueError, match="given twice"):
        MG.parse_devices("cpu,transformer=cpu")
    with pytest.raises(ValueError, match="not a device name"):
        MG.parse_devices("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            MG.parse_devices("cuda:0,cuda:1")


def test_device_choices():
    assert MG.device_choices(1) == ["cuda:0", "cuda:1", "cuda:0+cuda:1"]
    assert "cuda:2+cuda:3" in MG.device_choices(4)
