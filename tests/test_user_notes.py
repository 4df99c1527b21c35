"""What a run does differently from what the user may expect is said in one line: CogVideoX-5B-I2V below
its trained length (diffusers swaps its learned positional embedding) and a start image cropped hard
(a portrait photo into a landscape video). The LoRA scale hint is in test_lora.py."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cogvid_core.model import loading
from cogvid_core.model import vae as vae_mod
from cogvid_core.model import variants as models
from cogvid_core.run import pipeline

K10, K15 = models.VARIANTS


# ----------------------------------------------------------------------------- 1.0 below its trained length
def test_positions_note_says_when_the_learned_embedding_is_not_used():
    full10 = models.transformer_config(models.V10)
    note = models.positions_note(models.V10, full10, 25)
    print(note)
    assert "\n" not in note and "25 frames" in note and "learned for 49 frames" in note and "sin-cos" in note
    assert models.positions_note(models.V10, full10, 49) is None
    assert models.positions_note(models.V15, models.transformer_config(models.V15), 17) is None   # no learned one


def _patch_embed_output(tr, latent_frames, h, w):
    cfg = tr.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, latent_frames, cfg.in_channels, h, w, generator=g)
    text = torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    with torch.no_grad():
        return tr.patch_embed(text, x)


def test_installed_diffusers_drops_the_learned_embedding_below_trained_length(tiny_ckpts):
    # the note states what diffusers does; if a diffusers release changes it, this fails and the note must too
    tr, _ = loading.load_transformer(tiny_ckpts[K10]["single"]["transformer"], dtype=torch.float32,
                                     file_backed=False)
    cfg = dict(tr.config)
    h, w = cfg["sample_height"], cfg["sample_width"]
    trained = models.latent_frames(models.V10, cfg["sample_frames"])[0]
    shorter = models.latent_frames(models.V10, cfg["sample_frames"] - 4)[0]
    before = {n: _patch_embed_output(tr, n, h, w) for n in (trained, shorter)}
    tr.patch_embed.pos_embedding.add_(1.0)             # change the learned table
    assert not torch.equal(_patch_embed_output(tr, trained, h, w), before[trained])   # used at the trained length
    assert torch.equal(_patch_embed_output(tr, shorter, h, w), before[shorter])       # not used below it
    assert models.positions_note(models.V10, cfg, cfg["sample_frames"] - 4) is not None
    assert models.positions_note(models.V10, cfg, cfg["sample_frames"]) is None


def test_run_below_trained_length_logs_once_and_notes_it(tiny_ckpts, caplog):
    image = Image.fromarray((np.random.RandomState(1).rand(64, 96, 3) * 255).astype(np.uint8))
    job = pipeline.Job(image=image, prompt="a boat", frames=5, steps=1, cfg=1.0, seed=1)
    with caplog.at_level(logging.WARNING):
        result = pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[K10]["hf"])), job, precision="fp32",
                                   device="cpu", profile="resident")
    said = [r.getMessage() for r in caplog.records if "sin-cos" in r.getMessage()]
    assert len(said) == 1 and "5 frames" in said[0]          # logged where it samples (the node path too)
    assert said[0] in result.notes                            # and in the CLI's closing notes


# ----------------------------------------------------------------------------- a start image cropped hard
@pytest.mark.parametrize("w,h,said", [
    (60, 100, "only the middle 40% of its height"),   # portrait into landscape: a strip
    (100, 100, None),                                 # square into 3:2 keeps 67 %: not worth a word
    (80, 60, None),                                   # 4:3 into 3:2
    (200, 50, "only the middle 38% of its width"),    # a panorama
])
def test_crop_note(w, h, said):
    note = vae_mod.crop_note(h, w, 64, 96, "crop")
    print(note)
    assert (note is None) if said is None else (said in note and "'pad'" in note and "\n" not in note)
    if note and h > w:
        assert "96x64 video (landscape)" in note and "make a 64x96 video" in note
    assert vae_mod.crop_note(h, w, 64, 96, "pad") is None and vae_mod.crop_note(h, w, 64, 96, "stretch") is None


def test_square_into_16_9_is_said():
    assert "56% of its height" in vae_mod.crop_note(1024, 1024, 768, 1360, "crop")


def test_prepare_image_says_the_crop(caplog):
    portrait = Image.new("RGB", (60, 100), (200, 10, 10))
    with caplog.at_level(logging.WARNING):
        x = vae_mod.prepare_image(portrait, 64, 96)
    assert x.shape == (1, 3, 64, 96)
    assert "60x100 start image (portrait) is cropped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        vae_mod.prepare_image(portrait, 64, 96, resize="pad")
        vae_mod.prepare_image(torch.rand(1, 64, 96, 3), 64, 96)
    assert caplog.text == ""
