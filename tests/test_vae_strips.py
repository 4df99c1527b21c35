"""The strip encode (model/vae_strips.py) is diffusers' untiled encode, and with it every profile gives the
resident profile's frames (issue 30, item 1).

fp32 on CPU. The unit tests use the tiny VAE at 224x400 with a strip budget that cuts every layer into
uneven strips; the pipeline test uses the tiny trained-size 1.5 checkpoints at 640x384 (17 frames, 2
steps, seed 3), where the encode and decode tile rules apply (2 x 3 tiles of 240x360 at overlap 0.2,
an inner one blending on two sides). On the code before the strip encode (main e360d4a) lowvram's frames
were 0.25 off resident's (9% of the values more than 1/255), balanced's 9.2e-6.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from cogvid_core.model import vae as vae_mod
from cogvid_core.model import vae_strips
from cogvid_core.model import variants as M
from cogvid_core.model.testing import build_random, write_checkpoints
from cogvid_core.model.tiles import TileSpec

V15 = M.VARIANTS["cogvideox1.5-5b-i2v"]
SMALL_BUDGET = 1024 ** 2     # ~10-13 rows per strip at 400 px wide: uneven strips in every layer
ENCODE_BOUND = 1e-5
FRAMES_BOUND = 1e-4


def _image(h, w, seed=7):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny_vae():
    return build_random("vae", V15, tiny=True)


def test_strip_encode_equals_the_untiled_encode(tiny_vae):
    calls = []
    hook = tiny_vae.encoder.conv_in.conv.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[3]))
    try:
        ref = vae_mod.encode_image(tiny_vae, _image(224, 400), 224, 400, V15)
        n_ref = len(calls)
        got = vae_mod.encode_image(tiny_vae, _image(224, 400), 224, 400, V15, strips=True, strip_bytes=SMALL_BUDGET)
    finally:
        hook.remove()
    assert n_ref == 1 and len(calls) - n_ref >= 8, calls     # the strip encode did cut the first layer (9 strips)
    assert (got.mean - ref.mean).abs().max().item() <= ENCODE_BOUND
    assert (got.std - ref.std).abs().max().item() <= ENCODE_BOUND
    assert got.mean.shape == ref.mean.shape == (1, 16, 1, 28, 50)


def test_the_bound_sees_the_tiled_encode(tiny_vae):
    """diffusers' tiled encode (what lowvram ran) is far outside the bound the strip encode keeps."""
    ref = vae_mod.encode_image(tiny_vae, _image(224, 400), 224, 400, V15)
    tiled = vae_mod.encode_image(tiny_vae, _image(224, 400), 224, 400, V15, tile=TileSpec(160, 240, 0.2))
    rel = ((tiled.mean - ref.mean).norm() / ref.mean.norm()).item()
    assert rel > 0.01 and (tiled.mean - ref.mean).abs().max().item() > 100 * ENCODE_BOUND


def test_layers_come_back_after_an_error(tiny_vae):
    before = {name: type(m) for name, m in tiny_vae.encoder.named_modules()}

    def fail(module, args, output):
        raise RuntimeError("boom")

    hook = tiny_vae.encoder.mid_block.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vae_strips.encode_frame(tiny_vae, torch.zeros(1, 3, 1, 64, 96), SMALL_BUDGET)
    finally:
        hook.remove()
    assert {name: type(m) for name, m in tiny_vae.encoder.named_modules()} == before


def test_strip_rows_follow_the_budget():
    assert vae_strips.strip_rows(1000, 768, 10_000) == 10
    assert vae_strips.strip_rows(1000, 768, 10 ** 9) == 768      # never more rows than the image has
    assert vae_strips.strip_rows(10 ** 9, 768, 10) == 1          # never fewer than one


def test_strip_encode_refuses_several_frames(tiny_vae):
    with pytest.raises(ValueError, match="one frame"):
        vae_strips.encode_frame(tiny_vae, torch.zeros(1, 3, 5, 64, 96))


# ------------------------------------------------------------------------------ every profile, one video
_FRAMES: dict = {}


@pytest.fixture(scope="module")
def trained_size_15(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained_size")
    return str(write_checkpoints(root, V15.key, tiny=M.TRAINED_SIZE, layouts=("hf",))["hf"])


def _frames(folder, profile):
    from cogvid_core.run import pipeline

    if profile not in _FRAMES:
        job = pipeline.Job(image=_image(384, 640), prompt="a small boat drifts on a calm lake", frames=17,
                           height=384, width=640, steps=2, seed=3)
        _FRAMES[profile] = pipeline.generate(pipeline.Sources.from_model(folder), job, precision="fp32",
                                             device="cpu", profile=profile).frames
    return _FRAMES[profile]


@pytest.mark.parametrize("profile", ["lowvram", "balanced"])
def test_every_profile_gives_the_resident_frames(trained_size_15, profile):
    ref, got = _frames(trained_size_15, "resident"), _frames(trained_size_15, profile)
    assert got.shape == ref.shape == (17, 384, 640, 3)
    assert ref.std() > 0.01, "the resident video is flat: the comparison would prove nothing"
    diff = (got - ref).abs().max().item()
    print(f"{profile} vs resident at 640x384: max abs frame diff {diff:.2e}")
    assert diff <= FRAMES_BOUND, f"{profile}: max abs frame difference from resident {diff}"
