"""Live previews, engine side: the sampling loop's per-step preview callback, and the latent-to-RGB
projection and its least-squares fit (cogvid_core.model.latent_rgb). The node side is in
tests/test_preview_nodes.py."""
from __future__ import annotations

import pytest
import torch

from cogvid_core.model import latent_rgb, variants as models
from cogvid_core.memory.placement import place
from cogvid_core.model.loading import load_transformer
from cogvid_core.model.vae import ImageLatent
from cogvid_core.run import sampling


@pytest.fixture(scope="module")
def tiny15(tiny_ckpts):
    tr = load_transformer(str(tiny_ckpts["cogvideox1.5-5b-i2v"]["single"]["transformer"]), dtype=torch.float32,
                          progress=False)[0]
    place(tr, "cpu", "resident")                      # file-backed: read the weights in
    g = torch.Generator().manual_seed(5)
    h, w = 64, 96
    latent = ImageLatent(mean=torch.randn(1, 16, 1, h // 8, w // 8, generator=g),
                         std=torch.zeros(1, 16, 1, h // 8, w // 8), height=h, width=w, scale=0.7)
    dim = tr.config.text_embed_dim
    return tr, torch.randn(1, 226, dim, generator=g), torch.randn(1, 226, dim, generator=g), latent


def _sample(tiny15, scheduler="dpm", **kw):
    tr, pos, neg, latent = tiny15
    return sampling.sample(tr, models.V15, pos, neg, latent, 17, steps=3, cfg=6.0, scheduler=scheduler, seed=3,
                           device="cpu", dtype=torch.float32, **kw).samples


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_preview_once_per_step_with_the_middle_frame(tiny15, scheduler):
    """One call per step, in order, before that step's progress; a [1, 16, h, w] view of the step's
    predicted clean latents; the video is the same with or without the callback."""
    calls = []

    def preview(i, n, frame):
        in_x0 = frame.untyped_storage().nbytes() > 4 * frame.numel()    # a slice of x0, not a copy
        calls.append(("preview", i, n, tuple(frame.shape), in_x0, frame.clone()))
    progress = lambda done, n: calls.append(("progress", done, n))
    with_preview = _sample(tiny15, scheduler, preview=preview, progress=progress)
    kinds = [c[0] for c in calls]
    assert kinds == ["preview", "progress"] * 3
    previews = [c for c in calls if c[0] == "preview"]
    assert [(i, n) for _, i, n, *_ in previews] == [(0, 3), (1, 3), (2, 3)]
    # 17 frames of 1.5: 5 latent frames + 1 leading padding frame; 64x96 -> 8x12 latent pixels
    assert all(shape == (1, 16, 8, 12) and in_x0 for _, _, _, shape, in_x0, _ in previews)
    assert not torch.equal(previews[0][-1], previews[-1][-1])          # the prediction moves between steps
    assert torch.equal(with_preview, _sample(tiny15, scheduler))


def test_no_callback_no_preview_work(tiny15, monkeypatch):
    """Without a preview callback the loop never takes a preview frame."""
    def fail(*a, **k):
        raise AssertionError("preview work without a preview callback")
    monkeypatch.setattr(sampling, "preview_frame", fail)
    _sample(tiny15)


def test_middle_frame_skips_padding():
    x0 = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 16, 2, 3)
    assert sampling.preview_frame(x0, skip=1)[0, 0, 0, 0] == 3        # frames 1..5: the middle is 3
    assert sampling.preview_frame(x0[:, :5])[0, 0, 0, 0] == 2
    assert sampling.preview_frame(x0).shape == (1, 16, 2, 3)


def test_projection_table_and_shape():
    assert len(latent_rgb.RGB_FACTORS) == models.LATENT_CHANNELS and all(len(r) == 3 for r in latent_rgb.RGB_FACTORS)
    assert len(latent_rgb.RGB_BIAS) == 3
    rgb = latent_rgb.project(torch.zeros(1, 16, 4, 5))
    assert rgb.shape == (4, 5, 3) and torch.allclose(rgb[0, 0], torch.tensor(latent_rgb.RGB_BIAS))


def test_fit_recovers_a_linear_map():
    """The least-squares fit finds a known projection (what bench/fit_latent_rgb.py runs on a real VAE)."""
    g = torch.Generator().manual_seed(0)
    factors, bias = torch.randn(16, 3, generator=g) * 0.1, torch.tensor([0.1, -0.2, 0.05])
    latents = torch.randn(4, 16, 6, 7, generator=g)
    rgb = (latents.movedim(1, -1) @ factors + bias).movedim(-1, 1)
    got, got_bias, rms = latent_rgb.fit(latents, rgb + 1e-4 * torch.randn(rgb.shape, generator=g))
    assert torch.allclose(torch.tensor(got, dtype=torch.float32), factors, atol=1e-3)
    assert torch.allclose(torch.tensor(got_bias, dtype=torch.float32), bias, atol=1e-3) and rms < 1e-3


def test_latent_grid_footprints():
    """Frame 0 alone, then 4 frames per latent frame; 8x8 pixels per latent pixel."""
    video = torch.arange(9.0).view(9, 1, 1, 1).expand(9, 3, 16, 24)
    grid = latent_rgb.latent_grid(video, latent_frames=3)
    assert grid.shape == (3, 3, 2, 3)
    assert grid[:, 0, 0, 0].tolist() == [0.0, 2.5, 6.5]


def _bench(name):
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_preview_quick_cpu(tmp_path):
    """bench/bench_preview.py's CPU mode: every part timed on the full 1.5 latent, steps with and without."""
    import json
    out = tmp_path / "preview.json"
    assert _bench("bench_preview").main(["--tiny", "--device", "cpu", "--repeats", "2", "--steps", "2",
                                         "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["parts"]["shape"] == [1, 22, 16, 96, 170] and doc["parts"]["jpeg_bytes"] > 1000
    assert all(doc["parts"][k] > 0 for k in ("project", "encode", "total")) and doc["step_source"] == "measured"
    assert doc["steps"]["with"]["preview_s"] > 0 and doc["steps"]["without"]["preview_s"] is None
    assert "preview / step (%)" in doc["table"] and doc["card"]


def test_fit_script_tiny_cpu(tmp_path):
    """bench/fit_latent_rgb.py on a tiny random VAE: a 16x3 table and bias, better than the shipped one there."""
    import json
    out = tmp_path / "fit.json"
    assert _bench("fit_latent_rgb").main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["factors"]) == 16 and all(len(r) == 3 for r in doc["factors"]) and len(doc["bias"]) == 3
    assert doc["rms"] < doc["shipped_rms"]
