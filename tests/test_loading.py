"""Loading every component from every layout, structural detection, wrong-file errors, hub cache, fp8."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from cogvid_core.model import checkpoints as C
from cogvid_core.model import fileindex as FI
from cogvid_core.model import loading as L
from cogvid_core.model import variants as M
from cogvid_core.memory import placement as P
from cogvid_core.model import sources as S
from cogvid_core.model import testing as T
from cogvid_core.model.precision import is_fp8_layer
from cogvid_core.model.variants import CheckpointError

KEYS = list(M.VARIANTS)


def _read(model):
    """A file-backed model (the loaders' default) placed on the host: its weights read from the files."""
    if FI.index_of(model) is not None:
        P.place(model, "cpu", "resident")
    return model


def load_transformer(*a, **k):
    model, variant = L.load_transformer(*a, **k)
    return _read(model), variant


def load_text_encoder(*a, **k):
    model, tok = L.load_text_encoder(*a, **k)
    return _read(model), tok


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, same_dtype: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert not same_dtype or sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k].to(sb[k].dtype), sb[k]), k


def _transformer_inputs(variant: M.Variant, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    frames = 3 if variant.patch_size_t is None else 2  # 1.0 tiny: learned positions for 3 latent frames
    kw = dict(hidden_states=torch.randn(1, frames, 32, 8, 12, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(1, 226, 32, generator=g).to(dtype),
              timestep=torch.tensor([500]), return_dict=False)
    if variant.patch_size_t:
        kw["ofs"] = torch.tensor([2.0])
    return kw


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("key", KEYS)
def test_transformer_hf_and_single_match(tiny_ckpts, key):
    ck = tiny_ckpts[key]
    hf, variant = load_transformer(ck["hf"], dtype=torch.float32)
    single, variant2 = load_transformer(ck["single"]["transformer"], dtype=torch.float32)
    assert variant.key == variant2.key == key
    _same_weights(hf, single)
    cfg_hf, cfg_single = dict(hf.config), dict(single.config)
    assert {k: cfg_hf[k] for k in M.transformer_config(M.VARIANTS[key], tiny=True)} == \
           {k: cfg_single[k] for k in M.transformer_config(M.VARIANTS[key], tiny=True)}


@pytest.mark.parametrize("key", KEYS)
def test_hf_folder_is_what_diffusers_reads(tiny_ckpts, key):
    from diffusers import CogVideoXTransformer3DModel

    folder = tiny_ckpts[key]["hf"]
    for sub in ("transformer", "text_encoder"):
        index = json.loads(next((folder / sub).glob("*.safetensors.index.json")).read_text())
        assert len(set(index["weight_map"].values())) >= 2, f"{sub} should be sharded"
    assert json.loads((folder / "model_index.json").read_text())["transformer"][1] == "CogVideoXTransformer3DModel"
    ref = CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    ours, _ = load_transformer(folder / "transformer", dtype=torch.float32)  # component folder itself
    _same_weights(ref, ours, same_dtype=False)  # diffusers keeps 1.0's pos_embedding buffer in float64


@pytest.mark.parametrize("key", KEYS)
def test_vae_layouts_match_and_decode_finite(tiny_ckpts, key):
    ck, variant = tiny_ckpts[key], M.VARIANTS[key]
    hf = L.load_vae(ck["hf"], dtype=torch.float32)
    single = L.load_vae(ck["single"]["vae"], dtype=torch.float32, variant=key)
    _same_weights(hf, single)
    assert hf.config.invert_scale_latents == single.config.invert_scale_latents == variant.invert_scale_latents
    assert list(single.config.block_out_channels) == list(hf.config.block_out_channels)
    assert single.config.norm_num_groups == hf.config.norm_num_groups
    with torch.no_grad():
        out = single.decode(torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))).sample
    assert torch.isfinite(out).all() and out.std() > 1e-3
    # The weights serve every variant: a single file loads without one (the sampler applies the
    # transformer's variant's scaling rule); the config records the rule only when told.
    plain = L.load_vae(ck["single"]["vae"], dtype=torch.float32)
    _same_weights(hf, plain)
    assert "invert_scale_latents" not in M.vae_config()


