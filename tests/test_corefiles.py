"""ComfyUI core's own CogVideoX files (comfy/ldm/cogvideo, 2026; Comfy-Org's repackaged
diffusion_models/ and vae/ files): recognised by structure, the same weights and frames as the hub
layout, streamed from the file; what core writes that this pack does not read is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cogvid_core.memory import placement as P
from cogvid_core.model import checkpoints as C
from cogvid_core.model import corelayout
from cogvid_core.model import loading as L
from cogvid_core.model import testing as T
from cogvid_core.model import variants as M
from cogvid_core.model.variants import CheckpointError
from cogvid_core.run import pipeline

KEYS = list(M.VARIANTS)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """Core's layout of the same random weights as ``tiny_ckpts`` (same seed, dtype and shapes)."""
    root = tmp_path_factory.mktemp("comfy")
    return {key: T.write_checkpoints(root, key, tiny=True, dtype=torch.float32, layouts=("comfy",))["comfy"]
            for key in KEYS}


def _loaded(source, **kw):
    """The transformer as the loader gives it (file-backed), placed on the host: weights read from the file."""
    model, variant = L.load_transformer(source, dtype=torch.float32, progress=False, **kw)
    P.place(model, "cpu", "resident")
    return model, variant


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- the names
def test_rename_is_one_to_one_and_reversible():
    from cogvid_core.model.testing import tensor_shapes

    for v in M.VARIANTS.values():
        names = list(tensor_shapes("transformer", v, tiny=True))
        core = [corelayout.to_core(n) for n in names]
        assert len(set(core)) == len(names) and not any(n.startswith("transformer_blocks.") for n in core)
        assert [corelayout.to_diffusers(n) for n in core] == names
        assert corelayout.is_core(core) and not corelayout.is_core(names)
    assert corelayout.to_diffusers("blocks.3.attn_out.scale_weight") == \
        "transformer_blocks.3.attn1.to_out.0.scale_weight"
    assert not corelayout.is_core(["blocks.0.norm1.linear.weight", "blocks.0.self_attn.q.weight"])  # a Wan-like file


# ----------------------------------------------------------------------------- recognised, same weights
@pytest.mark.parametrize("key", KEYS)
def test_transformer_files_load_as_the_hub_folder(tiny_ckpts, comfy, key):
    label = f"CogVideoX transformer ({M.VARIANTS[key].version} I2V)"
    ref, _ = _loaded(tiny_ckpts[key]["hf"])
    for name in ("transformer", "transformer_prefixed"):
        path = comfy[key][name]
        assert C.identify(path) == label
        model, variant = _loaded(path)
        assert variant.key == key
        assert {k: model.config[k] for k in M.transformer_config(variant, tiny=True)} == \
               {k: ref.config[k] for k in M.transformer_config(variant, tiny=True)}
        _equal(ref, model)
        eager, _ = L.load_transformer(path, dtype=torch.float32, file_backed=False)
        _equal(ref, eager)


@pytest.mark.parametrize("key", KEYS)
def test_scaled_fp8_in_core_names(tiny_ckpts, comfy, key):
    path = comfy[key]["transformer_fp8_scaled"]
    assert C.identify(path).endswith("I2V) (fp8 scaled)")
    lazy, variant = _loaded(path)
    eager, _ = L.load_transformer(path, dtype=torch.float32, file_backed=False)
    ref, _ = _loaded(tiny_ckpts[key]["hf"])
    assert variant.key == key
    _equal(eager, lazy)                                   # streamed and eager dequantise alike
    a, b = ref.transformer_blocks[0].ff.net[2].weight, lazy.transformer_blocks[0].ff.net[2].weight
    assert not torch.equal(a, b) and (a - b).abs().max() <= 0.07 * a.abs().max()   # fp8 rounding only
    assert torch.equal(ref.proj_out.weight, lazy.proj_out.weight)                    # not an fp8 layer


@pytest.mark.parametrize("key", KEYS)
def test_vae_file(tiny_ckpts, comfy, key):
    assert C.identify(comfy[key]["vae"]) == "CogVideoX VAE"
    _equal(L.load_vae(tiny_ckpts[key]["hf"], dtype=torch.float32), L.load_vae(comfy[key]["vae"], dtype=torch.float32))


def test_streamed_from_the_core_file_computes_the_same(tiny_ckpts, comfy):
    from test_placement import _inputs, _run

    ref, _ = L.load_transformer(tiny_ckpts[M.V15.key]["hf"], dtype=torch.float32, file_backed=False)
    kw = _inputs(ref, M.V15)
    want = _run(ref, kw)
    lazy, _ = L.load_transformer(comfy[M.V15.key]["transformer"], dtype=torch.float32, progress=False)
    placed = P.place(lazy, "cpu", "stream", degrade_on_cpu=False)      # the small-card profile's path
    assert placed.mode == "stream"
    with placed.use():
        assert torch.equal(_run(lazy, kw), want)
    placed.release()
    assert all(t.is_meta for t in lazy.parameters())


