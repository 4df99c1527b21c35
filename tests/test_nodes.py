"""The ComfyUI nodes, end to end on CPU with tiny checkpoints, through the pack's entry point.

Without ComfyUI: `comfy_stub` fakes the few ComfyUI modules the pack uses; the pack is imported the
way ComfyUI imports it (package from its folder, `comfy_entrypoint` -> node classes) and each node
runs through `EXECUTE_NORMALIZED`, as ComfyUI calls V3 nodes. With `COMFYUI_DIR` pointing at a
ComfyUI checkout (and `COMFYUI_PYTHON` at its venv's python, default: this one), `test_real_comfyui` does the same inside real
ComfyUI (`nodes.load_custom_node`, `execution.get_output_data`) in a subprocess.
"""
from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import comfy_stub
import real_comfy

REPO = Path(__file__).resolve().parents[1]
V10, V15 = "cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"
_counter = itertools.count()
NODE_IDS = {"CogVidTransformerLoader", "CogVidLoraLoader", "CogVidT5Loader", "CogVidVAELoader", "CogVidTextEncode",
            "CogVidImageEncode", "CogVidSampler", "CogVidDecode", "CogVidVRAMEstimate", "CogVidSaveVideo"}


def load_pack(name: str):
    """Import the pack like ComfyUI's load_custom_node: a package from the folder's __init__.py."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    ext = asyncio.run(module.comfy_entrypoint())
    return {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}


@pytest.fixture(scope="module")
def models_root(tiny_ckpts, tmp_path_factory):
    """A ComfyUI base folder: models/CogVideo/<hf folders>, single files in diffusion_models/,
    text_encoders/ (tokenizer beside it) and vae/, one variant each so lists stay small."""
    base = tmp_path_factory.mktemp("comfy_base")
    models = base / "models"
    for key in (V15, V10):
        hf = tiny_ckpts[key]["hf"]
        shutil.copytree(hf, models / "CogVideo" / hf.name)
    single = tiny_ckpts[V10]["single"]
    for folder, comp in (("diffusion_models", "transformer"), ("text_encoders", "text_encoder"), ("vae", "vae")):
        (models / folder).mkdir(parents=True)
        shutil.copy(single[comp], models / folder / single[comp].name)
    shutil.copytree(single["tokenizer"], models / "text_encoders" / "tokenizer")
    (base / "output").mkdir()
    return base


@pytest.fixture
def comfy(models_root):
    mods = comfy_stub.install(str(models_root))
    nodes = load_pack(f"cogvid_pack_{next(_counter)}")
    yield nodes, mods
    comfy_stub.uninstall()


def run(node_cls, **inputs):
    return node_cls.EXECUTE_NORMALIZED(**inputs)


def _options(node_cls, input_id):
    return next(i for i in node_cls.GET_SCHEMA().inputs if i.id == input_id).options


def _image(h=70, w=110):
    g = torch.linspace(0, 1, w).expand(h, w)
    return torch.stack([g, g.flip(1), torch.full((h, w), 0.5)], -1).unsqueeze(0)


def test_schemas(comfy):
    nodes, _ = comfy
    assert set(nodes) == NODE_IDS
    for node_id, cls in nodes.items():
        s = cls.GET_SCHEMA()
        assert s.category.startswith("CogVideoX I2V/"), node_id
        assert s.description and s.display_name, node_id
        for i in s.inputs:
            assert i.tooltip, f"{node_id}.{i.id} has no tooltip"
    # the public contract: widget names and order
    assert [i.id for i in nodes["CogVidSampler"].GET_SCHEMA().inputs] == [
        "transformer", "conditioning", "image_latent", "frames", "steps", "cfg", "dynamic_cfg", "scheduler",
        "seed", "plan", "cache"]
    assert [i.id for i in nodes["CogVidTransformerLoader"].GET_SCHEMA().inputs] == [
        "model", "precision", "placement", "device", "speed"]


def test_model_lists_and_validation(comfy):
    nodes, _ = comfy
    opts = _options(nodes["CogVidTransformerLoader"], "model")
    assert "CogVideo/CogVideoX1.5-5B-I2V" in opts and "CogVideo/CogVideoX-5b-I2V" in opts
    assert any(o.startswith("diffusion_models/") for o in opts)
    assert not any(o.startswith("CogVideo/CogVideoX1.5-5B-I2V/") for o in opts)   # no shards of hub folders
    assert opts[-2:] == ["THUDM/CogVideoX1.5-5B-I2V", "THUDM/CogVideoX-5b-I2V"]
    assert any(o.startswith("text_encoders/t5xxl") for o in _options(nodes["CogVidT5Loader"], "model"))
    assert not any(o.startswith("vae/") for o in _options(nodes["CogVidT5Loader"], "model"))
    for bad in ("../../etc/passwd", "CogVideo/../../x", "diffusion_models/../vae/x.safetensors", "nope"):
        with pytest.raises(ValueError, match="not in the list"):
            run(nodes["CogVidTransformerLoader"], model=bad, precision="bf16", placement="auto", device="auto")
    with pytest.raises(ValueError, match="ComfyUI computes on cpu"):
        run(nodes["CogVidVAELoader"], model=opts[0], precision="fp32", placement="auto", device="cuda")


def _load(nodes, model, t5_model=None, vae_model=None, precision="fp32"):
    kw = dict(precision=precision, placement="auto", device="auto")
    tr = run(nodes["CogVidTransformerLoader"], model=model, **kw)[0]
    t5 = run(nodes["CogVidT5Loader"], model=t5_model or model, **kw)[0]
    vae = run(nodes["CogVidVAELoader"], model=vae_model or model, **kw)[0]
    return tr, t5, vae


def _encoded(nodes, model="CogVideo/CogVideoX1.5-5B-I2V", positive="x"):
    """The three loaders, the prompt's text encode (no negative) and a 96x64 image encode: where most node
    tests start."""
    tr, t5, vae = _load(nodes, model)
    cond = run(nodes["CogVidTextEncode"], t5=t5, positive=positive, negative="")[0]
    lat = run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=96, height=64, resize="crop")[0]
    return tr, t5, vae, cond, lat


def test_full_workflow_15_hub_folder(comfy):
    nodes, mods = comfy
    mm, fp = mods["comfy.model_management"], mods["folder_paths"]
    tr, t5, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    assert tr.variant.key == V15
    cond = run(nodes["CogVidTextEncode"], t5=t5, positive="a red fox runs", negative="")[0]
    assert cond["positive"].embeds.shape == (1, 226, 32)
    again = run(nodes["CogVidTextEncode"], t5=t5, positive="a red fox runs", negative="")[0]
    assert again["positive"] is cond["positive"]                      # prompt cache
    lat = run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=96, height=64, resize="crop")[0]
    report, chart, plan = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=17, width=96,
                              height=64, profile="auto", budget_gib=24.0).args[:3]
    assert "FITS" in report and chart.ndim == 4 and chart.shape[-1] == 3 and 0 <= chart.min() <= chart.max() <= 1
    comfy_stub.ProgressBar.updates.clear()
    latent = run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=2,
                 cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=1, plan=plan)[0]
    assert comfy_stub.ProgressBar.updates[-2:] == [(1, 2), (2, 2)]
    assert any(c[0] == "load_models_gpu" for c in mm.calls)
    images, fps = run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="auto", overlap=0.1667, plan=plan).args[:2]
    assert images.shape == (17, 64, 96, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and fps == 16.0
    out = run(nodes["CogVidSaveVideo"], images=images, fps=fps, filename_prefix="cogvid/test")
    saved = out.ui.as_dict()["images"][0]
    assert saved["type"] == "output" and saved["subfolder"] == "cogvid"
    path = Path(fp.get_output_directory()) / saved["subfolder"] / saved["filename"]
    assert path.is_file() and path.suffix == ".mp4" and path.stat().st_size > 0
    assert not list(path.parent.glob(".*partial*"))


def test_single_files_5b_and_ddim(comfy):
    nodes, _ = comfy
    tr_name = next(o for o in _options(nodes["CogVidTransformerLoader"], "model") if o.startswith("diffusion_models/"))
    t5_name = next(o for o in _options(nodes["CogVidT5Loader"], "model") if o.startswith("text_encoders/"))
    vae_name = next(o for o in _options(nodes["CogVidVAELoader"], "model") if o.startswith("vae/"))
    tr, t5, vae = _load(nodes, tr_name, t5_name, vae_name)
    assert tr.variant.key == V10
    cond = run(nodes["CogVidTextEncode"], t5=t5, positive="waves", negative="blur")[0]
    lat = run(nodes["CogVidImageEncode"], vae=vae, image=_image(40, 40), width=96, height=64, resize="pad")[0]
    latent = run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=9, steps=2,
                 cfg=1.0, dynamic_cfg=False, scheduler="ddim", seed=3)[0]
    images, fps = run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="off", overlap=0.0).args[:2]
    assert images.shape == (9, 64, 96, 3) and fps == 8.0
    with pytest.raises(ValueError, match="4N\\+1|frames"):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=10, steps=1,
            cfg=1.0, dynamic_cfg=False, scheduler="ddim", seed=3)


def test_memory_cooperation_and_interrupt(comfy, monkeypatch):
    nodes, mods = comfy
    mm = mods["comfy.model_management"]
    tr, t5, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    cond = run(nodes["CogVidTextEncode"], t5=t5, positive="x", negative="")[0]
    lat = run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=96, height=64, resize="stretch")[0]
    ours = [p for p in mm.current_loaded_models if getattr(p, "component", None) in (t5, vae)]
    assert len(ours) == 2                                # ComfyUI sees our models
    released = []
    from cogvid_core.run import session
    monkeypatch.setattr(session.Component, "release", lambda self: released.append(self.kind))
    mm.unload_all_models()                               # what POST /free {"unload_models": true} does
    monkeypatch.undo()
    assert sorted(released) == ["t5", "vae"] and not mm.current_loaded_models
    mm.vram_state = mm.VRAMState.LOW_VRAM                # ComfyUI started with --lowvram, no plan wired
    run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=1,
        cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=0)
    from cogvid_core.memory.activations import ff_chunk_tokens
    from cogvid_core.memory.placement import placed_of
    assert placed_of(tr.module).requested == "stream" and ff_chunk_tokens(tr.module) == 8192
    mm.interrupt_processing = True
    with pytest.raises(comfy_stub.InterruptProcessingException):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=3,
            cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=0)


def test_wrong_component_is_a_clear_error(comfy, models_root, tiny_ckpts):
    nodes, _ = comfy
    vae_file = tiny_ckpts[V10]["single"]["vae"]
    dst = models_root / "models" / "diffusion_models" / "zz_not_a_transformer.safetensors"
    shutil.copy(vae_file, dst)
    try:
        with pytest.raises(ValueError, match="VAE"):
            run(nodes["CogVidTransformerLoader"], model="diffusion_models/" + dst.name, precision="bf16",
                placement="auto", device="auto")
    finally:
        dst.unlink()


def test_loader_runs_again_when_its_file_changes(comfy, models_root, tiny_ckpts):
    """ComfyUI re-runs a node whose fingerprint changed: a file replaced under the same name is loaded
    again, not read at the cached model's old offsets."""
    nodes, _ = comfy
    dst = models_root / "models" / "vae" / "zz_replaced.safetensors"
    shutil.copy(tiny_ckpts[V10]["single"]["vae"], dst)
    try:
        fp = nodes["CogVidVAELoader"].fingerprint_inputs(model="vae/" + dst.name, precision="fp32",
                                                         placement="auto", device="auto")
        assert nodes["CogVidVAELoader"].fingerprint_inputs(model="vae/" + dst.name) == fp
        tmp = dst.with_suffix(".tmp")
        shutil.copy2(dst, tmp)                 # same bytes, same times: only the file identity differs
        os.replace(tmp, dst)
        assert nodes["CogVidVAELoader"].fingerprint_inputs(model="vae/" + dst.name) != fp
        folder = "CogVideo/CogVideoX1.5-5B-I2V"
        fp = nodes["CogVidTransformerLoader"].fingerprint_inputs(model=folder)
        assert len(fp[1]) >= 1 and all(p.endswith(".safetensors") and "transformer" in p for p, _ in fp[1])
    finally:
        dst.unlink()


