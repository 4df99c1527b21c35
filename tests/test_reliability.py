"""Reliability and safety: bad input gives one clear line, OOM says what to change, cancel and
errors leak nothing, repeated runs stay flat, a finished video is never lost, and the package
never runs pickles, eval/exec or the network on its own.

Everything runs on CPU with the tiny checkpoints; the memory checks use the same code path on
CUDA (`devmem.allocated_bytes`) when a GPU is there.
"""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_stub
from cogvid_core.device import devmem
from cogvid_core.run import guard
from cogvid_core.model import loading
from cogvid_core.run import pipeline
from cogvid_core.model import vae as vae_mod
from cogvid_core.cli import main as cli_main
from test_nodes import _encoded, _image, _load, load_pack, models_root, run  # noqa: F401  (fixture re-export)

REPO = Path(__file__).resolve().parents[1]
V10, V15 = "cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def start_png(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    yy, xx = np.mgrid[0:64, 0:96]
    rgb = np.stack([xx * 2.6, yy * 4, 128 + 0 * xx], -1).astype(np.uint8)
    paths = {"rgb": d / "rgb.png", "rgba": d / "rgba.png", "gray": d / "gray.png", "gray16": d / "gray16.png",
             "wide": d / "wide.png", "text": d / "not_an_image.png"}
    Image.fromarray(rgb).save(paths["rgb"])
    Image.fromarray(np.concatenate([rgb, (xx * 2.6).astype(np.uint8)[..., None]], -1), "RGBA").save(paths["rgba"])
    Image.fromarray(rgb[..., 0]).save(paths["gray"])
    Image.fromarray((xx * 600).astype(np.uint16)).save(paths["gray16"])
    Image.fromarray(np.zeros((40, 900, 3), np.uint8)).save(paths["wide"])
    paths["text"].write_text("hello")
    return paths


@pytest.fixture(scope="module")
def warm_device(tiny_ckpts, start_png):
    """On CUDA, one run per variant first: cuBLAS workspaces and the CUDA context are allocated
    by the first run ever and live for the process; "before" readings must already hold them."""
    if DEVICE == "cuda":
        for key in (V10, V15):
            for profile in ("resident", "lowvram"):
                pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[key]["hf"])),
                                  pipeline.Job(image=start_png["rgb"], prompt="warm", steps=1),
                                  precision="fp32", device=DEVICE, profile=profile)
    return DEVICE


@pytest.fixture
def comfy(models_root):  # noqa: F811
    mods = comfy_stub.install(str(models_root))
    nodes = load_pack(f"cogvid_rel_{os.getpid()}_{id(mods)}")
    yield nodes, mods
    comfy_stub.uninstall()


def cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main([str(a) for a in argv])
    _out, err = capsys.readouterr()
    return code, err


def i2v_args(tiny_ckpts, start_png, tmp_path, *extra, key=V15):
    return ["i2v", "--model", tiny_ckpts[key]["hf"], "--image", start_png["rgb"], "--prompt", "a fox",
            "--steps", "1", "--device", "cpu", "--precision", "fp32", "--cfg", "1",
            "--out", tmp_path / "out.mp4", *extra]


def assert_user_error(code, err, *patterns):
    """Exit code 2, exactly one `error: ...` line, last on stderr, no traceback, naming the problem."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for p in patterns:
        assert re.search(p, errors[0], re.I), f"{p!r} not in {errors[0]!r}"
    return errors[0]


def node_error(exc_info, *patterns):
    msg = str(exc_info.value)
    assert "\n" not in msg.strip(), msg
    for p in patterns:
        assert re.search(p, msg, re.I), f"{p!r} not in {msg!r}"


def _variant_copy(tiny_ckpts, tmp_path, **config_changes) -> Path:
    """A copy of the 1.0 hub folder whose transformer config says something else (T2V, 2B)."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_ckpts[V10]["hf"], dst)
    cfg_path = dst / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config_changes)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def _fake_checkpoint(path: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


SD_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
           "first_stage_model.encoder.down.0.block.0.conv1.weight"]
FLUX_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]