def test_text_encoder_layouts(tiny_ckpts, tmp_path):
    ck = tiny_ckpts[M.V15.key]
    hf, tok = load_text_encoder(ck["hf"], dtype=torch.float32)
    single, tok2 = load_text_encoder(ck["single"]["text_encoder"], dtype=torch.float32)
    scaled, _ = load_text_encoder(ck["single"]["text_encoder_fp8_scaled"], dtype=torch.float32)
    _same_weights(hf, single)
    assert hf.encoder.embed_tokens is hf.shared and single.encoder.embed_tokens is single.shared
    ids = tok(["a red car moves slowly"], return_tensors="pt", padding="max_length", max_length=16).input_ids
    assert ids.tolist() == tok2(["a red car moves slowly"], return_tensors="pt", padding="max_length",
                                max_length=16).input_ids.tolist()
    with torch.no_grad():
        a, b, c = (m(ids).last_hidden_state for m in (hf, single, scaled))
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.std() > 0.1
    assert (a - c).abs().max() < 0.25 * a.abs().max()  # fp8 rounding only
    lone = tmp_path / "t5xxl_fp16.safetensors"
    shutil.copy(ck["single"]["text_encoder"], lone)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_text_encoder(lone)
    _, tok3 = load_text_encoder(lone, dtype=torch.float32, tokenizer=ck["single"]["tokenizer"])
    assert tok3("a cat").input_ids == tok("a cat").input_ids


def test_scheduler(tiny_ckpts):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    dpm = L.load_scheduler(tiny_ckpts[M.V15.key]["hf"])
    ddim = L.load_scheduler(None, kind="ddim")
    assert isinstance(dpm, CogVideoXDPMScheduler) and isinstance(ddim, CogVideoXDDIMScheduler)
    for s in (dpm, ddim):
        assert s.config.prediction_type == "v_prediction" and s.config.timestep_spacing == "trailing"
        assert s.config.rescale_betas_zero_snr and s.config.snr_shift_scale == 1.0
    assert isinstance(L.load_scheduler(tiny_ckpts[M.V15.key]["single"]["transformer"]), CogVideoXDPMScheduler)


# ----------------------------------------------------------------------------- detection and errors
def test_identify(tiny_ckpts):
    s10, s15 = tiny_ckpts[M.V10.key]["single"], tiny_ckpts[M.V15.key]["single"]
    assert C.identify(s10["transformer"]) == "CogVideoX transformer (1.0 I2V)"
    assert C.identify(s15["transformer"]) == "CogVideoX transformer (1.5 I2V)"
    assert C.identify(s15["transformer_fp8"]) == "CogVideoX transformer (1.5 I2V) (fp8)"
    assert C.identify(s15["vae"]) == "CogVideoX VAE"
    assert C.identify(s15["text_encoder"]) == "T5 text encoder"
    assert C.identify(s15["text_encoder_fp8_scaled"]) == "T5 text encoder (fp8 scaled)"


def test_detection_ignores_file_names(tiny_ckpts, tmp_path):
    # A 1.0 transformer saved under a 1.5-sounding name is still 1.0.
    fake = tmp_path / "CogVideoX1.5-5B-I2V_transformer.safetensors"
    shutil.copy(tiny_ckpts[M.V10.key]["single"]["transformer"], fake)
    _, variant = load_transformer(fake, dtype=torch.float32)
    assert variant is M.V10


def test_wrong_component_files(tiny_ckpts):
    s = tiny_ckpts[M.V15.key]["single"]
    with pytest.raises(CheckpointError, match=r"is a T5 text encoder, not a CogVideoX transformer: pick it in the T5"):
        load_transformer(s["text_encoder"])
    with pytest.raises(CheckpointError, match=r"is a CogVideoX VAE, not a CogVideoX transformer: pick it in the VAE"):
        load_transformer(s["vae"])
    with pytest.raises(CheckpointError, match=r"is a CogVideoX transformer \(1.5 I2V\), not a T5 text encoder"):
        load_text_encoder(s["transformer"])
    with pytest.raises(CheckpointError, match=r"is a T5 text encoder, not a CogVideoX VAE"):
        L.load_vae(s["text_encoder"], variant=M.V15)
    hf = tiny_ckpts[M.V15.key]["hf"]
    with pytest.raises(CheckpointError, match="AutoencoderKLCogVideoX, not a CogVideoX transformer"):
        load_transformer(hf / "vae")


@pytest.mark.parametrize("patch_t", [None, 2])
def test_text_to_video_transformer_refused(tmp_path, patch_t):
    from diffusers import CogVideoXTransformer3DModel

    variant = M.V15 if patch_t else M.V10
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**dict(M.transformer_config(variant, tiny=True), in_channels=16))
    path = tmp_path / "t2v.safetensors"
    save_file(model.state_dict(), str(path))
    assert C.identify(path).startswith("CogVideoX text-to-video transformer")
    with pytest.raises(CheckpointError, match="text-to-video.*image-to-video"):
        load_transformer(path)