@pytest.mark.parametrize("workflow", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "workflows").glob("*.json")))
def test_shipped_workflows_carry_one_value_per_widget(comfy, workflow):
    """The frontend maps widgets_values to widget inputs by position: a node's inputs added later must be
    in the shipped files too, and every value one of its input's options."""
    nodes, _ = comfy
    wf = json.loads((Path(__file__).resolve().parents[1] / "workflows" / workflow).read_text())
    ours = [n for n in wf["nodes"] if n["type"] in nodes]
    assert ours
    for n in ours:
        widgets = [i for i in nodes[n["type"]].GET_SCHEMA().inputs if i.io_type in ("COMBO", "INT", "FLOAT", "BOOLEAN", "STRING")]
        extra = sum(bool(i.kwargs.get("control_after_generate")) for i in widgets)
        assert len(n["widgets_values"]) == len(widgets) + extra, (workflow, n["type"])
        values = iter(n["widgets_values"])
        for i in widgets:
            value = next(values)
            if i.io_type == "COMBO" and i.id not in ("model", "lora"):     # file lists depend on the machine
                assert value in i.options, (workflow, n["type"], i.id, value)
            if i.kwargs.get("control_after_generate"):
                next(values)


def test_estimate_without_budget_on_cpu(comfy):
    nodes, _ = comfy
    report, chart, plan = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX-5B-I2V", frames=49, width=720,
                              height=480, profile="lowvram", budget_gib=0.0).args[:3]
    assert report.startswith("No verdict") and plan.profile_name == "lowvram"
    report, _, _ = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=81, width=1360,
                       height=768, profile="auto", budget_gib=1.5).args[:3]
    assert "DOES NOT FIT" in report


