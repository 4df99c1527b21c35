"""LoRA: read once, applied per run by hooks; equal to diffusers' load_lora_weights + set_adapters.

Exactness runs our whole pipeline (text, image encode, sampling with the LoRAs of pipeline.Sources, decode)
against diffusers' CogVideoXImageToVideoPipeline with the same LoRA files (fp32, CPU, tiny models).
"""
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cogvid_core.memory import activations
from cogvid_core.run import guard
from cogvid_core.model import loading
from cogvid_core.model import lora
from cogvid_core.model import variants as models
from cogvid_core.run import pipeline
from cogvid_core.memory import profiles
from cogvid_core.run import sampling
from cogvid_core.model import testing

K10, K15 = models.VARIANTS
STEPS = 2


# ----------------------------------------------------------------------------- helpers
def _image(w, h):
    return Image.fromarray((np.random.RandomState(7).rand(h, w, 3) * 255).astype(np.uint8))


def _diffusers_frames(folder, files, strengths, frames, h, w, image):
    pytest.importorskip("peft")
    from diffusers import CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    names = [f"l{i}" for i in range(len(files))]
    for name, f in zip(names, files):
        pipe.load_lora_weights(str(f), adapter_name=name)
    pipe.set_adapters(names, strengths)
    out = pipe(image=image, prompt="a boat on a lake", negative_prompt="blurry", height=h, width=w,
               num_frames=frames, num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=True,
               generator=torch.Generator("cpu").manual_seed(11), output_type="pt").frames[0]
    return out.permute(0, 2, 3, 1)


def _our_frames(folder, loras, profile, image):
    """Our pipeline with ``loras`` ((file, strength) pairs) through Sources.loras, the CLI's path."""
    job = pipeline.Job(image=image, prompt="a boat on a lake", negative_prompt="blurry", steps=STEPS, cfg=6.0,
                       scheduler="dpm", seed=11)
    sources = dataclasses.replace(pipeline.Sources.from_model(folder), loras=tuple(loras))
    return pipeline.generate(sources, job, precision="fp32", device="cpu", profile=profile).frames


def _inputs(tr, batch=1):
    """Deterministic transformer inputs at the tiny default size of its variant."""
    cfg = tr.config
    variant = models.variant_from_transformer_config(dict(cfg))
    frames, h, w = models.default_size(variant, dict(cfg))
    n_lat, _ = models.latent_frames(variant, frames)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, n_lat, cfg.in_channels, h // 8, w // 8, generator=g)
    text = torch.randn(batch, models.MAX_TEXT_TOKENS, cfg.text_embed_dim, generator=g)
    rope = sampling.rotary_embedding(cfg, h, w, n_lat, "cpu")
    ofs = x.new_full((batch,), 2.0) if cfg.ofs_embed_dim is not None else None
    return dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((batch,), 500), ofs=ofs,
                image_rotary_emb=rope, return_dict=False)


def _forward(tr, inputs):
    with torch.inference_mode():
        return tr(**inputs)[0]


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_ckpts):
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for key in models.VARIANTS:
        out[key] = {
            "peft": testing.write_lora(root / key / "peft.safetensors", key, ("attn", "ff"), rank=4, seed=1),
            "metadata": testing.write_lora(root / key / "meta.safetensors", key, ("attn", "ff"), rank=4, seed=2,
                                           layout="metadata", alpha=2.0),
            "attn_procs": testing.write_lora(root / key / "procs.safetensors", key, ("attn", "ff"), rank=2,
                                             seed=3, layout="attn_procs"),
            "alpha": testing.write_lora(root / key / "alpha.safetensors", key, ("attn", "ff"), rank=4, seed=2,
                                        layout="alpha", alpha=2.0),
        }
    return out


def _transformer(tiny_ckpts, key, **kw):
    kw.setdefault("file_backed", False)    # real host weights: these tests call the module directly
    tr, _ = loading.load_transformer(tiny_ckpts[key]["single"]["transformer"], dtype=torch.float32, **kw)
    return tr


# ----------------------------------------------------------------------------- exactness vs diffusers
_BASE = {}   # variant -> frames without LoRA, to show the LoRA's effect is far above the tolerance


