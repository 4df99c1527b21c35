"""One precision rule per component (model/precision.py): which tensors fp8 storage stores in 8 bits
(never the AdaLN modulation), which modules stay in fp32 when a model loads in fp16 (the classes' own
``_keep_in_fp32_modules``), what ``auto`` picks on a card without native bf16, and where a precision
that cannot work is refused (loaders, CLI, estimate) or caught (decode)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cogvid_core.model import loading
from cogvid_core.model import precision as P
from cogvid_core.model import variants as M
from cogvid_core.model.sizes import component_sizes, weight_bytes
from test_nodes import models_root  # noqa: F401  (fixture: a ComfyUI models folder of tiny checkpoints)

V10, V15 = M.V10.key, M.V15.key
FP8 = torch.float8_e4m3fn
# The AdaLN modulation and the embeddings that feed it: a per-video row each, precision-sensitive
MODULATION = ("norm1.linear.weight", "norm2.linear.weight", "norm_out.linear.weight", "time_embedding.",
              "ofs_embedding.")


def _fp8_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.dtype == FP8}


@pytest.mark.parametrize("key", [V10, V15])
@pytest.mark.parametrize("file_backed", [True, False])
def test_fp8_storage_never_touches_the_modulation(tiny_ckpts, key, file_backed):
    tr, _ = loading.load_transformer(tiny_ckpts[key]["single"]["transformer"], torch.bfloat16,
                                     storage_dtype=FP8, file_backed=file_backed)
    stored = _fp8_names(tr)
    assert stored, "fp8 storage stored nothing in 8 bits"
    assert not [n for n in stored if any(m in n for m in MODULATION)]
    blocks = {n for n, p in tr.named_parameters() if n.startswith("transformer_blocks.") and p.ndim == 2}
    assert stored == {n for n in blocks if ".attn1." in n or ".ff." in n}
    if key == V15:
        assert tr.ofs_embedding.linear_1.weight.dtype == torch.bfloat16


def test_fp8_speed_and_storage_quantize_the_same_linears():
    from diffusers import CogVideoXTransformer3DModel
    from cogvid_core.speed import fp8
    with torch.device("meta"):
        tr = CogVideoXTransformer3DModel(**M.transformer_config(M.V15, tiny=True))
    block = tr.transformer_blocks[0]
    speed = {id(m) for m in fp8._Fp8Block(block, None, []).linears}
    storage = {id(m) for name, m in block.named_modules() if isinstance(m, nn.Linear)
               and P.is_fp8_layer(f"transformer_blocks.0.{name}.weight", m.weight.shape)}
    assert speed == storage and len(speed) == 6    # q, k, v, out, and the two feed-forward matrices


@pytest.mark.parametrize("key", [V10, V15])
def test_sizes_count_the_modulation_in_the_compute_dtype(key):
    from diffusers import CogVideoXTransformer3DModel
    with torch.device("meta"):
        tr = CogVideoXTransformer3DModel(**M.transformer_config(M.VARIANTS[key], tiny=True))
    s = component_sizes(key, tiny=True)["transformer"]
    matrices = sum(p.numel() for n, p in tr.named_parameters()
                   if n.startswith("transformer_blocks.") and p.ndim == 2 and (".attn1." in n or ".ff." in n))
    assert s.matrix_params == matrices
    assert weight_bytes(s, P.FP8) == matrices + (s.params - matrices + s.buffer_elems) * 2


def _t5_dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters()}


@pytest.mark.parametrize("file_backed", [True, False])
def test_t5_in_fp16_keeps_what_transformers_keeps_in_fp32(tiny_ckpts, file_backed):
    """The same dtypes as transformers' own loader (T5's ``_keep_in_fp32_modules``: the ``wo`` layers):
    T5 v1.1 XXL saturates in pure fp16."""
    from transformers import T5EncoderModel
    hf = tiny_ckpts[V15]["hf"]
    ours, _ = loading.load_text_encoder(hf, torch.float16, file_backed=file_backed)
    theirs = T5EncoderModel.from_pretrained(str(hf / "text_encoder"), dtype=torch.float16)
    assert _t5_dtypes(ours) == _t5_dtypes(theirs)
    assert {n for n, d in _t5_dtypes(ours).items() if d == torch.float32} == \
        {n for n, _ in ours.named_parameters() if ".wo." in n}
    bf16, _ = loading.load_text_encoder(hf, torch.bfloat16, file_backed=file_backed)
    assert set(_t5_dtypes(bf16).values()) == {torch.bfloat16}   # the rule is for fp16 only


def test_t5_fp16_with_fp32_wo_runs_and_matches_fp32(tiny_ckpts):
    from cogvid_core.model.text import encode_prompt
    hf = tiny_ckpts[V15]["hf"]
    half, tok = loading.load_text_encoder(hf, torch.float16, file_backed=False)
    full, _ = loading.load_text_encoder(hf, torch.float32, file_backed=False)
    a = encode_prompt(half, tok, "a red fox").embeds.float()
    b = encode_prompt(full, tok, "a red fox").embeds
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_sizes_count_t5s_fp32_layers_in_fp16():
    s = component_sizes(V15, tiny=True)["text_encoder"]
    cfg = M.t5_config(tiny=True)
    wo = cfg["num_layers"] * cfg["d_ff"] * cfg["d_model"]
    assert s.params_kept_fp32(P.FP16) == wo and s.params_kept_fp32(P.BF16) == 0
    assert weight_bytes(s, P.FP16) == (s.params + s.buffer_elems) * 2 + wo * 2
    assert weight_bytes(s, P.BF16) == (s.params + s.buffer_elems) * 2


# ---------------------------------------------------------------- refusals and auto
def test_15_transformer_in_fp16_refused_with_what_to_do():
    with pytest.raises(P.PrecisionError) as e:
        P.resolve("transformer", P.FP16, "cpu", M.V15)
    msg = str(e.value)
    assert "CogVideoX1.5-5B-I2V" in msg and "use bf16" in msg and "#637" in msg and "fp32" in msg
    assert P.resolve("transformer", P.FP16, "cpu", M.V10) == P.FP16
    for comp in ("text_encoder", "vae"):
        assert P.resolve(comp, P.FP16, "cpu") == P.FP16
        with pytest.raises(P.PrecisionError, match="transformer"):
            P.resolve(comp, P.FP8, "cpu")
    with pytest.raises(P.PrecisionError, match="one of"):
        P.resolve("vae", "half", "cpu")


def _card(monkeypatch, major: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 5 if major < 8 else 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4" if major < 8 else "NVIDIA A10")
    monkeypatch.setattr(torch.version, "hip", None)


def test_auto_on_a_card_without_bf16(monkeypatch):
    """T4 / V100 / RTX 20xx: fp16 where it works (T5 with its fp32 layers, the VAE, 1.0), fp32 for 1.5."""
    _card(monkeypatch, 7)
    assert not P.native_bf16("cuda:0")
    assert P.resolve("transformer", P.AUTO, "cuda:0", M.V10) == P.FP16
    assert P.resolve("transformer", P.AUTO, "cuda:0", M.V15) == P.FP32
    assert P.resolve("text_encoder", P.AUTO, "cuda:0") == P.FP16
    assert P.resolve("vae", P.AUTO, "cuda:0") == P.FP16
    _card(monkeypatch, 8)
    assert all(P.resolve(c, P.AUTO, "cuda:0", M.V15) == P.BF16 for c in P.COMPONENTS)
    assert P.resolve("transformer", P.AUTO, "cpu", M.V15) == P.BF16


def test_explicit_bf16_on_a_card_without_bf16_says_why_slow(monkeypatch, caplog):
    _card(monkeypatch, 7)
    assert P.resolve("transformer", P.BF16, "cuda", M.V15) == P.BF16
    assert "no native bf16" in caplog.text and "auto" in caplog.text


def test_estimate_applies_the_rule(monkeypatch):
    from cogvid_core.plan import estimate as E
    with pytest.raises(P.PrecisionError, match="use bf16"):
        E.estimate(M.V15, 17, 64, 96, "balanced", {"transformer": P.FP16}, tiny=True)
    _card(monkeypatch, 7)
    est = E.estimate(M.V15, 17, 64, 96, "balanced", {"transformer": P.AUTO, "text_encoder": P.AUTO,
                                                      "vae": P.AUTO}, tiny=True)
    assert est.precision == {"transformer": P.FP32, "text_encoder": P.FP16, "vae": P.FP16}


def test_cli_estimate_refuses_15_fp16_and_resolves_auto(capsys, monkeypatch):
    from cogvid_core import cli
    code = cli.main(["estimate", "--precision", "fp16", "--budget-gib", "24"])
    err = capsys.readouterr().err
    assert code == 2 and "use bf16" in err and "#637" in err
    _card(monkeypatch, 7)
    code = cli.main(["estimate", "--precision", "auto", "--budget-gib", "80", "--device", "cuda", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and '"transformer": "fp32"' in out and '"text_encoder": "fp16"' in out


# ---------------------------------------------------------------- decode output checked
def test_decode_output_checked_for_nan(tiny_ckpts):
    from cogvid_core.model import vae as vae_mod
    from cogvid_core.run import guard
    vae = loading.load_vae(tiny_ckpts[V15]["single"]["vae"], torch.float32)
    lat = vae_mod.VideoLatents(torch.zeros(1, 2, 16, 8, 12), frames=5, height=64, width=96, variant_key=V15,
                               fps=16, drop_first=0)
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError) as e:
        guard.decode(vae, lat, device="cpu")
    msg = str(e.value)
    assert "NaN" in msg and "VAE in fp32" in msg and "download it again" in msg


# ---------------------------------------------------------------- the path for cards without bf16
def test_pipeline_runs_each_component_in_its_own_precision(tiny_ckpts, monkeypatch, tmp_path):
    """What auto picks on a T4 for 1.5 (transformer fp32, T5 fp16 with fp32 wo, VAE fp16), here on the
    CPU: every component loads in its own dtype and the video comes out finite."""
    from PIL import Image
    from cogvid_core.run import pipeline
    seen = {}
    real_t5, real_vae = loading.load_text_encoder, loading.load_vae

    def t5(*a, **k):
        seen["t5"] = k["dtype"]
        return real_t5(*a, **k)

    def vae(*a, **k):
        seen["vae"] = k["dtype"]
        return real_vae(*a, **k)
    monkeypatch.setattr(loading, "load_text_encoder", t5)
    monkeypatch.setattr(loading, "load_vae", vae)
    img = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (120, 60, 30)).save(img)
    job = pipeline.Job(image=str(img), prompt="a fox", frames=17, height=64, width=96, steps=1, cfg=1.0)
    res = pipeline.generate(pipeline.Sources.from_model(str(tiny_ckpts[V15]["hf"])), job, device="cpu",
                            precision={"transformer": P.FP32, "text_encoder": P.FP16, "vae": P.FP16})
    assert seen == {"t5": torch.float16, "vae": torch.float16}
    assert res.latents.samples.dtype == torch.float32 and torch.isfinite(res.frames).all()


# ---------------------------------------------------------------- the nodes
@pytest.fixture
def comfy(models_root):
    import comfy_stub
    from test_nodes import load_pack
    mods = comfy_stub.install(str(models_root))
    yield load_pack(f"cogvid_precision_{id(mods)}"), mods
    comfy_stub.uninstall()


def _input(node_cls, input_id):
    return next(i for i in node_cls.GET_SCHEMA().inputs if i.id == input_id)


def test_loader_precision_options_only_grow_at_the_end(comfy):
    nodes, _ = comfy
    old = {"CogVidTransformerLoader": ["bf16", "fp16", "fp32", "fp8_e4m3fn"],
           "CogVidT5Loader": ["bf16", "fp16", "fp32"], "CogVidVAELoader": ["bf16", "fp16", "fp32"]}
    for node_id, values in old.items():
        i = _input(nodes[node_id], "precision")
        assert i.options == values + [P.AUTO] and i.default == P.AUTO, node_id
    est = nodes["CogVidVRAMEstimate"].GET_SCHEMA().inputs
    assert est[-3].id == "precision" and est[-3].optional and est[-3].default == P.AUTO


def test_transformer_node_refuses_15_in_fp16_before_loading(comfy, monkeypatch):
    from test_nodes import run
    nodes, _ = comfy
    monkeypatch.setattr(loading, "load_transformer", lambda *a, **k: pytest.fail("loaded the weights"))
    with pytest.raises(P.PrecisionError) as e:
        run(nodes["CogVidTransformerLoader"], model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp16",
            placement="auto", device="auto")
    assert str(e.value) == P.fp16_refusal(M.V15.label)      # the CLI's and the estimate's message


def test_t5_node_in_fp16_keeps_wo_in_fp32(comfy):
    from test_nodes import run
    nodes, _ = comfy
    t5 = run(nodes["CogVidT5Loader"], model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp16", placement="auto",
             device="auto")[0]
    kept = {n for n, p in t5.module.named_parameters() if p.dtype == torch.float32}
    assert kept and all(".wo." in n for n in kept) and t5.dtype == torch.float16 and t5.precision == P.FP16


def test_estimate_node_on_a_card_without_bf16(comfy, monkeypatch):
    from test_nodes import run
    nodes, mods = comfy
    _card(monkeypatch, 7)
    monkeypatch.setattr(mods["comfy.model_management"], "get_torch_device", lambda: torch.device("cuda", 0))
    kw = dict(variant=M.V15.label, frames=81, width=1360, height=768, profile="balanced", budget_gib=80.0)
    est = run(nodes["CogVidVRAMEstimate"], **kw)[2]
    assert est.precision == {"transformer": P.FP32, "text_encoder": P.FP16, "vae": P.FP16}
    with pytest.raises(P.PrecisionError, match="#637"):
        run(nodes["CogVidVRAMEstimate"], **kw, precision=P.FP16)