# ------------------------------------------------------------------------------- 1. bad input: CLI
def test_cli_wrong_component_files(tiny_ckpts, start_png, tmp_path, capsys):
    single = tiny_ckpts[V10]["single"]
    sd = _fake_checkpoint(tmp_path / "sd15.safetensors", SD_KEYS)
    flux = _fake_checkpoint(tmp_path / "flux1-dev.safetensors", FLUX_KEYS)
    for path, what in ((single["text_encoder"], "T5"), (single["vae"], "VAE"), (sd, "Stable Diffusion"),
                       (flux, "Flux")):
        code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--transformer", path))
        assert_user_error(code, err, what, "not a CogVideoX transformer")
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--vae", single["text_encoder"]))
    assert_user_error(code, err, "T5", "VAE")
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--text-encoder", single["transformer"],
                                      "--tokenizer", single["tokenizer"]))
    assert_user_error(code, err, "transformer", "T5")


def test_cli_t2v_and_2b_models_refused(tiny_ckpts, start_png, tmp_path, capsys):
    t2v = _variant_copy(tiny_ckpts, tmp_path, in_channels=16)
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--transformer", t2v))
    assert_user_error(code, err, "text-to-video", "I2V")
    shutil.rmtree(t2v)
    two_b = _variant_copy(tiny_ckpts, tmp_path, use_rotary_positional_embeddings=False)
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--transformer", two_b))
    assert_user_error(code, err, "2B", "5B I2V")


def test_cli_truncated_and_corrupt_safetensors(tiny_ckpts, start_png, tmp_path, capsys):
    src = tiny_ckpts[V15]["single"]["transformer"]
    data = src.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 8 + data[8:200])
    for bad in (truncated, corrupt):
        code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--transformer", bad))
        assert_user_error(code, err, bad.name, "truncated or corrupt", "download it again")
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04K\x01.")
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--transformer", pickle_file))
    assert_user_error(code, err, "pickle", "safetensors")


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network is unreachable (blocked by the test)")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