@pytest.mark.parametrize("variant_key", list(models.VARIANTS))
@pytest.mark.parametrize("case", ["one", "two"])
def test_matches_diffusers(tiny_ckpts, lora_files, variant_key, case):
    folder = str(tiny_ckpts[variant_key]["hf"])
    variant = models.VARIANTS[variant_key]
    frames, h, w = models.default_size(variant, models.transformer_config(variant, tiny=True))
    image = _image(w, h)
    files = lora_files[variant_key]
    if case == "one":
        paths, strengths, profile = [files["peft"]], [1.0], "resident"
    else:   # streamed placement, sequential CFG and a feed-forward chunked below the sequence length
        paths, strengths = [files["metadata"], files["attn_procs"]], [0.8, -0.6]
        profile = profiles.PROFILES["lowvram"].replace(ff_chunk=40)
    ref = _diffusers_frames(folder, paths, strengths, frames, h, w, image)
    ours = _our_frames(folder, list(zip(paths, strengths)), profile, image)
    if variant_key not in _BASE:
        _BASE[variant_key] = _our_frames(folder, [], "resident", image)
    base = _BASE[variant_key]
    diff = (ours - ref).abs().max().item()
    effect = (ours - base).abs().max().item()
    print(f"{variant_key}/{case}: max abs frame diff vs diffusers {diff:.2e}, LoRA effect {effect:.2e}")
    assert ours.shape == ref.shape == (frames, h, w, 3)
    assert effect > 1e-2, "the LoRA barely changes the video: the comparison would prove little"
    assert diff <= 1e-4


def test_alpha_tensors_equal_adapter_metadata(lora_files):
    # diffusers' CogVideoX loader refuses `.alpha` tensors, so they are checked against the metadata
    # file holding the same values and alpha, which diffusers does read (test above).
    a, m = (lora.load_lora(lora_files[K15][k]) for k in ("alpha", "metadata"))
    assert a.layers.keys() == m.layers.keys()
    for name, layer in a.layers.items():
        assert layer.scale == m.layers[name].scale == 0.5
        assert torch.equal(layer.down, m.layers[name].down) and torch.equal(layer.up, m.layers[name].up)


# ----------------------------------------------------------------------------- no alpha, large rank
def test_scale_hint_for_a_wide_lora_without_alpha(tmp_path):
    def read(name, rank, **kw):
        return lora.load_lora(testing.write_lora(tmp_path / f"{name}.safetensors", K15, ("attn",), rank=rank, **kw))

    wide = read("wide", 128)
    assert not wide.has_alpha and {layer.scale for layer in wide.layers.values()} == {1.0}   # diffusers' rule kept
    hint = lora.scale_hint(wide, 1.0)
    print(hint)
    assert "\n" not in hint and "wide.safetensors" in hint and "no alpha" in hint and "rank 128" in hint
    assert "1/rank" in hint and "enter strength 0.0078 (= 1/128)" in hint
    assert "enter strength 0.0063 (= 0.8/128)" in lora.scale_hint(wide, 0.8)
    assert lora.scale_hint(wide, 1 / 128) is None and lora.scale_hint(wide, 0.0) is None   # already at 1/rank, or off
    assert lora.scale_hint(read("narrow", 4), 1.0) is None                                # small rank: no hint
    for layout in ("alpha", "metadata"):                                                  # the file says its alpha
        with_alpha = read(layout, 128, layout=layout, alpha=128.0)
        assert with_alpha.has_alpha and lora.scale_hint(with_alpha, 1.0) is None


def test_pipeline_says_the_hint_before_loading(tmp_path, tiny_ckpts, caplog):
    path = testing.write_lora(tmp_path / "wide.safetensors", K15, ("attn",), rank=256)
    sources = dataclasses.replace(pipeline.Sources.from_model(str(tiny_ckpts[K15]["hf"])), loras=((path, 1.0),))
    job = pipeline.Job(image=None, prompt="a boat")
    with caplog.at_level("WARNING"):
        run = pipeline._prepare(sources, job, "fp32", "cpu", "resident", None, None)
    hints = [n for n in run.notes if "enter strength" in n]   # the other note: the file names no variant
    assert len(hints) == 1 and "enter strength 0.0039 (= 1/256)" in hints[0]
    assert hints[0] in caplog.text


# ----------------------------------------------------------------------------- run-time application
def test_strength_change_and_removal(tiny_ckpts, lora_files):
    tr = _transformer(tiny_ckpts, K15)
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    inputs = _inputs(tr)
    base = _forward(tr, inputs)
    lw = lora.load_lora(lora_files[K15]["peft"])
    with lora.applied(tr, [(lw, 0.5)]):
        half = _forward(tr, inputs)
    with lora.applied(tr, [(lw, 1.0)]):
        full = _forward(tr, inputs)
    assert guard.leftovers(tr) == []
    assert torch.equal(_forward(tr, inputs), base)
    with lora.applied(tr, [(lw, 0.5)]):
        assert torch.equal(_forward(tr, inputs), half)    # nothing of the previous run carried over
    with lora.applied(tr, [(lw, 0.0)]):
        assert torch.equal(_forward(tr, inputs), base)
    assert (half - base).abs().max() > 1e-3 and (full - half).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="stop"), lora.applied(tr, [(lw, 1.0)]):
        raise RuntimeError("stop")                         # an interrupt or error inside the run
    assert guard.leftovers(tr) == []
    assert torch.equal(_forward(tr, inputs), base)
    assert all(torch.equal(v, before[k]) for k, v in tr.state_dict().items())


