"""Issue 31: a plan is for one video, and the nodes refuse to apply it to another; frames the variant
cannot make are refused where the variant is first known (the VRAM Estimate, the Sampler before it loads).

Through the nodes as ComfyUI runs them (tests/comfy_stub.py, tiny checkpoints), plus the check itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogvid_core.model import variants as M
from cogvid_core.model.vae import VideoLatents
from cogvid_core.plan.estimate import estimate
from cogvid_core.plan.match import PlanMismatch, plan_mismatch
from test_nodes import _encoded, _image, _load, comfy, models_root, run  # noqa: F401  (fixtures)

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SAMPLE = dict(steps=1, cfg=1.0, dynamic_cfg=False, scheduler="dpm", seed=0)


def _plan(nodes, variant="CogVideoX1.5-5B-I2V", frames=17, width=96, height=64):
    return run(nodes["CogVidVRAMEstimate"], variant=variant, frames=frames, width=width, height=height,
               profile="balanced", budget_gib=24.0).args[2]


def _loads(mm) -> int:
    return sum(c[0] == "load_models_gpu" for c in mm.calls)


def test_the_check_names_each_difference_and_its_widget():
    plan = estimate(M.V15, 17, 192, 320, "balanced")
    assert plan_mismatch(plan, M.V15, 17, 192, 320) is None and plan_mismatch(None, M.V10, 9, 1, 1) is None
    assert plan_mismatch(plan, None, None, None, None) is None          # nothing known: nothing compared
    msg = plan_mismatch(plan, M.V10.key, 33, 272, 480)
    assert msg.startswith("the VRAM Estimate's plan is for 17 frames at 320x192 of CogVideoX1.5-5B-I2V, but ")
    assert "the loaded transformer is CogVideoX-5B-I2V" in msg and "variant to CogVideoX-5B-I2V" in msg
    assert "set the VRAM Estimate's frames to 33 (or the Sampler's to 17)" in msg
    assert "set the VRAM Estimate's width/height to 480x272 (or the Image Encode's to 320x192)" in msg
    assert "\n" not in msg


def test_image_encode_refuses_a_plan_for_another_size(comfy):
    """Seen in the real frontend: Image Encode at 480x272 with the estimate at 320x192 ran and said FITS."""
    nodes, _ = comfy
    _, _, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    plan = _plan(nodes, width=320, height=192)
    with pytest.raises(PlanMismatch, match=r"plan is for 17 frames at 320x192 of CogVideoX1\.5-5B-I2V, but the "
                                           r"Image Encode makes 480x272: set the VRAM Estimate's width/height to "
                                           r"480x272 \(or the Image Encode's to 320x192\)"):
        run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=480, height=272, resize="crop", plan=plan)
    lat = run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=320, height=192, resize="crop", plan=plan)[0]
    assert (lat.height, lat.width) == (192, 320)


def test_sampler_refuses_a_plan_for_other_frames_before_loading(comfy):
    """Seen in the real frontend: Sampler frames 33 with the estimate at 17 ran silently."""
    nodes, mods = comfy
    tr, _, _, cond, lat = _encoded(nodes)
    plan, loads = _plan(nodes, frames=17), _loads(mods["comfy.model_management"])
    with pytest.raises(PlanMismatch, match=r"the Sampler makes 33 frames: set the VRAM Estimate's frames to 33 "
                                           r"\(or the Sampler's to 17\)"):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=33, plan=plan,
            **SAMPLE)
    assert _loads(mods["comfy.model_management"]) == loads               # the transformer never moved
    # an Image Encode without the plan wired: the Sampler still sees the size differ
    with pytest.raises(PlanMismatch, match="the Image Encode makes 96x64: set the VRAM Estimate's width/height"):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17,
            plan=_plan(nodes, width=320, height=192), **SAMPLE)


def test_sampler_refuses_a_plan_for_the_other_variant(comfy):
    """Seen in the real frontend: the 1.5 variant on the estimate of the 5B workflow ran silently."""
    nodes, _ = comfy
    tr, _, _, cond, lat = _encoded(nodes, model="CogVideo/CogVideoX-5b-I2V")
    assert tr.variant is M.V10
    with pytest.raises(PlanMismatch, match="the loaded transformer is CogVideoX-5B-I2V.*set the VRAM Estimate's "
                                           "variant to CogVideoX-5B-I2V"):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=9,
            plan=_plan(nodes), **SAMPLE)


def test_decode_refuses_a_plan_for_another_video(comfy):
    nodes, _ = comfy
    _, _, vae = _load(nodes, "CogVideo/CogVideoX1.5-5B-I2V")
    latent = VideoLatents(samples=torch.zeros(1, 6, 16, 8, 12), frames=17, height=64, width=96,
                          variant_key=M.V15.key, fps=16, drop_first=1)
    with pytest.raises(PlanMismatch, match="the Sampler makes 17 frames: set the VRAM Estimate's frames to 17"):
        run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="auto", overlap=0.1667, plan=_plan(nodes, frames=33))


@pytest.mark.parametrize("frames", [21, 85, 93])
def test_estimate_refuses_frames_the_variant_cannot_make(comfy, frames):
    """1.5 takes 16N+1 frames: 21 was estimated (with a lower decode peak than 17) and failed at the Sampler."""
    nodes, _ = comfy
    with pytest.raises(ValueError) as engine:
        M.check_video_shape(M.V15, M.transformer_config(M.V15), frames, 768, 1360)
    with pytest.raises(ValueError) as node:
        _plan(nodes, frames=frames, width=1360, height=768)
    assert str(node.value) == str(engine.value) and "16N+1" in str(node.value)


def test_estimate_refuses_a_size_or_length_the_5b_cannot_make(comfy):
    nodes, _ = comfy
    with pytest.raises(ValueError, match="only generates 720x480"):
        _plan(nodes, variant="CogVideoX-5B-I2V", frames=49, width=1360, height=768)
    with pytest.raises(ValueError, match="at most 49 frames"):
        _plan(nodes, variant="CogVideoX-5B-I2V", frames=53, width=720, height=480)


def test_sampler_refuses_frames_before_loading(comfy):
    nodes, mods = comfy
    tr, _, _, cond, lat = _encoded(nodes)
    loads = _loads(mods["comfy.model_management"])
    with pytest.raises(ValueError, match=r"takes 16N\+1 frames .* got 21: try 17 or 33"):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=21, **SAMPLE)
    assert _loads(mods["comfy.model_management"]) == loads


def _widgets(node: dict, nodes) -> dict:
    """A saved node's widget values by input name (the frontend's positional mapping)."""
    names = []
    for i in nodes[node["type"]].GET_SCHEMA().inputs:
        if i.io_type in ("COMBO", "INT", "FLOAT", "BOOLEAN", "STRING"):
            names += [i.id] + (["control"] if i.kwargs.get("control_after_generate") else [])
    return dict(zip(names, node["widgets_values"]))


@pytest.mark.parametrize("workflow", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_shipped_workflows_plan_their_own_video(comfy, workflow):
    """Workflows saved today keep running: their estimate's plan matches their loader, encode and sampler."""
    nodes, _ = comfy
    saved = {n["type"]: _widgets(n, nodes) for n in json.loads((WORKFLOWS / workflow).read_text())["nodes"]
             if n["type"] in nodes}
    est, enc, smp = saved["CogVidVRAMEstimate"], saved["CogVidImageEncode"], saved["CogVidSampler"]
    variant = next(v for v in M.VARIANTS.values() if saved["CogVidTransformerLoader"]["model"].endswith(v.folder))
    plan = _plan(nodes, est["variant"], est["frames"], est["width"], est["height"])
    assert plan_mismatch(plan, variant, smp["frames"], enc["height"], enc["width"]) is None