def _with(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_cli_unknown_repo_or_no_network(tiny_ckpts, start_png, tmp_path, capsys, no_network):
    args = i2v_args(tiny_ckpts, start_png, tmp_path, "--cache-dir", tmp_path / "hub")
    code, err = cli(capsys, *_with(args, "--model", "nobody-xyz/not-a-cogvideox-repo"))
    assert_user_error(code, err, "not-a-cogvideox-repo", "network|repo id")
    code, err = cli(capsys, *_with(args, "--model", "not a repo at all"))
    assert_user_error(code, err, "not a repo at all")


def test_cli_frames_and_size_the_variant_cannot_take(tiny_ckpts, start_png, tmp_path, capsys):
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--frames", "10"))
    assert_user_error(code, err, r"16N\+1", "try 17")
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--width", "100"))
    assert_user_error(code, err, "multiple of 16", "try 96")
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--width", "128", key=V10))
    assert_user_error(code, err, "only generates")
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--steps", "0"))
    assert_user_error(code, err, "steps")


def test_cli_images(tiny_ckpts, start_png, tmp_path, capsys):
    args = i2v_args(tiny_ckpts, start_png, tmp_path)
    img_at = args.index("--image") + 1
    for bad, pattern in (("wide", "aspect ratio"), ("text", "not an image"), ("missing", "not found")):
        a = list(args)
        a[img_at] = start_png.get(bad, tmp_path / "missing.png")
        code, err = cli(capsys, *a)
        assert_user_error(code, err, pattern)
    # alpha, grayscale and 16-bit are converted (white behind transparency, gray to RGB, 16 -> 8 bits)
    for kind in ("rgba", "gray", "gray16"):
        with Image.open(start_png[kind]) as im:
            x = vae_mod.prepare_image(im, 64, 96)
        assert x.shape == (1, 3, 64, 96) and torch.isfinite(x).all() and -1 <= x.min() <= x.max() <= 1
    with Image.open(start_png["gray16"]) as im:
        assert vae_mod.prepare_image(im, 64, 96).max() > 0.5          # not clipped to white, not black


def test_cli_fp16_with_15_refused_before_loading(tiny_ckpts, start_png, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "load_text_encoder", lambda *a, **k: pytest.fail("loaded a model"))
    args = i2v_args(tiny_ckpts, start_png, tmp_path)
    args[args.index("--precision") + 1] = "fp16"
    code, err = cli(capsys, *args)
    assert_user_error(code, err, "fp16", "use bf16")


def test_cli_alpha_image_empty_and_long_prompt_run(tiny_ckpts, start_png, tmp_path, capsys, caplog):
    args = i2v_args(tiny_ckpts, start_png, tmp_path, "--width", "32", "--height", "32")
    args[args.index("--image") + 1] = start_png["rgba"]
    args[args.index("--prompt") + 1] = " ".join(["a very long prompt about a red fox"] * 60)
    code, err = cli(capsys, *args)
    assert code == 0, err
    assert "note: prompt truncated at 226 tokens" in err
    assert (tmp_path / "out.mp4").stat().st_size > 0
    args[args.index("--prompt") + 1] = ""
    args[args.index("--image") + 1] = start_png["gray16"]
    with caplog.at_level("WARNING"):
        code, err = cli(capsys, *args)
    assert code == 0, err
    assert "prompt is empty" in caplog.text


# ------------------------------------------------------------------------------- 1. bad input: nodes
def test_nodes_bad_input(comfy, models_root, tiny_ckpts):  # noqa: F811
    nodes, _ = comfy
    kw = dict(precision="fp32", placement="auto", device="auto")
    dm = models_root / "models" / "diffusion_models"
    extra = [shutil.copy(tiny_ckpts[V10]["single"]["text_encoder"], dm / "zz_t5_as_transformer.safetensors"),
             _fake_checkpoint(dm / "zz_sd15.safetensors", SD_KEYS),
             _fake_checkpoint(dm / "zz_flux.safetensors", FLUX_KEYS)]
    trunc = dm / "zz_truncated.safetensors"
    data = tiny_ckpts[V15]["single"]["transformer"].read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    extra.append(trunc)
    try:
        for name, what in (("zz_t5_as_transformer", "T5"), ("zz_sd15", "Stable Diffusion"), ("zz_flux", "Flux"),
                           ("zz_truncated", "truncated or corrupt")):
            with pytest.raises(ValueError) as e:
                run(nodes["CogVidTransformerLoader"], model=f"diffusion_models/{name}.safetensors", **kw)
            node_error(e, what)
    finally:
        for p in extra:
            Path(p).unlink()
    # names that escape the models folders are refused before any file is touched, for every loader
    for loader in ("CogVidTransformerLoader", "CogVidT5Loader", "CogVidVAELoader"):
        for bad in ("../../../etc/passwd", "CogVideo/../../secret", "/etc/passwd", "vae/../../x.safetensors"):
            with pytest.raises(ValueError) as e:
                run(nodes[loader], model=bad, **kw)
            node_error(e, "not in the list")

    tr, t5, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    cond = run(nodes["CogVidTextEncode"], t5=t5, positive="", negative="")[0]          # empty prompt: works
    long = run(nodes["CogVidTextEncode"], t5=t5, positive="a red fox jumps " * 200, negative="")[0]
    assert long["positive"].truncated and long["positive"].embeds.shape[1] == 226
    enc = dict(vae=vae, width=96, height=64, resize="crop")
    rgba = torch.cat([_image(), torch.rand(1, 70, 110, 1)], -1)
    gray = _image()[..., :1]
    for img in (rgba, gray):
        lat = run(nodes["CogVidImageEncode"], image=img, **enc)[0]
        assert torch.isfinite(lat.mean).all()
    with pytest.raises(ValueError) as e:
        run(nodes["CogVidImageEncode"], image=torch.rand(1, 10, 300, 3), **enc)
    node_error(e, "aspect ratio")
    with pytest.raises(ValueError) as e:
        run(nodes["CogVidImageEncode"], image=torch.rand(1, 64, 96, 2), **enc)
    node_error(e, "channels")
    samp = dict(transformer=tr, conditioning=cond, image_latent=lat, steps=1, cfg=1.0, dynamic_cfg=False,
                scheduler="ddim", seed=0)
    with pytest.raises(ValueError) as e:
        run(nodes["CogVidSampler"], frames=21, **samp)
    node_error(e, r"16N\+1", "try 17")

    # a VAE tile larger than the frame: decoded untiled, same frames as tile off
    latent = run(nodes["CogVidSampler"], frames=17, **samp)[0]
    big, _ = run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="480x320", overlap=0.1667).args[:2]
    off, _ = run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="off", overlap=0.0).args[:2]
    assert torch.equal(big, off)