def test_layer_delta_is_peft_formula(tiny_ckpts, lora_files):
    tr = _transformer(tiny_ckpts, K10)
    lw = lora.load_lora(lora_files[K10]["alpha"])
    name = "transformer_blocks.1.ff.net.2"
    layer, module = lw.layers[name], tr.get_submodule(name)
    x = torch.randn(2, 5, module.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = module(x)
        with lora.applied(tr, [(lw, -0.7)]):
            got = module(x)
    want = base + (x @ layer.down.T @ layer.up.T) * (layer.scale * -0.7)
    assert (got - want).abs().max() < 1e-6


def test_lora_b_bias(tmp_path, tiny_ckpts):
    # PEFT's lora_bias: lora_B has a bias, scaled with the rest of the LoRA's output
    tr = _transformer(tiny_ckpts, K10)
    module = tr.get_submodule("proj_out")
    g = torch.Generator().manual_seed(1)
    a, b, bias = (torch.randn(shape, generator=g) for shape in ((3, module.in_features), (module.out_features, 3),
                                                                  (module.out_features,)))
    path = tmp_path / "bias.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b,
               "transformer.proj_out.lora_B.bias": bias}, str(path))
    x = torch.randn(4, module.in_features, generator=g)
    with torch.inference_mode():
        base = module(x)
        with lora.applied(tr, [(lora.load_lora(path), 0.5)]):
            got = module(x)
    assert (got - (base + 0.5 * (x @ a.T @ b.T + bias))).abs().max() < 1e-5


def test_ff_chunking(tiny_ckpts, lora_files):
    tr = _transformer(tiny_ckpts, K15)
    inputs = _inputs(tr)
    loras = [(lora.load_lora(lora_files[K15]["peft"]), 0.9), (lora.load_lora(lora_files[K15]["attn_procs"]), -1.2)]
    with lora.applied(tr, loras):
        plain = _forward(tr, inputs)
    assert activations.set_ff_chunking(tr, 7) > 0
    with lora.applied(tr, loras):
        chunked = _forward(tr, inputs)
    activations.set_ff_chunking(tr, None)
    diff = (chunked - plain).abs().max().item()
    print(f"ff chunking: max abs diff {diff:.2e}")
    assert diff < 1e-5
    assert guard.leftovers(tr) == []


def test_fp8_storage(tiny_ckpts, lora_files):
    fp8 = _transformer(tiny_ckpts, K15, storage_dtype=torch.float8_e4m3fn)
    ref = _transformer(tiny_ckpts, K15)
    name = "transformer_blocks.0.attn1.to_q"
    assert isinstance(fp8.get_submodule(name), loading.Fp8Linear)
    inputs = _inputs(ref)
    lw = lora.load_lora(lora_files[K15]["peft"])
    out = {}
    for label, tr in (("fp8", fp8), ("fp32", ref)):
        out[label, "base"] = _forward(tr, inputs)
        with lora.applied(tr, [(lw, 1.0)]):
            out[label, "lora"] = _forward(tr, inputs)
        assert guard.leftovers(tr) == []
        assert torch.equal(_forward(tr, inputs), out[label, "base"])
    effect = (out["fp32", "lora"] - out["fp32", "base"]).abs().max().item()
    quant = (out["fp8", "lora"] - out["fp32", "lora"]).abs().max().item()
    print(f"fp8 storage: LoRA effect {effect:.2e}, fp8 vs fp32 with LoRA {quant:.2e}")
    assert quant < 0.1 * effect     # the LoRA's effect survives fp8 storage; only rounding differs


def test_lora_bytes(lora_files):
    lw = lora.load_lora(lora_files[K10]["peft"])
    n = sum(layer.down.numel() + layer.up.numel() for layer in lw.layers.values())
    assert lora.lora_bytes([(lw, 1.0)]) == 2 * n
    assert lora.lora_bytes([(lw, 1.0), (lw, -0.5)], dtype=torch.float32) == 8 * n
    assert lora.lora_bytes([(lw, 0.0)]) == 0


