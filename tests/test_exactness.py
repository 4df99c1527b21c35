"""Our stage-by-stage pipeline equals diffusers' CogVideoXImageToVideoPipeline (fp32, CPU).

Same weights (the tiny HF folder both load), same seed, same settings; frames in [0, 1] must
agree to BOUND. Covers both variants, both schedulers and both CFG modes. The bound is what is
measured, with 2x headroom: on CPU in fp32 (torch 2.13, diffusers 0.42.1) the max abs frame
differences were 1.6e-6 to 4.7e-6 over the 8 cases (largest: 5B/dpm/sequential), while a CFG of
6.1 instead of 6.0 gives 1.2e-3: the comparison can fail.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from cogvid_core.model import variants as models
from cogvid_core.run import pipeline

STEPS = 3
BOUND = 1e-5
_REFERENCES: dict = {}


def _start_image(w, h):
    rng = np.random.RandomState(7)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def _diffusers_frames(folder, scheduler, image, frames, h, w, seed, prompt, negative):
    key = (folder, scheduler, frames, h, w, seed, prompt, negative)
    if key not in _REFERENCES:
        _REFERENCES[key] = _run_diffusers(folder, scheduler, image, frames, h, w, seed, prompt, negative)
    return _REFERENCES[key]


def _run_diffusers(folder, scheduler, image, frames, h, w, seed, prompt, negative):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    cls = CogVideoXDPMScheduler if scheduler == "dpm" else CogVideoXDDIMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    out = pipe(image=image, prompt=prompt, negative_prompt=negative, height=h, width=w, num_frames=frames,
               num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=True,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").frames[0]
    return out.permute(0, 2, 3, 1)  # [T, C, H, W] -> [T, H, W, C]


def _max_diff(folder, variant_key, scheduler, cfg_mode, cfg=6.0):
    """Max abs frame difference of our pipeline (at `cfg`) from diffusers' (at 6.0)."""
    variant = models.VARIANTS[variant_key]
    frames, h, w = models.default_size(variant, models.transformer_config(variant, tiny=True))
    image = _start_image(w, h)
    prompt, negative = "a small boat drifts on a calm lake at dawn", "blurry"
    ref = _diffusers_frames(folder, scheduler, image, frames, h, w, 1234, prompt, negative)
    job = pipeline.Job(image=image, prompt=prompt, negative_prompt=negative, steps=STEPS, cfg=cfg,
                       scheduler=scheduler, seed=1234)
    ours = pipeline.generate(pipeline.Sources.from_model(folder), job, precision="fp32", device="cpu",
                             profile="resident" if cfg_mode == "batched" else "lowvram")
    assert ours.frames.shape == ref.shape == (frames, h, w, 3)
    assert ref.std() > 0.01, "reference video is flat: the comparison would prove nothing"
    return (ours.frames - ref).abs().max().item()


@pytest.mark.parametrize("variant_key", list(models.VARIANTS))
@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_matches_diffusers(tiny_ckpts, variant_key, scheduler):
    folder = str(tiny_ckpts[variant_key]["hf"])
    for cfg_mode in ("batched", "sequential"):
        diff = _max_diff(folder, variant_key, scheduler, cfg_mode)
        print(f"{variant_key}/{scheduler}/{cfg_mode}: max abs frame diff {diff:.2e}")
        assert diff <= BOUND, f"{variant_key}/{scheduler}/{cfg_mode}: max abs frame diff {diff}"


def test_the_bound_catches_a_wrong_cfg(tiny_ckpts):
    """The same comparison with CFG 6.1 on our side fails the bound: it would see a real change."""
    key = "cogvideox1.5-5b-i2v"
    diff = _max_diff(str(tiny_ckpts[key]["hf"]), key, "dpm", "batched", cfg=6.1)
    print(f"{key}/dpm/batched with cfg 6.1: max abs frame diff {diff:.2e}")
    assert diff > BOUND


def test_seed_changes_video(tiny_ckpts):
    folder = str(tiny_ckpts["cogvideox1.5-5b-i2v"]["hf"])
    image = _start_image(96, 64)
    runs = [pipeline.generate(pipeline.Sources.from_model(folder),
                              pipeline.Job(image=image, prompt="x", steps=2, seed=s), precision="fp32",
                              device="cpu", profile="resident").frames for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max() > 1e-3