def test_nan_stops_sampling_at_once_with_use_bf16(comfy, monkeypatch):
    """fp16 with 1.5 overflows: the first NaN step stops the run (never a black video after 50 steps)."""
    nodes, _ = comfy
    tr, t5, vae, cond, lat = _encoded(nodes)
    calls = []
    real = type(tr.module).forward

    def nan_forward(self, *a, **k):
        calls.append(1)
        out = real(self, *a, **k)
        return (out[0] * float("nan"),) if isinstance(out, tuple) else out
    monkeypatch.setattr(type(tr.module), "forward", nan_forward)
    with pytest.raises(FloatingPointError) as e:
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=5,
            cfg=1.0, dynamic_cfg=False, scheduler="dpm", seed=0)
    node_error(e, "NaN", "step 1/5", "use bf16")
    assert len(calls) == 1


# ------------------------------------------------------------------------------- 2. out of memory
def _raise_oom(*a, **k):
    raise torch.OutOfMemoryError(OOM)


def test_oom_in_sampling_names_stage_need_and_setting(tiny_ckpts, start_png, tmp_path, capsys, monkeypatch):
    from diffusers import CogVideoXTransformer3DModel
    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", _raise_oom)
    code, err = cli(capsys, *i2v_args(tiny_ckpts, start_png, tmp_path, "--profile", "balanced"))
    line = assert_user_error(code, err, "out of GPU memory in denoise step", r"needs ~\d+\.\d\d GiB \(estimate, profile "
                             "balanced\\)", "lowvram", "fewer frames", "Tried to allocate 2.00 GiB")
    assert isinstance(guard.StageOOM("x", "decode"), torch.OutOfMemoryError)   # ComfyUI still sees an OOM
    assert line


def test_oom_message_reports_free_memory(monkeypatch):
    monkeypatch.setattr(guard, "device_free_bytes", lambda device: 3 * 1024 ** 3)
    info = guard.RunInfo(variant=V15, frames=81, height=768, width=1360, profile="lowvram", device="cuda")
    msg, need, free = guard.oom_message("text_encode", info, OOM)
    assert "text encode" in msg and "3.00 GiB free" in msg and "stream" in msg and need > 0
    with pytest.raises(guard.StageOOM) as e:
        with guard.oom_guard("denoise_step", info):
            big = torch.zeros(1000)        # noqa: F841  (a tensor of the failed stage)
            raise torch.OutOfMemoryError(OOM)
    assert e.value.stage == "denoise_step" and e.value.free == 3 * 1024 ** 3
    assert e.value.needed == guard.stage_need("denoise_step", info) and e.value.needed > 0
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_oom_while_the_sampler_places_the_transformer_leaves_nothing_and_the_next_queue_runs(comfy, monkeypatch):
    """H100 fault run (session 15): the 24gb workflow's resident transformer ran out of memory while it was
    being read onto an 8 GB card; the 7.2 GiB already read stayed on the GPU with nothing owning them, and
    the next queue (the 12gb workflow) failed for want of memory. Now the failed read puts every weight
    back to its placeholder before the error reaches the user, and the next queue samples."""
    from cogvid_core.memory import filestream
    nodes, _ = comfy
    tr, _t5, _vae, cond, lat = _encoded(nodes)
    real, reads = filestream._assign, []

    def failing(model, name, t):
        if model is tr.module:
            reads.append(name)
            if len(reads) == 30:
                raise torch.OutOfMemoryError(OOM)
        return real(model, name, t)
    monkeypatch.setattr(filestream, "_assign", failing)
    kw = dict(transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=1, cfg=1.0, dynamic_cfg=False,
              scheduler="dpm", seed=0)
    with pytest.raises(guard.StageOOM) as e:
        run(nodes["CogVidSampler"], **kw)
    node_error(e, "out of GPU memory in denoise step", "GiB")
    assert len(reads) >= 30 and all(t.is_meta for t in tr.module.parameters())
    assert guard.leftovers(tr.module) == []
    monkeypatch.setattr(filestream, "_assign", real)
    latent = run(nodes["CogVidSampler"], **kw)[0]
    assert torch.isfinite(latent.samples).all()