@pytest.mark.parametrize("key", KEYS)
def test_same_frames_as_the_hub_folder(tiny_ckpts, comfy, key):
    hf = tiny_ckpts[key]["hf"]
    image = Image.fromarray((np.random.RandomState(7).rand(64, 96, 3) * 255).astype(np.uint8))
    job = pipeline.Job(image=image, prompt="a boat on a lake", negative_prompt="blurry", steps=2, seed=11)
    ours = pipeline.Sources(transformer=str(comfy[key]["transformer"]), vae=str(comfy[key]["vae"]),
                            text_encoder=str(hf), tokenizer=str(hf / "tokenizer"), scheduler=str(hf))
    runs = [pipeline.generate(s, job, precision="fp32", device="cpu", profile="lowvram").frames
            for s in (pipeline.Sources.from_model(str(hf)), ours)]
    assert torch.isfinite(runs[0]).all() and torch.equal(*runs)


# ----------------------------------------------------------------------------- wrong or unread files
def test_wrong_loader_still_says_what_the_file_is(tiny_ckpts, comfy):
    c, s = comfy[M.V15.key], tiny_ckpts[M.V15.key]["single"]
    with pytest.raises(CheckpointError, match=r"is a CogVideoX VAE, not a CogVideoX transformer: pick it in the VAE"):
        L.load_transformer(c["vae"])
    with pytest.raises(CheckpointError, match=r"is a CogVideoX transformer \(1.5 I2V\), not a CogVideoX VAE: "
                                              r"pick it in the CogVideoX transformer loader"):
        L.load_vae(c["transformer"])
    with pytest.raises(CheckpointError, match=r"is a CogVideoX transformer \(1.5 I2V\), not a T5 text encoder"):
        L.load_text_encoder(c["transformer_prefixed"])
    with pytest.raises(CheckpointError, match=r"is a T5 text encoder, not a CogVideoX transformer"):
        L.load_transformer(s["text_encoder"])


def test_per_layer_quantized_file_refused_in_one_line(comfy, tmp_path):
    sd = load_file(str(comfy[M.V15.key]["transformer"]))
    for layer in ("blocks.0.q", "blocks.0.ff_out"):                      # core's mixed-precision format
        w = sd[f"{layer}.weight"]
        scale = w.abs().amax() / 448.0
        sd[f"{layer}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        sd[f"{layer}.weight_scale"] = scale.reshape(())
        sd[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    path = tmp_path / "cogvideox1.5_i2v_fp8_mixed.safetensors"
    save_file(sd, str(path))
    assert C.identify(path) == "CogVideoX transformer (1.5 I2V) (fp8) (ComfyUI per-layer quantized)"
    with pytest.raises(CheckpointError) as e:
        L.load_transformer(path)
    msg = str(e.value)
    assert "\n" not in msg and "quantized per layer by ComfyUI (.comfy_quant" in msg
    assert msg.endswith("which this pack does not read: use the bf16 or fp16 file of the same model")


def test_void_inpainting_model_refused(tmp_path):
    """VOID (core's reason for CogVideoX) is a CogVideoX-Fun 1.5 inpainting model: 48 input channels."""
    from diffusers import CogVideoXTransformer3DModel

    cfg = dict(M.transformer_config(M.V15, tiny=True), in_channels=48, ofs_embed_dim=None)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CogVideoXTransformer3DModel(**cfg).state_dict().items()}
    path = tmp_path / "void_pass1.safetensors"
    save_file(T.to_core_names({k: torch.zeros(s) for k, s in shapes.items()}), str(path))
    with pytest.raises(CheckpointError, match=r"an inpainting model \(48 input channels: CogVideoX-Fun InP, "
                                              r"Netflix's VOID\), not image-to-video"):
        L.load_transformer(path)


def test_all_in_one_checkpoint_refused(comfy, tiny_ckpts, tmp_path):
    c = comfy[M.V15.key]
    sd = load_file(str(c["transformer_prefixed"]))
    sd.update({f"vae.{k}": v for k, v in load_file(str(c["vae"])).items()})
    t5 = load_file(str(tiny_ckpts[M.V15.key]["single"]["text_encoder"]))
    sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()})
    path = tmp_path / "cogvideox_checkpoint.safetensors"
    save_file(sd, str(path))
    assert C.identify(path) == C.ALL_IN_ONE
    for load in (L.load_transformer, L.load_vae, L.load_text_encoder):
        with pytest.raises(CheckpointError, match="all-in-one CogVideoX checkpoint .* use the split files"):
            load(path)