# -- entered once: the estimate reads the transformer and hands the shape on ----------------------------

SAVED_BEFORE = Path(__file__).resolve().parent / "data" / "cogvideox1.5_i2v_12gb_saved_2026-12-06.json"


def _links_into(wf: dict, node: dict) -> dict:
    """{input name: (source node type, source slot)} of ``node``'s wired inputs."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    by_id = {ln[0]: ln for ln in wf["links"]}
    return {i["name"]: (nodes[by_id[i["link"]][1]]["type"], by_id[i["link"]][2])
            for i in node.get("inputs", []) if i.get("link") is not None}


@pytest.mark.parametrize("workflow", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_shipped_workflows_type_the_shape_once(comfy, workflow):
    """The frames and size are typed on the estimate only: its outputs 3-5 feed the Sampler's frames and the
    Image Encode's width/height (widget inputs), and the transformer the Sampler gets feeds the estimate."""
    nodes, _ = comfy
    wf = json.loads((WORKFLOWS / workflow).read_text())
    by = {n["type"]: n for n in wf["nodes"]}
    names = [o.display_name for o in nodes["CogVidVRAMEstimate"].GET_SCHEMA().outputs]
    assert names[3:] == ["frames", "width", "height"]
    smp, enc, est = (_links_into(wf, by[t]) for t in ("CogVidSampler", "CogVidImageEncode", "CogVidVRAMEstimate"))
    assert smp["frames"] == ("CogVidVRAMEstimate", 3)
    assert (enc["width"], enc["height"]) == (("CogVidVRAMEstimate", 4), ("CogVidVRAMEstimate", 5))
    assert est["transformer"] == smp["transformer"]


def test_a_workflow_saved_before_the_wiring_still_maps_its_widgets_and_plans_its_video(comfy):
    """Today's saved workflows (no links into frames/width/height, no transformer on the estimate) load
    as they are: the new input is optional and last, the new outputs come after the old ones, so every
    saved widget value and link slot still means what it meant."""
    nodes, _ = comfy
    old = json.loads(SAVED_BEFORE.read_text())
    saved = {n["type"]: _widgets(n, nodes) for n in old["nodes"] if n["type"] in nodes}
    est_node = next(n for n in old["nodes"] if n["type"] == "CogVidVRAMEstimate")
    assert len(saved["CogVidVRAMEstimate"]) == len(est_node["widgets_values"]) and not est_node["inputs"]
    schema = nodes["CogVidVRAMEstimate"].GET_SCHEMA()
    assert [o.display_name for o in schema.outputs][:3] == [o["name"] for o in est_node["outputs"]]
    assert schema.inputs[-1].id == "transformer" and schema.inputs[-1].optional
    plan = _plan(nodes, saved["CogVidVRAMEstimate"]["variant"], 81, 1360, 768)
    assert plan_mismatch(plan, M.V15, saved["CogVidSampler"]["frames"], saved["CogVidImageEncode"]["height"],
                         saved["CogVidImageEncode"]["width"]) is None