def test_other_checkpoints_refused(tmp_path):
    sd = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, str(sd))
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 2)}, str(flux))
    for path in (sd, flux):
        assert "Stable Diffusion / Flux" in C.identify(path)
        with pytest.raises(CheckpointError, match="Stable Diffusion / Flux.*not a CogVideoX transformer"):
            load_transformer(path)
        with pytest.raises(CheckpointError, match="not a T5 text encoder"):
            load_text_encoder(path)


def test_truncated_and_corrupt_files(tiny_ckpts, tmp_path):
    data = tiny_ckpts[M.V15.key]["single"]["transformer"].read_bytes()
    for name, blob in (("truncated.safetensors", data[: len(data) // 2]), ("header.safetensors", data[:100]),
                       ("garbage.safetensors", b"\x00" * 64)):
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match="truncated or corrupt.*download it again"):
            load_transformer(path)


def test_pickle_refused(tmp_path):
    for suffix in (".bin", ".pt", ".ckpt"):
        path = tmp_path / f"diffusion_pytorch_model{suffix}"
        path.write_bytes(b"not read")
        with pytest.raises(CheckpointError, match="only .safetensors files are accepted"):
            load_transformer(path)
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(M.transformer_config(M.V15, True),
                                                        _class_name="CogVideoXTransformer3DModel")))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_transformer(folder)


def test_missing_tensor(tiny_ckpts, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(tiny_ckpts[M.V10.key]["single"]["transformer"]))
    sd.pop("transformer_blocks.1.ff.net.2.weight")
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="missing"):
        load_transformer(path)


# ----------------------------------------------------------------------------- sources
def test_resolve_sources(tiny_ckpts, tmp_path):
    hf = tiny_ckpts[M.V15.key]["hf"]
    assert S.resolve(hf, "transformer") == hf / "transformer"
    assert S.resolve(hf / "vae", "vae") == hf / "vae"
    assert S.resolve(str(hf), "tokenizer") == hf / "tokenizer"
    with pytest.raises(CheckpointError, match="not found"):
        S.resolve(tmp_path / "nothing" / "here" / "x", "transformer")
    with pytest.raises(CheckpointError, match="no transformer/ sub-folder"):
        S.resolve(tmp_path, "transformer")


def _offline(monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)


