"""Tiled decode assembled on the host, row by row into the frames, equals diffusers' tiled decode
(which assembles the whole video on the device) followed by the plain 0..1 conversion."""
import pytest
import torch

from cogvid_core.model import variants as M
from cogvid_core.model import vae as V
from cogvid_core.memory.profiles import TileSpec
from cogvid_core.model.testing import build_random


def _frames(video):   # what decode() did before: the whole video widened at once
    return (video[0].permute(1, 2, 3, 0).float() * 0.5 + 0.5).clamp_(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_tiles_equal_diffusers_tiled_decode(dtype):
    vae = build_random("vae", M.V15, tiny=True, dtype=dtype)
    torch.manual_seed(1)
    # 2 latent frames of 12x16: a 2x3 grid of 64x64-pixel tiles (8x8 latent) with overlap
    z = torch.randn(1, vae.config.latent_channels, 2, 12, 16, dtype=dtype)
    V.set_tiling(vae, TileSpec(height=64, width=64, overlap=0.25))
    assert V._tiled(vae, z)
    with torch.inference_mode():
        want = _frames(vae.decode(z).sample)            # diffusers' own tiled_decode
        calls = []
        hook = vae.decoder.register_forward_hook(lambda *a: calls.append(1))
        got = V._decode_tiles_to_frames(vae, z)
        hook.remove()
    assert vae.use_tiling                               # restored for the caller
    assert got.device.type == "cpu" and got.is_contiguous() and got.shape == want.shape
    assert torch.equal(got, want)
    assert len(calls) == V.decode_calls(vae, z.shape[2], z.shape[3], z.shape[4])   # the progress total holds


def test_frames_converted_in_passes_equal_the_whole_video_at_once():
    torch.manual_seed(2)
    video = torch.randn(1, 3, 2 * V._FRAMES_PER_PASS + 3, 5, 7).to(torch.bfloat16)
    out = torch.empty(video.shape[2], 5, 7, 3)
    V._frames_into(out, video[0])
    assert torch.equal(out, _frames(video))


def test_decode_trims_the_pool_before_each_decoder_block_only_under_cudamallocasync(monkeypatch):
    """Under cudaMallocAsync the pool is handed back before each decoder block (its NVML peak: the decoder's
    activations change size block to block); elsewhere nothing is added to the decode; same frames either way."""
    vae = build_random("vae", M.V15, tiny=True, dtype=torch.float32)
    torch.manual_seed(3)
    z = torch.randn(1, 3, vae.config.latent_channels, 6, 8)
    lat = V.VideoLatents(samples=z, frames=9, height=48, width=64, variant_key=M.V15.key, fps=16, drop_first=0)
    trims = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: trims.append(1))
    plain = V.decode(vae, lat, device="cpu")
    assert trims == []
    monkeypatch.setattr(V.devmem, "pool_keeps_freed", lambda device: True)
    calls = []
    hook = vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    trimmed = V.decode(vae, lat, device="cpu")
    hook.remove()
    blocks = 3 + len(vae.decoder.up_blocks)     # conv_in, mid_block, each up block, norm_out
    assert len(trims) == blocks * len(calls) and torch.equal(plain, trimmed)
    assert not vae.decoder._forward_pre_hooks and all(not b._forward_pre_hooks for b in vae.decoder.up_blocks)