def test_the_estimate_takes_variant_lora_and_speed_from_the_wired_transformer(comfy):
    """A 5B transformer wired in: the estimate is for 5B whatever its variant widget says; its outputs hand
    the typed shape on unchanged."""
    nodes, _ = comfy
    tr, _, _ = _load(nodes, "CogVideo/CogVideoX-5b-I2V")
    out = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=9, width=720, height=480,
              profile="balanced", budget_gib=24.0, transformer=tr).args
    report, plan = out[0], out[2]
    assert plan.variant_key == M.V10.key and out[3:] == (9, 720, 480)
    assert "from the wired transformer" in report
    assert plan_mismatch(plan, tr.variant, 9, 480, 720) is None
    kw = dict(frames=9, width=720, height=480, profile="balanced", budget_gib=24.0)
    wired = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", speed="exact", precision="bf16",
                transformer=tr.with_speed("fa3fp8"), **kw).args[2]
    typed = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX-5B-I2V", speed="fa3fp8", precision="fp32", **kw).args[2]
    assert wired.stages == typed.stages and wired.precision == typed.precision


def test_sampler_refuses_a_plan_made_for_another_cache(comfy):
    nodes, _ = comfy
    tr, _, _, cond, lat = _encoded(nodes)
    plan = _plan(nodes)
    with pytest.raises(PlanMismatch, match=r"the Sampler's cache is pab: set the VRAM Estimate's cache to pab"):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, plan=plan,
            cache="pab", **SAMPLE)


# ------------------------------------------------------------------------------- a plan for a bigger card
def test_a_plan_beyond_the_card_is_named_with_its_fix():
    """The 24 GB workflow plans for budget_gib 22 whatever the card: on an 8 GB card its plan reads the
    weights and runs out of memory (H100 fault run, session 15). A plan whose predicted reserved peak
    exceeds the card's whole memory is refused; one that may fit is not."""
    from cogvid_core.device.devmem import GiB
    from cogvid_core.plan.match import plan_beyond_card
    plan = estimate(M.V15, 81, 768, 1360, "resident", budget_bytes=22 * GiB)
    msg = plan_beyond_card(plan, 8 * GiB)
    assert msg.startswith("the VRAM Estimate's plan (resident, made for a 22.0 GiB budget) needs ~")
    assert "this GPU has 8.0 GiB in all: set the VRAM Estimate's budget_gib to 0" in msg and "\n" not in msg
    assert plan_beyond_card(plan, 80 * GiB) is None and plan_beyond_card(None, GiB) is None
    assert plan_beyond_card(plan, None) is None                                          # no GPU: not judged
    assert plan_beyond_card(estimate(M.V15, 81, 768, 1360, "resident"), GiB) is None     # no budget: not judged
    edge = plan.peak_reserved
    assert plan_beyond_card(plan, edge) is None and plan_beyond_card(plan, edge - 1) is not None


def test_sampler_refuses_a_plan_beyond_the_card_before_loading_and_the_estimate_says_so(comfy, monkeypatch):
    """Through the nodes: the VRAM Estimate's report says the plan does not fit this GPU; the Sampler
    refuses it before the transformer moves (an 8 GB card, the card's size faked on the CPU)."""
    from cogvid_core.plan.match import PlanBeyondCard
    nodes, mods = comfy
    common = __import__(nodes["CogVidSampler"].__module__.rsplit(".", 1)[0] + ".common", fromlist=["x"])
    tr, _, _, cond, lat = _encoded(nodes)
    report, _, plan = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=17, width=96,
                          height=64, profile="resident", budget_gib=22.0).args[:3]
    assert "DOES NOT FIT THIS GPU" not in report                      # the CPU: no card to compare with
    monkeypatch.setattr(common, "card_bytes", lambda device: plan.peak_reserved - 1)
    report = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=17, width=96, height=64,
                 profile="resident", budget_gib=22.0).args[0]
    assert "DOES NOT FIT THIS GPU: the VRAM Estimate's plan (resident, made for a 22.0 GiB budget)" in report
    loads = _loads(mods["comfy.model_management"])
    with pytest.raises(PlanBeyondCard, match=r"in all: set the VRAM Estimate's budget_gib to 0 to plan for this GPU"):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, plan=plan,
            **SAMPLE)
    assert _loads(mods["comfy.model_management"]) == loads and all(t.is_meta for t in tr.module.parameters())
    monkeypatch.setattr(common, "card_bytes", lambda device: 80 * 1024 ** 3)
    assert run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, plan=plan,
               **SAMPLE)[0].frames == 17