def test_decode_retries_smaller_tiles_then_fails_keeping_latents(comfy, monkeypatch):
    nodes, _ = comfy
    tr, t5, vae, cond, lat = _encoded(nodes)
    latent = run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=1,
                 cfg=1.0, dynamic_cfg=False, scheduler="dpm", seed=0)[0]
    real = vae_mod.decode
    tiles = []

    def picky(v, latents, device=None, tile=None, **kw):
        tiles.append(None if tile is None else (tile.width, tile.height))
        if tile is None or tile.height > 64:
            raise torch.OutOfMemoryError(OOM)
        return real(v, latents, device=device, tile=tile, **kw)
    monkeypatch.setattr(vae_mod, "decode", picky)
    images, fps = run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="off", overlap=0.1667).args[:2]
    assert tiles == [None, (360, 240), (176, 120), (88, 64)]
    assert images.shape == (17, 64, 96, 3)

    monkeypatch.setattr(vae_mod, "decode", lambda *a, **k: _raise_oom())
    with pytest.raises(guard.StageOOM) as e:
        run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="360x240", overlap=0.1667)
    node_error(e, "out of GPU memory in decode", "GiB", "tiles tried: 360x240, 176x120, 88x64, 64x64",
               "smaller VAE tile")
    assert e.value.latents is latent
    assert guard.leftovers(vae.module.decoder) == []          # no hooks left behind
    monkeypatch.setattr(vae_mod, "decode", real)               # re-decode, no re-sampling
    again, _ = run(nodes["CogVidDecode"], vae=vae, latent=e.value.latents, tile="off", overlap=0.0).args[:2]
    assert again.shape == (17, 64, 96, 3)


def test_oom_in_text_and_image_encode_nodes(comfy, monkeypatch):
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5EncoderModel
    nodes, _ = comfy
    _, t5, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    monkeypatch.setattr(T5EncoderModel, "forward", _raise_oom)
    with pytest.raises(guard.StageOOM) as e:
        run(nodes["CogVidTextEncode"], t5=t5, positive="an oom prompt", negative="never cached")
    node_error(e, "out of GPU memory in text encode", "stream")
    monkeypatch.setattr(AutoencoderKLCogVideoX, "encode", _raise_oom)
    with pytest.raises(guard.StageOOM) as e:
        run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=96, height=64, resize="crop")
    node_error(e, "out of GPU memory in image encode", "GiB", "smaller video size")
    assert guard.leftovers(vae.module.decoder) == []


def test_pipeline_decode_failure_keeps_latents(tiny_ckpts, start_png, monkeypatch):
    monkeypatch.setattr(vae_mod, "decode", lambda *a, **k: _raise_oom())
    job = pipeline.Job(image=start_png["rgb"], prompt="x", steps=1, cfg=1.0, height=32, width=32)
    with pytest.raises(guard.StageOOM) as e:
        pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[V15]["hf"])), job, precision="fp32",
                          device="cpu", profile="balanced")
    assert e.value.stage == "decode" and e.value.latents.samples.shape[1] >= 5


class Interrupted(BaseException):
    """Like ComfyUI 2026's InterruptProcessingException: not an Exception."""


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_pipeline_interrupt_in_decode_keeps_latents_and_cleans_up(error, tiny_ckpts, start_png, monkeypatch):
    def decode(*a, **k):
        raise error("stop")
    monkeypatch.setattr(vae_mod, "decode", decode)
    loaded = _spy_loads(monkeypatch)
    job = pipeline.Job(image=start_png["rgb"], prompt="x", steps=1, cfg=1.0, height=32, width=32)
    with pytest.raises(error) as e:     # re-raised as it came, never swallowed
        pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[V15]["hf"])), job, precision="fp32",
                          device="cpu", profile="balanced")
    assert e.value.latents.samples.shape[1] >= 5
    assert loaded and guard.leftovers(*[r() for r in loaded]) == []


def test_a_bug_is_not_turned_into_a_user_error(comfy, tiny_ckpts, start_png, monkeypatch):
    """A TypeError inside a stage reaches the caller as itself, with the traceback of where it
    happened: the pipeline and the nodes never dress a bug up as a one-line user error."""
    from diffusers import CogVideoXTransformer3DModel

    def buggy(self, *a, **k):
        raise TypeError("a bug")
    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", buggy)
    job = pipeline.Job(image=start_png["rgb"], prompt="x", steps=1, cfg=1.0, height=32, width=32)
    with pytest.raises(TypeError, match="^a bug$") as e:
        pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[V15]["hf"])), job, precision="fp32",
                          device="cpu", profile="lowvram")
    assert type(e.value) is TypeError and e.traceback[-1].name == "buggy"
    nodes, _ = comfy
    tr, t5, vae, cond, lat = _encoded(nodes)
    with pytest.raises(TypeError, match="^a bug$") as e:
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=1,
            cfg=1.0, dynamic_cfg=False, scheduler="dpm", seed=0)
    assert type(e.value) is TypeError and e.traceback[-1].name == "buggy"