def test_sampler_step_cache(comfy):
    """cache pab on the Sampler: the transformer is hooked for the run only (a later run without a cache is
    the uncached video); fastercache on a one-branch profile is a clear error."""
    nodes, _ = comfy
    tr, t5, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    cond = run(nodes["CogVidTextEncode"], t5=t5, positive="a red fox runs", negative="")[0]
    lat = run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=96, height=64, resize="crop")[0]
    kw = dict(transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=4, cfg=6.0, dynamic_cfg=True,
              scheduler="dpm", seed=1)
    plain = run(nodes["CogVidSampler"], **kw)[0].samples
    cached = run(nodes["CogVidSampler"], cache="pab", **kw)[0].samples
    again = run(nodes["CogVidSampler"], cache="none", **kw)[0].samples
    assert (cached - plain).abs().max() > 1e-6 and torch.equal(again, plain)
    _, _, plan = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=17, width=96, height=64,
                     profile="lowvram", budget_gib=24.0, cache="fastercache").args[:3]
    with pytest.raises(ValueError, match="fastercache works on the batched CFG pair"):
        run(nodes["CogVidSampler"], cache="fastercache", plan=plan, **kw)


def test_estimate_counts_the_step_cache(comfy):
    """PAB holds each block's attention output per branch: at 81x768x1360 ~21.7 GiB on the GPU."""
    nodes, _ = comfy
    kw = dict(variant="CogVideoX1.5-5B-I2V", frames=81, width=1360, height=768, profile="resident", budget_gib=80.0)
    plain = run(nodes["CogVidVRAMEstimate"], **kw).args[2]
    pab = run(nodes["CogVidVRAMEstimate"], cache="pab", **kw).args[2]
    grown = pab.stage("denoise_step").peak_allocated - plain.stage("denoise_step").peak_allocated
    assert 21 * 2 ** 30 < grown < 22.5 * 2 ** 30
    assert [i.id for i in nodes["CogVidVRAMEstimate"].GET_SCHEMA().inputs][-2:] == ["cache", "transformer"]