def test_offline_hub_cache(tiny_ckpts, tmp_path, monkeypatch):
    _offline(monkeypatch)
    repo = tmp_path / "hub" / "models--THUDM--CogVideoX1.5-5B-I2V"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_ckpts[M.V15.key]["hf"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    cache = tmp_path / "hub"
    folder = S.resolve("THUDM/CogVideoX1.5-5B-I2V", "transformer", cache_dir=cache)
    assert folder == snap / "transformer"
    model, variant = load_transformer("THUDM/CogVideoX1.5-5B-I2V", dtype=torch.float32, cache_dir=cache,
                                        progress=False)
    assert variant is M.V15
    _, tok = load_text_encoder("THUDM/CogVideoX1.5-5B-I2V", dtype=torch.float32, cache_dir=cache)
    assert tok("a cat").input_ids[-1] == 1
    with pytest.raises(CheckpointError, match=r"could not download transformer/ of THUDM/CogVideoX-5b-I2V: .*"
                                              r"check the repo id, your network, or put the folder under models/CogVideo"):
        S.resolve("THUDM/CogVideoX-5b-I2V", "transformer", cache_dir=cache)


# ----------------------------------------------------------------------------- fp8
@pytest.mark.parametrize("key", KEYS)
def test_fp8_storage_close_to_bf16(tiny_ckpts, key):
    ck, variant = tiny_ckpts[key], M.VARIANTS[key]
    ref, _ = load_transformer(ck["hf"], dtype=torch.bfloat16)
    kept, _ = load_transformer(ck["single"]["transformer_fp8"], dtype=torch.bfloat16)
    quant, _ = load_transformer(ck["hf"], dtype=torch.bfloat16, storage_dtype=torch.float8_e4m3fn)
    upcast, _ = load_transformer(ck["single"]["transformer_fp8"], dtype=torch.bfloat16, storage_dtype=torch.bfloat16)
    q = kept.transformer_blocks[0].attn1.to_q
    assert isinstance(q, L.Fp8Linear) and q.weight.dtype == torch.float8_e4m3fn
    assert quant.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert kept.patch_embed.proj.weight.dtype == torch.bfloat16 and kept.dtype == torch.bfloat16
    assert upcast.transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    _same_weights(kept, quant)  # the fp8 file and load-time quantisation round the same way
    with torch.no_grad():
        outs = [m(**_transformer_inputs(variant, torch.bfloat16))[0].float() for m in (ref, kept, upcast)]
    a, b, c = outs
    assert torch.isfinite(b).all() and torch.equal(b, c)
    assert (a - b).norm() / a.norm() < 0.1


# ----------------------------------------------------------------------------- writer
def test_writer_is_deterministic_and_cli(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    T.main([str(a), "--variant", M.V10.key, "--layouts", "single"])
    T.write_checkpoints(b, M.V10.key, layouts=("single",))
    for fa in sorted((a / "single").glob("*.safetensors")):
        assert fa.read_bytes() == (b / "single" / fa.name).read_bytes(), fa.name


def test_build_random_runs():
    model = T.build_random("transformer", M.V10.key, tiny=True)
    with torch.no_grad():
        out = model(**_transformer_inputs(M.V10))[0]
    assert torch.isfinite(out).all() and out.std() > 0


def test_layers_caps_depth_in_every_layout(tmp_path):
    """--layers (the GPU reliability bench: full widths, few blocks) reaches the files and the loaders."""
    T.main([str(tmp_path), "--variant", M.V15.key, "--layers", "1"])
    hf = tmp_path / M.V15.label
    tr, variant = load_transformer(str(hf), torch.float32)
    assert variant is M.V15 and len(tr.transformer_blocks) == 1
    t5, _tok = load_text_encoder(str(hf), torch.float32)
    assert len(t5.encoder.block) == 1
    single, _ = load_transformer(str(tmp_path / "single" / "cogvideox1_5-5b-i2v_transformer_fp32.safetensors"),
                                   torch.float32)
    assert len(single.transformer_blocks) == 1


# ----------------------------------------------------------------------------- the variant table
def test_every_variant_is_recognised_by_its_own_config_and_shapes():
    from diffusers import CogVideoXTransformer3DModel

    assert len({tuple(sorted(v.traits.items())) for v in M.VARIANTS.values()}) == len(M.VARIANTS)
    for v in M.VARIANTS.values():
        assert v.task == M.IMAGE_TO_VIDEO and set(v.traits) == set(M.RECOGNISED_BY)
        for tiny in (False, True):
            assert M.variant_from_transformer_config(M.transformer_config(v, tiny)) is v
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel(**M.transformer_config(v, tiny=True))
        shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        assert M.variant_from_transformer_config(C.transformer_config_from_shapes(shapes)) is v


def test_unknown_structure_refused_with_the_table_labels():
    cfg = dict(M.transformer_config(M.V15), ofs_embed_dim=None)  # 1.5 patching without its ofs embedding
    with pytest.raises(CheckpointError, match="matches no known variant.*CogVideoX-5B-I2V or CogVideoX1.5-5B-I2V"):
        M.variant_from_transformer_config(cfg)
    with pytest.raises(CheckpointError, match="no rotary embeddings"):
        M.variant_from_transformer_config(dict(M.transformer_config(M.V10), use_rotary_positional_embeddings=False))


def test_fp8_files_hold_exactly_the_fp8_layers(tiny_ckpts):
    """One predicate decides the fp8 layers: the writer's files and load-time quantisation agree with it."""
    s = tiny_ckpts[M.V15.key]["single"]
    for key in ("transformer_fp8", "text_encoder_fp8_scaled"):
        raw = C.plain_shapes(C.read_shapes(s[key]))
        dtypes = {k: d for k, (_, d) in C.read_shapes(s[key]).items()}
        fp8 = {k for k, d in dtypes.items() if d.startswith("F8") and k != "scaled_fp8"}
        assert fp8 and fp8 == {k for k, shape in raw.items() if is_fp8_layer(k, shape)}, key
    quant, _ = load_transformer(s["transformer"], dtype=torch.bfloat16, storage_dtype=torch.float8_e4m3fn)
    stored = {k for k, t in quant.state_dict().items() if t.dtype == torch.float8_e4m3fn}
    assert stored == {k for k, t in quant.state_dict().items() if is_fp8_layer(k, t.shape)}


def test_random_checkpoint_bytes_do_not_depend_on_the_writer_threads(tmp_path):
    """The full-size writer draws tensors on several threads: the file must be the one a single thread writes."""
    from cogvid_core.model import testing_files as TF
    shapes = {f"blocks.{i}.w.weight": (64 + i, 48) for i in range(7)}
    shapes.update({"norm.weight": (48,), "pos_embedding": (3, 5)})
    one, many = tmp_path / "one.safetensors", tmp_path / "many.safetensors"
    TF.write_safetensors(one, "transformer", shapes, torch.bfloat16, 3, TF.to_scaled_fp8, workers=1)
    TF.write_safetensors(many, "transformer", shapes, torch.bfloat16, 3, TF.to_scaled_fp8, workers=3)
    assert one.read_bytes() == many.read_bytes()
    from safetensors.torch import load_file
    back = load_file(str(many))
    assert set(back) >= set(shapes) and "scaled_fp8" in back