# ------------------------------------------------------------------------------- 3. cancel
class Cancelled(Exception):
    pass


def _spy_loads(monkeypatch):
    """Record every module the pipeline loads (weakly: the test checks nothing keeps them alive)."""
    loaded = []
    for name in ("load_transformer", "load_vae", "load_text_encoder"):
        real = getattr(loading, name)

        def spy(*a, _real=real, **k):
            out = _real(*a, **k)
            loaded.append(weakref.ref(out[0] if isinstance(out, tuple) else out))
            return out
        monkeypatch.setattr(loading, name, spy)
    return loaded


@pytest.mark.parametrize("stage", ["text_encode", "denoise", "decode"])
def test_cancel_stops_within_one_step_and_leaks_nothing(stage, tiny_ckpts, start_png, monkeypatch, warm_device):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5EncoderModel
    target = {"text_encode": T5EncoderModel, "denoise": CogVideoXTransformer3DModel,
              "decode": AutoencoderKLCogVideoX}[stage]
    calls = {"n": 0}
    real = target.forward

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)
    if stage == "decode":    # count decoder calls (each is one temporal chunk of one tile)
        from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXDecoder3D
        real = CogVideoXDecoder3D.forward
        monkeypatch.setattr(CogVideoXDecoder3D, "forward", counting)
    else:
        monkeypatch.setattr(target, "forward", counting)

    def interrupt():
        if calls["n"] >= 1:
            raise Cancelled(stage)
    loaded = _spy_loads(monkeypatch)
    before = devmem.allocated_bytes(DEVICE)
    job = pipeline.Job(image=start_png["rgb"], prompt="a fox", negative_prompt="blur", steps=4, cfg=6.0,
                       height=32, width=48)
    with pytest.raises(Cancelled) as e:
        pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[V15]["hf"])), job, precision="fp32",
                          device=DEVICE, profile="lowvram", interrupt=interrupt)
    # stopped at the next check: within one step (sequential CFG: its two branches) / one decode chunk
    assert calls["n"] <= (2 if stage == "denoise" else 1)
    assert loaded and guard.leftovers(*[r() for r in loaded]) == []   # nothing placed, no hooks, no device weights
    del e
    gc.collect()
    assert [r() for r in loaded if r() is not None] == []      # the run keeps no model alive
    assert devmem.allocated_bytes(DEVICE) == before


def test_node_cancel_during_decode_removes_hooks(comfy):
    nodes, mods = comfy
    mm = mods["comfy.model_management"]
    tr, t5, vae, cond, lat = _encoded(nodes)
    latent = run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=1,
                 cfg=1.0, dynamic_cfg=False, scheduler="dpm", seed=0)[0]
    before = devmem.allocated_bytes(vae.device)
    mm.interrupt_processing = True
    with pytest.raises(comfy_stub.InterruptProcessingException):
        run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="auto", overlap=0.1667)
    assert not vae.module.decoder._forward_hooks and not vae.module.decoder._forward_pre_hooks
    for comp in (tr, t5, vae):
        comp.release()
    assert guard.leftovers(tr.module, t5.module, vae.module) == []
    assert devmem.allocated_bytes(vae.device) == before


def test_node_cancel_during_text_encode_stops_before_second_prompt(comfy, monkeypatch):
    from transformers import T5EncoderModel
    nodes, mods = comfy
    mm = mods["comfy.model_management"]
    tr, t5, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    calls = {"n": 0}
    real = T5EncoderModel.forward

    def pressed_cancel(self, *a, **k):     # Cancel pressed while the first prompt is encoded
        calls["n"] += 1
        mm.interrupt_processing = True
        return real(self, *a, **k)
    monkeypatch.setattr(T5EncoderModel, "forward", pressed_cancel)
    before = devmem.allocated_bytes(t5.device)
    with pytest.raises(comfy_stub.InterruptProcessingException):
        run(nodes["CogVidTextEncode"], t5=t5, positive="a cat never cached", negative="a dog never cached")
    assert calls["n"] == 1
    for comp in (tr, t5, vae):
        comp.release()
    assert guard.leftovers(tr.module, t5.module, vae.module) == []
    assert devmem.allocated_bytes(t5.device) == before