def test_image_encode_with_a_lowvram_plan_is_the_untiled_latent(comfy):
    """Issue 30: a lowvram plan encodes in strips, the untiled encode's latent; at 400x256 the tiled encode
    it replaced (240x360 tiles) blended 2 x 2 tiles, a different latent and video."""
    nodes, _ = comfy
    vae = run(nodes["CogVidVAELoader"], model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp32", placement="auto",
              device="auto")[0]
    _, _, plan = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=17, width=400,
                     height=256, profile="lowvram", budget_gib=0.0).args[:3]
    image = _image(256, 400)
    plain = run(nodes["CogVidImageEncode"], vae=vae, image=image, width=400, height=256, resize="crop")[0]
    low = run(nodes["CogVidImageEncode"], vae=vae, image=image, width=400, height=256, resize="crop", plan=plan)[0]
    assert (low.mean - plain.mean).abs().max().item() <= 1e-5 and (low.std - plain.std).abs().max().item() <= 1e-5


def test_estimate_counts_the_speed_option(comfy):
    """FP8 attention holds float8 copies of q, k, v while sampling: the node's step estimate grows."""
    nodes, _ = comfy
    kw = dict(variant="CogVideoX1.5-5B-I2V", frames=81, width=1360, height=768, profile="lowvram", budget_gib=8.0)
    plain = run(nodes["CogVidVRAMEstimate"], **kw).args[2]
    fa3 = run(nodes["CogVidVRAMEstimate"], speed="fa3fp8", **kw).args[2]
    grown = fa3.stage("denoise_step").peak_allocated - plain.stage("denoise_step").peak_allocated
    assert 0.5 * 2 ** 30 < grown < 0.8 * 2 ** 30


