"""What a ComfyUI user meets around the nodes: short tooltips, shipped workflows that explain themselves
and make a new video on Run again, their titles in Browse Templates, Save Video's frame rate without
its wire, a model gone from disk."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_nodes import comfy, models_root  # noqa: F401  (fixture re-export)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
TOOLTIP_MAX = 350      # a tooltip says what the choice does and costs; measured numbers live in the README


def test_every_tooltip_is_short(comfy):
    nodes, _ = comfy
    long = {f"{node_id}.{i.id}": len(i.tooltip) for node_id, cls in nodes.items()
            for i in cls.GET_SCHEMA().inputs if i.tooltip and len(i.tooltip) > TOOLTIP_MAX}
    assert not long, f"tooltips over {TOOLTIP_MAX} characters: {long}"


def _loader(nodes, loader, model):
    return nodes[loader].EXECUTE_NORMALIZED(model=model, precision="fp32", placement="auto", device="auto")


def test_a_model_gone_from_disk_says_so_and_to_refresh(comfy, models_root, tiny_ckpts):
    """The list was read when the page loaded; the folder or file went away before Queue."""
    import shutil
    nodes, _ = comfy
    folder = models_root / "models" / "CogVideo" / "zz_moved"
    shutil.copytree(tiny_ckpts["cogvideox-5b-i2v"]["hf"], folder)
    single = models_root / "models" / "vae" / "zz_moved_vae.safetensors"
    shutil.copy(tiny_ckpts["cogvideox-5b-i2v"]["single"]["vae"], single)
    shown = nodes["CogVidVAELoader"].GET_SCHEMA().inputs[0].options
    assert "CogVideo/zz_moved" in shown and "vae/zz_moved_vae.safetensors" in shown
    shutil.rmtree(folder)
    single.unlink()
    for loader, name, where in (("CogVidTransformerLoader", "CogVideo/zz_moved", folder),
                                ("CogVidVAELoader", "vae/zz_moved_vae.safetensors", single)):
        with pytest.raises(ValueError) as e:
            _loader(nodes, loader, name)
        text = str(e.value)
        assert "gone from disk" in text and str(where) in text and "press R" in text, text
    # a name of another loader's folder, or one climbing out of the models folders, is still just not listed
    for name in ("vae/zz_moved_vae.safetensors", "CogVideo/../zz_moved", "diffusion_models/"):
        with pytest.raises(ValueError, match="not in the list"):
            _loader(nodes, "CogVidTransformerLoader", name)


def _saved_rate(nodes, root, images, fps) -> float:
    import imageio_ffmpeg
    out = nodes["CogVidSaveVideo"].EXECUTE_NORMALIZED(images=images, fps=fps, filename_prefix="ux/fps")
    saved = out.ui.as_dict()["images"][0]
    reader = imageio_ffmpeg.read_frames(str(root / "output" / saved["subfolder"] / saved["filename"]))
    try:
        return next(reader)["fps"]
    finally:
        reader.close()


@pytest.mark.parametrize("frames, rate", [(49, 8.0), (33, 8.0), (81, 16.0), (161, 16.0)])
def test_save_video_without_its_fps_wire_takes_the_rate_from_the_frame_count(comfy, models_root, frames, rate):
    """Without the wire the widget's value runs: a new node's default (0) means 'from the frame count'."""
    import torch
    nodes, _ = comfy
    spec = next(i for i in nodes["CogVidSaveVideo"].GET_SCHEMA().inputs if i.id == "fps")
    images = torch.rand(frames, 16, 16, 3)
    assert _saved_rate(nodes, models_root, images, spec.default) == rate
    assert _saved_rate(nodes, models_root, images, 12.0) == 12.0     # a rate given (wire or typed) is kept


@pytest.mark.parametrize("workflow", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_shipped_workflows_explain_themselves_and_make_a_new_video_each_run(comfy, workflow):
    """A Note (core's node) says what the workflow is for, the card, which files go where, what to change
    (and nothing the wired graph already does for the user);
    every seed ships 'randomize' (the frontend stores the control value right after the seed's), as core's
    templates do, so Run again samples a new video instead of returning the cached one."""
    nodes, _ = comfy
    wf = json.loads((WORKFLOWS / workflow).read_text())
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, workflow
    text = notes[0]["widgets_values"][0]
    for must in ("For:", "card", "models/CogVideo/", "Less memory:", "Faster:", "speed = fastest"):
        assert must in text, (workflow, must)
    # the Estimate reads speed and LoRAs from the wired transformer: the note must not ask the user to type
    # them again, nor repeat what no longer holds (compile turning itself off with LoRAs, sessions ago)
    estimate = next(n for n in wf["nodes"] if n["type"] == "CogVidVRAMEstimate")
    assert any(i["name"] == "transformer" and i.get("link") is not None for i in estimate["inputs"]), workflow
    for stale in ("lora_mib", "Estimate's speed", "itself off"):
        assert stale not in text, (workflow, stale)
    assert wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    seeds = 0
    for n in (n for n in wf["nodes"] if n["type"] in nodes):
        widgets = [i for i in nodes[n["type"]].GET_SCHEMA().inputs if i.io_type in ("COMBO", "INT", "FLOAT", "BOOLEAN", "STRING")]
        values = iter(n["widgets_values"])
        for i in widgets:
            next(values)
            if i.kwargs.get("control_after_generate"):
                assert next(values) == "randomize", (workflow, n["type"], i.id)
                seeds += 1
    assert seeds == 1, workflow


@pytest.mark.parametrize("workflow", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_the_chart_is_readable_at_the_saved_zoom(workflow):
    """The chart's smallest text, as drawn into the workflow's Preview Image node at the saved zoom, is
    at least 9 screen pixels high (it was ~5), and the verdict is on it."""
    from cogvid_core.plan import chart
    wf = json.loads((WORKFLOWS / workflow).read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "PreviewImage")
    chart_w = 800                                      # chart_image's default width
    on_screen = node["size"][0] / chart_w * wf["extra"]["ds"]["scale"]
    assert chart_w * chart.FONT_TEXT * on_screen >= 9, (workflow, on_screen)


# Browse Templates (frontend 1.27 and 1.58) shows a custom node pack's workflow by its file name alone:
# the card's title (2 lines of ~24 characters, then cut) and, with '-' and '_' as spaces, the line under
# it (2 lines of ~32). The frontend puts the name unescaped into /api/workflow_templates/<pack>/<name>.jpg.
TITLE_MAX = 64
TITLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .+-]*[A-Za-z0-9]")   # no URL (#?%&) or Windows (:/\\*"<>|) specials
VARIANT_TITLE = {"CogVideoX1.5-5B-I2V": "CogVideoX1.5 I2V", "CogVideoX-5B-I2V": "CogVideoX-5B I2V"}


@pytest.mark.parametrize("workflow", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_shipped_workflow_names_are_titles(workflow):
    """The file name says the variant, the card its Note is for, LoRA when it has one and the video its
    VRAM Estimate plans, in characters safe in a URL and a Windows file name; its .jpg thumbnail is there."""
    assert len(workflow) <= TITLE_MAX and TITLE.fullmatch(workflow) and "  " not in workflow, workflow
    assert (WORKFLOWS / f"{workflow}.jpg").is_file(), workflow
    wf = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    variant, frames, width, height = by_type["CogVidVRAMEstimate"]["widgets_values"][:4]
    assert workflow.startswith(VARIANT_TITLE[variant]), (workflow, variant)
    assert f"{frames} frames {width}x{height}" in workflow
    assert ("LoRA" in workflow) == ("CogVidLoraLoader" in by_type), workflow
    card = re.search(r"For: ([^.(;]+)", by_type["Note"]["widgets_values"][0]).group(1).strip()
    assert re.fullmatch(r"(\d+ GB( and \d+ GB)? cards|any card)", card) and card in workflow, (workflow, card)


def test_thumbnails_are_distinct_square_cards(tmp_path):
    """Browse Templates draws a thumbnail in a 256x256 box: square and at least that big, and no two
    alike (they were four letterboxed screenshots of the same graph). tools/workflow_thumbnails.py,
    which made them, renders every shipped workflow."""
    from PIL import Image, ImageChops, ImageStat
    import importlib.util
    thumbs = {p.stem: Image.open(p).convert("RGB") for p in sorted(WORKFLOWS.glob("*.jpg"))}
    assert set(thumbs) == {p.stem for p in WORKFLOWS.glob("*.json")}
    for name, im in thumbs.items():
        assert im.width == im.height >= 256, (name, im.size)
    small = {k: im.resize((64, 64)) for k, im in thumbs.items()}
    names = sorted(small)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert max(ImageStat.Stat(ImageChops.difference(small[a], small[b])).mean) > 20, (a, b)
    spec = importlib.util.spec_from_file_location("workflow_thumbnails", ROOT / "tools" / "workflow_thumbnails.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for p in WORKFLOWS.glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text())
    assert tool.main(["--workflows", str(tmp_path)]) == 0
    assert sorted(p.stem for p in tmp_path.glob("*.jpg")) == names

def test_the_template_category_is_the_pack_name():
    """The category is the one text of Browse Templates a pack can translate: the frontend looks up
    templateWorkflows.category.<custom_nodes folder, '.' as '_'> in the merged locales/<lang>/main.json,
    else shows the folder name. Named for the folders users get: ComfyUI Manager's registry install
    (pyproject's name), a git clone (the repository's name) and GitHub's Download ZIP (<name>-main)."""
    tomllib = pytest.importorskip("tomllib")             # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    display = cfg["tool"]["comfy"]["DisplayName"]
    repo = cfg["project"]["urls"]["Repository"].rstrip("/").rsplit("/", 1)[-1]
    locale = json.loads((ROOT / "locales" / "en" / "main.json").read_text())
    assert list(locale) == ["templateWorkflows"]          # nothing else of the frontend's text is touched
    categories = locale["templateWorkflows"]["category"]
    for folder in (cfg["project"]["name"], repo, f"{repo}-main"):
        assert categories[folder.replace(".", "_")] == display, folder