def test_each_model_is_freed_when_its_stage_ends(tiny_ckpts, start_png, monkeypatch):
    """T5 is gone from RAM before the transformer loads, the transformer before the decode: at full
    size T5 alone is 9.5 GB of (pinned) host memory, and the run must not hold it to the end."""
    loaded = _spy_loads(monkeypatch)     # [t5, vae, transformer] in load order
    alive_at = {}
    real_tr, real_decode = loading.load_transformer, guard.decode

    def load_transformer(*a, **k):
        alive_at["transformer load"] = [type(r()).__name__ for r in loaded if r() is not None]
        return real_tr(*a, **k)

    def decode(*a, **k):
        alive_at["decode"] = [type(r()).__name__ for r in loaded if r() is not None]
        return real_decode(*a, **k)
    monkeypatch.setattr(loading, "load_transformer", load_transformer)
    monkeypatch.setattr(guard, "decode", decode)
    job = pipeline.Job(image=start_png["rgb"], prompt="a fox", negative_prompt="blur", steps=1, height=32, width=48)
    pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[V15]["hf"])), job, precision="fp32",
                      device=DEVICE, profile="lowvram")
    assert alive_at == {"transformer load": ["AutoencoderKLCogVideoX"], "decode": ["AutoencoderKLCogVideoX"]}


# ------------------------------------------------------------------------------- 4. soak
def test_soak_20_runs_stay_flat(tiny_ckpts, start_png, warm_device):
    runs = [(V10, None, None), (V15, 32, 32), (V15, 32, 48), (V15, 48, 32), (V15, 32, 32)]
    profiles = ["resident", "balanced", "lowvram"]
    rss, gpu, pinned = [], [], []
    base_gpu = devmem.allocated_bytes(DEVICE)
    for i in range(20):
        key, h, w = runs[i % len(runs)]
        job = pipeline.Job(image=start_png["rgb"], prompt=f"run {i % 3}", height=h, width=w, steps=1,
                           cfg=6.0 if i % 2 else 1.0, seed=i)
        res = pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[key]["hf"])), job, precision="fp32",
                                device=DEVICE, profile=profiles[i % len(profiles)])
        assert torch.isfinite(res.frames).all()
        del res
        gc.collect()
        rss.append(devmem.host_rss_bytes())
        gpu.append(devmem.allocated_bytes(DEVICE))
        # torch's pinned allocator by allocated_bytes (active_bytes drifts in torch 2.11: bench_reliability)
        pinned.append(devmem.pinned_host_bytes())
    mib = [r / 2 ** 20 for r in rss]
    # after warm-up (allocator pools filled by every variant/size/profile once), no upward trend
    assert max(rss[-5:]) <= max(rss[4:8]) + 64 * 2 ** 20, f"RSS grows over the runs (MiB): {mib}"
    assert all(g == base_gpu for g in gpu), gpu
    assert max(pinned[-5:]) <= max(pinned[4:8]) + 64 * 2 ** 20, f"pinned host memory grows: {pinned}"


# ------------------------------------------------------------------------------- 5. never lose a video
def test_save_is_atomic(comfy, monkeypatch):
    nodes, mods = comfy
    import imageio_ffmpeg
    out_dir = Path(mods["folder_paths"].get_output_directory())
    real = imageio_ffmpeg.write_frames

    class Failing:            # the ffmpeg writer, failing at the third frame (disk full, killed, ...)
        def __init__(self, path, *a, **k):
            self.gen, self.n = real(path, *a, **k), 0

        def send(self, frame):
            if frame is not None:
                self.n += 1
                if self.n > 2:
                    raise OSError("disk full")
            return self.gen.send(frame)

        def close(self):
            self.gen.close()

    failing = Failing
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", failing)
    images = torch.rand(9, 64, 96, 3)
    with pytest.raises(OSError, match="disk full"):
        run(nodes["CogVidSaveVideo"], images=images, fps=8.0, filename_prefix="rel/fail")
    assert not [p for p in out_dir.rglob("*") if p.is_file() and "fail" in p.name]   # no half file, no temp
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", real)
    out = run(nodes["CogVidSaveVideo"], images=images, fps=8.0, filename_prefix="rel/ok")
    saved = out.ui.as_dict()["images"][0]
    assert (out_dir / saved["subfolder"] / saved["filename"]).stat().st_size > 0
    assert not list(out_dir.rglob(".*partial*"))