# ------------------------------------------------------------------ real ComfyUI (optional)
REAL_SCRIPT = textwrap.dedent(r"""
    import asyncio, json, os, sys
    comfy_dir, pack_dir, base = sys.argv[1:4]
    import real_comfy
    real_comfy.enter(comfy_dir, base)
    import folder_paths
    folder_paths.set_output_directory(os.path.join(base, "output"))
    import nodes, execution, torch
    import comfy.model_management as mm
    ok = asyncio.run(nodes.load_custom_node(pack_dir, module_parent="custom_nodes"))
    assert ok, "pack did not load"
    N = nodes.NODE_CLASS_MAPPINGS
    ids = sorted(k for k in N if k.startswith("CogVid"))
    info = {k: N[k].GET_NODE_INFO_V1() for k in ids}
    uid = iter(range(1000))
    def call(node_id, **inputs):
        cls = N[node_id]
        out, ui, _, _ = asyncio.run(execution.get_output_data("p", str(next(uid)), cls(),
                                    {k: [v] for k, v in inputs.items()}, hidden_inputs={}))
        return [o[0] for o in out], ui
    model = "CogVideo/CogVideoX1.5-5B-I2V"
    kw = dict(precision="fp32", placement="auto", device="auto")
    (tr,), _ = call("CogVidTransformerLoader", model=model, **kw)
    (t5,), _ = call("CogVidT5Loader", model=model, **kw)
    (vae,), _ = call("CogVidVAELoader", model=model, **kw)
    (cond,), _ = call("CogVidTextEncode", t5=t5, positive="a fox", negative="")
    img = torch.rand(1, 70, 110, 3)
    (lat,), _ = call("CogVidImageEncode", vae=vae, image=img, width=96, height=64, resize="crop")
    (report, chart, plan, *_), _ = call("CogVidVRAMEstimate", variant="CogVideoX1.5-5B-I2V", frames=17, width=96,
                                    height=64, profile="auto", budget_gib=0.0)
    loaded = [type(m).__name__ for m in mm.loaded_models()]
    (latent,), _ = call("CogVidSampler", transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=2,
                        cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=0, plan=plan)
    (images, fps, _video), _ = call("CogVidDecode", vae=vae, latent=latent, tile="auto", overlap=0.1667, plan=plan)
    _, ui = call("CogVidSaveVideo", images=images, fps=fps, filename_prefix="cogvid/real")
    n_before = len(mm.current_loaded_models)
    mm.unload_all_models()
    print(json.dumps({"ids": ids, "shape": list(images.shape), "fps": fps, "ui": ui, "loaded": loaded,
                      "n_before": n_before, "n_after": len(mm.current_loaded_models),
                      "categories": sorted({v["category"] for v in info.values()})}))
""")


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_real_comfyui(models_root, tmp_path):
    script = tmp_path / "real.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" + REAL_SCRIPT)
    pack = tmp_path / "custom_nodes" / "comfyui-cogvid-i2v"
    shutil.copytree(REPO, pack, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv", "venv"))
    result = real_comfy.run_script(script, pack, models_root, timeout=600)
    assert set(result["ids"]) == NODE_IDS
    assert result["shape"] == [17, 64, 96, 3] and result["fps"] == 16.0
    assert result["ui"]["images"][0]["filename"].endswith(".mp4")
    assert "CogVidPatcher" in result["loaded"]                   # ComfyUI's memory manager lists our models
    assert result["n_after"] == 0 < result["n_before"]
    assert all(c.startswith("CogVideoX I2V/") for c in result["categories"])