# ----------------------------------------------------------------------------- bad input
def _fake(path, keys, shape=(4, 8)):
    save_file({k: torch.zeros(shape) for k in keys}, str(path))
    return path


@pytest.mark.parametrize("what,keys", [
    ("Stable Diffusion", ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]),
    ("Stable Diffusion", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]),
    ("Flux", ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
              "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight"]),
    ("Wan", ["diffusion_model.blocks.0.self_attn.q.lora_A.weight",
             "diffusion_model.blocks.0.self_attn.q.lora_B.weight"]),
    ("model checkpoint", ["transformer_blocks.0.attn1.to_q.weight", "proj_out.weight"]),
    ("DoRA", ["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
              "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight",
              "transformer.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"]),
])
def test_foreign_lora(tmp_path, what, keys):
    with pytest.raises(lora.LoraError, match=what) as e:
        lora.load_lora(_fake(tmp_path / "x.safetensors", keys))
    assert "\n" not in str(e.value)


def test_cogvideox_2b_width(tmp_path, tiny_ckpts):
    path = testing.write_lora(tmp_path / "2b.safetensors", K10, ("attn",), width=1920)
    with pytest.raises(lora.LoraError, match="CogVideoX-2B") as e:
        lora.check(_transformer(tiny_ckpts, K10), lora.load_lora(path))
    assert "1920" in str(e.value) and "transformer_blocks.0.attn1.to_" in str(e.value)


def test_other_variant(tmp_path, tiny_ckpts):
    for made_for, used_on, target, label in ((K15, K10, "proj_out", "CogVideoX1.5-5B-I2V"),
                                             (K10, K15, "proj_out", "CogVideoX-5B-I2V"),
                                             (K15, K10, "ofs_embedding.linear_1", "CogVideoX1.5-5B-I2V")):
        path = testing.write_lora(tmp_path / f"{made_for}-{target}.safetensors", made_for, ("attn", target))
        tr = _transformer(tiny_ckpts, used_on)
        with pytest.raises(lora.LoraError, match=label) as e, lora.applied(tr, [(lora.load_lora(path), 1.0)]):
            pass
        print(e.value)
        assert guard.leftovers(tr) == []
    path = testing.write_lora(tmp_path / "patch.safetensors", K15, ("patch_embed.proj",))
    with pytest.raises(lora.LoraError, match="Conv2d.*CogVideoX1.5-5B-I2V"):
        lora.check(_transformer(tiny_ckpts, K10), lora.load_lora(path))


def test_unmatched_keys_are_counted(tmp_path, tiny_ckpts):
    path = testing.write_lora(tmp_path / "deep.safetensors", K10, ("attn", "ff"), layers=4)  # tiny model: 2 blocks
    with pytest.raises(lora.LoraError, match=r"12 of 24 LoRA layers match no layer.*blocks up to 3"):
        lora.check(_transformer(tiny_ckpts, K10), lora.load_lora(path))


class _Payload:
    def __reduce__(self):
        return (open, (str(_Payload.sentinel), "w"))


def test_pickle_is_never_unpickled(tmp_path):
    _Payload.sentinel = tmp_path / "unpickled"
    for name in ("lora.pt", "lora.safetensors"):     # refused by content, not by file name
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"transformer.x.lora_A.weight": _Payload()}, protocol=4))
        with pytest.raises(lora.LoraError, match="pickled"):
            lora.load_lora(path)
    torch.save({"a.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "zip.pt")
    with pytest.raises(lora.LoraError, match="pickled"):
        lora.load_lora(tmp_path / "zip.pt")
    assert not _Payload.sentinel.exists()


def test_the_delta_adds_into_the_base_output_in_place(monkeypatch):
    """exact's LoRA path adds its delta into the base Linear's own output: the step's feed-forward phase
    counts out + delta (8 of its units), not out + delta + a third tensor for the sum (12); same values."""
    from cogvid_core.model.lora_linear import lora_class
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 16)
    layer = lora.LoraLayer(down=torch.randn(4, 8), up=torch.randn(16, 4), scale=0.5)
    x = torch.randn(3, 8)
    want = lin(x) + 0.7 * 0.5 * (x @ layer.down.T @ layer.up.T)
    made = []
    base = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: made.append(base(self, x)) or made[-1])
    lin.__class__ = lora_class(torch.nn.Linear)
    lin._lora_parts = [(layer, 0.7)]
    got = lin(x)
    assert got.data_ptr() == made[-1].data_ptr()
    assert torch.allclose(got, want, atol=1e-5)