# ------------------------------------------------------------------------------- 6. safety
def _package_sources():
    files = [REPO / "__init__.py", *sorted((REPO / "cogvid_core").glob("*.py")), *sorted((REPO / "nodes").glob("*.py"))]
    return {p: p.read_text() for p in files}


def _code_only(src: str) -> str:
    """Source without comments and string literals (messages may talk about pickle)."""
    import io
    import tokenize
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            out.append(tok.string)
    return " ".join(out)


def test_no_pickle_eval_exec_subprocess_or_pip():
    bad = {
        "eval(": re.compile(r"(?:^|[^.]) eval \("), "exec(": re.compile(r"(?:^|[^.]) exec \("),
        "pickle": re.compile(r"\bpickle\b|\bdill\b|\bjoblib\b"),
        "torch.load without weights_only": re.compile(r"torch \. load \((?![^)]*weights_only = True)"),
        "subprocess/os.system": re.compile(r"\bsubprocess\b|\bos \. system\b|\bos \. popen\b"),
        "pip": re.compile(r"\bpip\b|ensurepip"), "trust_remote_code=True": re.compile(r"trust_remote_code = True"),
        "use_safetensors=False": re.compile(r"use_safetensors = False"),
    }
    found = []
    for path, src in _package_sources().items():
        code = _code_only(src)
        for what, rx in bad.items():
            if rx.search(code):
                found.append(f"{path.relative_to(REPO)}: {what}")
    assert found == []


def test_import_is_light_and_offline(models_root):  # noqa: F811
    """Importing the pack (root __init__ and nodes) and listing its nodes opens no socket; the
    root and nodes imports pull in no diffusers/transformers/huggingface_hub."""
    script = f"""
import asyncio, importlib.util, socket, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
def refuse(*a, **k):
    raise SystemExit("network access at import: " + repr(a))
socket.socket.connect = refuse
socket.create_connection = refuse
import comfy_stub
comfy_stub.install({str(models_root)!r})
heavy = ("diffusers", "transformers", "huggingface_hub", "cogvid_core.model.loading")
spec = importlib.util.spec_from_file_location("pack", {str(REPO / '__init__.py')!r},
                                              submodule_search_locations=[{str(REPO)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules["pack"] = mod; spec.loader.exec_module(mod)
import pack.nodes
after_import = [h for h in heavy if h in sys.modules]
ext = asyncio.run(mod.comfy_entrypoint())
nodes = asyncio.run(ext.get_node_list())
for n in nodes:
    n.GET_SCHEMA()
print("HEAVY", after_import, len(nodes))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO), env={**os.environ, "HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY [] 10" in proc.stdout, proc.stdout    # all 10 nodes listed, nothing heavy imported


def test_hub_download_only_named_repo_into_models_folder(comfy, models_root, tiny_ckpts, monkeypatch):  # noqa: F811
    import huggingface_hub
    nodes, mods = comfy
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, local_dir=None, cache_dir=None, **kw):
        calls.append((repo_id, tuple(allow_patterns or ()), local_dir))
        for pat in allow_patterns:
            sub = pat.split("/")[0]
            if not (Path(local_dir) / sub).exists():
                shutil.copytree(tiny_ckpts[V15]["hf"] / sub, Path(local_dir) / sub)
        return local_dir
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    tr = run(nodes["CogVidTransformerLoader"], model="THUDM/CogVideoX1.5-5B-I2V", precision="fp32",
             placement="auto", device="auto")[0]
    assert tr.variant.key == V15
    root = (models_root / "models" / "CogVideo").resolve()
    assert calls and all(r == "THUDM/CogVideoX1.5-5B-I2V" and p == ("transformer/*",) and
                         Path(d).resolve().is_relative_to(root) for r, p, d in calls)
