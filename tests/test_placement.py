"""Activation savers are exact; placements give the resident result and leave nothing behind."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cogvid_core.memory import activations as A
from cogvid_core.model import variants as M
from cogvid_core.memory import placement as P
from cogvid_core.plan import planner as PL
from cogvid_core.memory import profiles as PR
from cogvid_core.model.testing import build_random
from cogvid_core.memory.profiles import TileSpec

VARIANTS = [M.V15, M.V10]


def _inputs(tr, variant, batch=2, seed=1):
    cfg = tr.config
    g = torch.Generator().manual_seed(seed)
    if variant.fixed_size:
        frames, h, w = (cfg.sample_frames - 1) // 4 + 1, cfg.sample_height, cfg.sample_width
    else:
        frames, h, w = 4, 8, 12
    pt = cfg.patch_size_t or 1
    tokens = (frames // pt) * (h // cfg.patch_size) * (w // cfg.patch_size)
    angle = torch.rand(tokens, cfg.attention_head_dim, generator=g) * 6.0
    kw = dict(hidden_states=torch.randn(batch, frames, cfg.in_channels, h, w, generator=g),
              encoder_hidden_states=torch.randn(batch, M.MAX_TEXT_TOKENS, cfg.text_embed_dim, generator=g),
              timestep=torch.full((batch,), 500), image_rotary_emb=(angle.cos(), angle.sin()), return_dict=False)
    if cfg.ofs_embed_dim:
        kw["ofs"] = torch.full((batch,), 2.0)
    return kw


def _run(tr, kw):
    with torch.no_grad():
        return tr(**kw)[0]


@pytest.fixture(params=VARIANTS, ids=lambda v: v.key)
def tiny(request):
    torch.manual_seed(0)
    tr = build_random("transformer", request.param, tiny=True, dtype=torch.float32)
    return request.param, tr


# ------------------------------------------------------------------------------- activation savers
def test_chunked_ff_matches(tiny):
    variant, tr = tiny
    kw = _inputs(tr, variant)
    ref = _run(tr, kw)
    keys = list(tr.state_dict())
    assert A.set_ff_chunking(tr, 7) == len(tr.transformer_blocks)   # 7 does not divide the sequence
    assert isinstance(tr.transformer_blocks[0].ff, A.ChunkedFeedForward) and A.ff_chunk_tokens(tr) == 7
    assert list(tr.state_dict()) == keys                               # same checkpoint keys
    out = _run(tr, kw)
    assert (out - ref).abs().max().item() <= 1e-5
    A.set_ff_chunking(tr, 100_000)                                      # larger than the sequence: one pass
    assert (_run(tr, kw) - ref).abs().max().item() <= 1e-5
    A.set_ff_chunking(tr, None)
    assert A.ff_chunk_tokens(tr) is None and type(tr.transformer_blocks[0].ff).__name__ == "FeedForward"
    assert torch.equal(_run(tr, kw), ref)


def test_low_mem_attention_matches(tiny):
    variant, tr = tiny
    kw = _inputs(tr, variant)
    ref = _run(tr, kw)
    for head_chunk in (1, 2, 64):
        A.set_low_mem_attention(tr, True, head_chunk=head_chunk)
        assert A.low_mem_attention_enabled(tr)
        assert (_run(tr, kw) - ref).abs().max().item() <= 1e-5
    A.set_low_mem_attention(tr, False)
    assert not A.low_mem_attention_enabled(tr)
    assert torch.equal(_run(tr, kw), ref)


def test_rope_inplace_is_bitwise_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 6, 20, 16, generator=g).to(dtype)
        ang = torch.rand(15, 16, generator=g) * 6
        freqs = (ang.cos(), ang.sin())
        ref = x.clone()
        ref[:, :, 5:] = apply_rotary_emb(ref[:, :, 5:], freqs)
        out = A.apply_rotary_emb_inplace_(x.clone(), freqs, 5, head_chunk=4)
        assert torch.equal(out, ref), dtype


def test_all_savers_together_match(tiny):
    variant, tr = tiny
    kw = _inputs(tr, variant)
    ref = _run(tr, kw)
    A.apply_profile(tr, "lowvram")
    assert A.ff_chunk_tokens(tr) == PR.PROFILES["lowvram"].ff_chunk and A.low_mem_attention_enabled(tr)
    assert (_run(tr, kw) - ref).abs().max().item() <= 1e-5
    A.apply_profile(tr, "resident")
    assert A.ff_chunk_tokens(tr) is None and not A.low_mem_attention_enabled(tr)


# ------------------------------------------------------------------------------- profiles
def test_profiles_validate():
    assert {"resident", "balanced", "lowvram"} <= set(PR.PROFILES)
    for p in PR.PROFILES.values():
        assert p.validate() is p
    res = PR.PROFILES["resident"]
    assert (res.transformer, res.text_encoder, res.vae, res.cfg_mode) == ("resident",) * 3 + ("batched",)
    assert res.ff_chunk is None and not res.low_mem_attention
    low = PR.PROFILES["lowvram"]
    assert low.transformer == "stream" and low.text_encoder == "stream" and low.cfg_mode == "sequential"
    with pytest.raises(ValueError, match="placement must be one of"):
        res.replace(transformer="gpu")
    with pytest.raises(ValueError, match="VAE has no block list"):
        res.replace(vae="stream")
    with pytest.raises(ValueError, match="cfg_mode"):
        res.replace(cfg_mode="parallel")
    with pytest.raises(ValueError, match="ff_chunk"):
        res.replace(ff_chunk=0)
    with pytest.raises(ValueError, match="TileSpec"):
        res.replace(vae_tile=(240, 360))
    assert res.replace(vae_tile=TileSpec(160, 240, 0.2)).vae_tile.width == 240
    with pytest.raises(ValueError, match="whole latent steps"):
        res.replace(vae_tile=TileSpec(240, 360, 1 / 6))   # diffusers would make 1360 px into 1376


def test_tile_exactness_rule():
    assert PR.tile_is_exact(240, 1 / 6) and PR.tile_is_exact(360, 0.2) and PR.tile_is_exact(240, 0.2)
    assert not PR.tile_is_exact(360, 1 / 6) and not PR.tile_is_exact(192, 0.2)
    assert PR.snap_tile(TileSpec(240, 360, 0.2)) == TileSpec(240, 360, 0.2)
    assert PR.snap_tile(TileSpec(192, 288, 0.2)) == TileSpec(160, 280, 0.2)
    derived = dataclasses.replace(PR.PROFILES["lowvram"], name="lowvram+tile", vae_tile=TileSpec(192, 288, 0.2))
    assert PR.get_profile(derived).vae_tile == TileSpec(160, 280, 0.2)   # a planner's inexact tile is snapped


def test_chunked_ff_batched_bf16_is_bitwise():
    """Each chunk is one batch element's contiguous token range: a batch of 2 (CFG batched) gives
    the unchunked bits in bf16 (a strided [:, a:b] slice of the batch took other kernels and
    drifted by an ulp, which a random-weight model amplified to visible differences)."""
    torch.manual_seed(0)
    tr = build_random("transformer", M.V15, tiny=True, dtype=torch.bfloat16)
    kw = _inputs(tr, M.V15, batch=2)
    kw = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    ref = _run(tr, kw)
    A.set_ff_chunking(tr, 7)
    assert torch.equal(_run(tr, kw), ref)


def test_resolve_profile():
    assert PL.resolve_profile("balanced") is PR.PROFILES["balanced"]
    with pytest.raises(ValueError, match="unknown placement profile"):
        PL.resolve_profile("turbo")
    assert PL.resolve_profile("auto", device="cpu") is PR.PROFILES["resident"]
    seen = []

    def pick(budget):
        seen.append(budget)
        return "lowvram" if budget < 20 * 1024 ** 3 else "balanced"

    assert PL.resolve_profile("auto", 8 * 1024 ** 3, pick) is PR.PROFILES["lowvram"]
    assert PL.resolve_profile("auto", estimate_fn=pick, budget_gib=22) is PR.PROFILES["balanced"]
    assert seen == [8 * 1024 ** 3, 22 * 1024 ** 3]


# ------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("mode", P.MODES)
def test_place_on_cpu_degrades_to_resident(tiny, mode):
    variant, tr = tiny
    kw = _inputs(tr, variant)
    ref = _run(tr, kw)
    placed = P.place(tr, "cpu", mode)
    assert placed.mode == "resident" and placed.requested == mode
    assert P.place(tr, "cpu", mode) is placed                       # idempotent
    with placed.use() as m:
        assert m is tr
        assert torch.equal(_run(m, kw), ref)
    placed.release()
    assert placed.released and P.placed_of(tr) is None
    with pytest.raises(RuntimeError, match="released"):
        placed.acquire()


def _has_hooks(module):
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks for m in module.modules())


def test_offload_mode_real_copies_on_cpu(tiny):
    variant, tr = tiny
    kw = _inputs(tr, variant)
    ref = _run(tr, kw)
    placed = P.place(tr, "cpu", "offload", degrade_on_cpu=False)
    assert placed.mode == "offload"
    w = tr.transformer_blocks[0].ff.net[2].weight
    host = w.data
    with placed.use():
        assert torch.equal(_run(tr, kw), ref)
    assert w.data.data_ptr() == host.data_ptr()                      # back on the kept host copy
    with placed.use():                                                # reusable
        assert torch.equal(_run(tr, kw), ref)
    placed.release()
    assert torch.equal(_run(tr, kw), ref)


def test_stream_mode_hooks_on_cpu(tiny):
    """Group-offloading hooks (CPU onload, no side stream) give the resident result; release removes them."""
    variant, tr = tiny
    kw = _inputs(tr, variant)
    ref = _run(tr, kw)
    A.apply_profile(tr, "lowvram")                                  # savers and hooks together
    placed = P.place(tr, "cpu", "stream", degrade_on_cpu=False)
    assert placed.mode == "stream" and _has_hooks(tr)
    for _ in range(2):                                                # first call traces, second prefetches
        with placed.use():
            out = _run(tr, kw)
        assert (out - ref).abs().max().item() <= 1e-5
    placed.release()
    assert not _has_hooks(tr)
    assert all(t.device.type == "cpu" for t in tr.parameters())
    A.apply_profile(tr, "resident")
    assert torch.equal(_run(tr, kw), ref)


def test_stream_t5_streams_its_blocks():
    torch.manual_seed(0)
    t5 = build_random("text_encoder", M.V15, tiny=True, dtype=torch.float32)
    assert P.stream_root(t5) is t5.encoder
    ids = torch.randint(0, 100, (1, M.MAX_TEXT_TOKENS))
    with torch.no_grad():
        ref = t5(ids)[0]
    placed = P.place(t5, "cpu", "stream", degrade_on_cpu=False)
    hooked = [m for m in t5.encoder.block if getattr(m, "_diffusers_hook", None) is not None
              and m._diffusers_hook.hooks]
    assert len(hooked) == len(t5.encoder.block)                      # every T5 layer is its own group
    with placed.use(), torch.no_grad():
        assert (t5(ids)[0] - ref).abs().max().item() <= 1e-6
    placed.release()
    assert not _has_hooks(t5)
    with torch.no_grad():
        assert torch.equal(t5(ids)[0], ref)


def test_stream_refuses_blockless_module():
    with pytest.raises(ValueError, match="no block list"):
        P.place(torch.nn.Linear(2, 2), "cpu", "stream", degrade_on_cpu=False)


def test_replacing_a_placement_releases_the_old_one(tiny):
    variant, tr = tiny
    first = P.place(tr, "cpu", "stream", degrade_on_cpu=False)
    second = P.place(tr, "cpu", "offload", degrade_on_cpu=False)
    assert first.released and not second.released and not _has_hooks(tr)
    P.unplace(tr)
    assert second.released and P.placed_of(tr) is None
    P.unplace(tr)                                                     # no placement: just to host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", P.MODES)
def test_cuda_modes_match_and_release(mode):
    torch.manual_seed(0)
    tr = build_random("transformer", M.V15, tiny=True, dtype=torch.float32)
    kw = _inputs(tr, M.V15)
    ref = _run(tr, kw)
    dev = torch.device("cuda")
    kw_dev = {k: (v.to(dev) if torch.is_tensor(v) else tuple(x.to(dev) for x in v) if isinstance(v, tuple) else v)
              for k, v in kw.items()}
    base = torch.cuda.memory_allocated()
    placed = P.place(tr, dev, mode)
    for _ in range(2):
        with placed.use():
            out = _run(tr, kw_dev).cpu()
        assert (out - ref).abs().max().item() <= 1e-4
    placed.release()
    assert torch.cuda.memory_allocated() <= base
    assert all(t.device.type == "cpu" for t in tr.parameters()) and not _has_hooks(tr)
    # offload/stream pinned host copies; a released placement keeps no page-locked memory
    assert not any(t.is_pinned() for t in tr.parameters())


def test_flat_copy_packs_every_tensor_into_one_buffer():
    """The offloaded host copies share one (page-locked on a GPU) buffer: same values, dtypes and
    shapes, views at aligned offsets; an already-pinned tensor would be left as it is (GPU only)."""
    g = torch.Generator().manual_seed(0)
    hosts = [torch.randn(3, 5, generator=g).to(torch.bfloat16), torch.randn(7, generator=g),
             torch.arange(4, dtype=torch.int64), torch.zeros(0), torch.randn(2, 3, generator=g).t()]
    views, bufs = P.flat_copy(hosts, pin=False)
    (buf, registered), = bufs
    assert not registered
    for h, v in zip(hosts, views):
        assert v.dtype == h.dtype and v.shape == h.shape and torch.equal(v, h)
        if v.numel():
            assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert (v.data_ptr() - buf.data_ptr()) % 64 == 0


def test_registered_host_bytes_are_counted_until_unregistered(monkeypatch):
    """What the benches report as page-locked beside torch's pinned allocator: every cudaHostRegister of a
    staging buffer or offload copy counts until its unregister (the CUDA calls replaced: no GPU here)."""
    from cogvid_core.memory import fileread

    calls = []

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    start = fileread.registered_bytes()
    hosts = [torch.randn(10, 3), torch.arange(7, dtype=torch.int64)]
    views, bufs = P.flat_copy(hosts, pin=True)
    size = bufs[0][0].numel()
    assert bufs[0][1] is True and size >= sum(h.numel() * h.element_size() for h in hosts)
    assert fileread.registered_bytes() == start + size and calls == [("register", size)]
    fileread.unregister(bufs)
    assert fileread.registered_bytes() == start and [c[0] for c in calls] == ["register", "unregister"] and not bufs
