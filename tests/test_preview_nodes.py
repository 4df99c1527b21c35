"""Live previews, node side: the Sampler's preview goes through ComfyUI's own latent preview path
(``latent_preview.get_previewer`` with our latent format, the preview tuple on the step's ProgressBar
update) and honours the user's preview method; "none" builds no previewer and the engine gets no
preview callback.

Against the stub (tests/comfy_stub_preview.py fakes core's path) always; against the REAL latent_preview,
comfy.utils and progress hook of the ComfyUI checkout named by COMFYUI_DIR in a subprocess (COMFYUI_PYTHON:
a python that can import it), skipped without it. The real server and its websocket:
tests/test_preview_server.py.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import pytest

import comfy_stub
import real_comfy
from test_nodes import _encoded, comfy, load_pack, models_root, run  # noqa: F401  (fixtures used by name)

STEPS = 2


def _sample(nodes, steps=STEPS):
    tr, _t5, _vae, cond, lat = _encoded(nodes)          # tiny 1.5, 17 frames at 96x64: 12x8 latent pixels
    return run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17,
               steps=steps, cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=0)[0]


def _spy_engine(monkeypatch):
    """The callbacks the node hands cogvid_core's sample (patched in its home module: api looks it up)."""
    from cogvid_core.run import sampling
    seen, real = {}, sampling.sample

    def spy(*a, **kw):
        seen.update(progress=kw.get("progress"), preview=kw.get("preview"))
        return real(*a, **kw)
    monkeypatch.setattr(sampling, "sample", spy)
    return seen


def test_previews_off_by_default_no_preview_work(comfy, monkeypatch):
    """Core's default preview method is none: no previewer, no engine callback, progress as before."""
    nodes, mods = comfy
    seen = _spy_engine(monkeypatch)
    _sample(nodes)
    preview_mod = mods["latent_preview"]
    assert preview_mod.Latent2RGBPreviewer.built == [] and seen["preview"] is None and seen["progress"] is not None
    assert comfy_stub.ProgressBar.updates[-STEPS:] == [(1, STEPS), (2, STEPS)] and comfy_stub.ProgressBar.previews == []


@pytest.mark.parametrize("method", ["latent2rgb", "auto"])
def test_one_preview_per_step(comfy, monkeypatch, method):
    """latent2rgb (and auto, which core maps to it): one JPEG preview per step on the step's progress
    update, of the middle latent frame, through our 16x3 table."""
    nodes, mods = comfy
    args = mods["comfy.cli_args"].args
    monkeypatch.setattr(args, "preview_method", mods["comfy.cli_args"].LatentPreviewMethod(method))
    seen = _spy_engine(monkeypatch)
    _sample(nodes)
    previewer = mods["latent_preview"].Latent2RGBPreviewer
    assert len(previewer.built) == 1 and previewer.built[0].factors.shape == (3, 16)
    assert previewer.decoded == [(1, 16, 8, 12)] * STEPS and seen["progress"] is None
    previews = comfy_stub.ProgressBar.previews
    assert [(v, t) for v, t, _ in previews] == [(1, STEPS), (2, STEPS)]
    assert all(p[0] == "JPEG" and p[1].size == (12, 8) and p[2] == 512 for _, _, p in previews)
    assert comfy_stub.ProgressBar.updates[-STEPS:] == [(1, STEPS), (2, STEPS)]   # one update per step


# -------------------------------------------------------------- against a real ComfyUI (optional)
def scenario_previews(nodes, method):
    """In real ComfyUI: the Sampler with the given preview method; what the progress hook received."""
    import comfy.utils
    import latent_preview
    from comfy.cli_args import args, LatentPreviewMethod
    hooked, built = [], []
    real_init = latent_preview.Latent2RGBPreviewer.__init__

    def counting_init(self, *a, **kw):
        built.append(1)
        real_init(self, *a, **kw)
    latent_preview.Latent2RGBPreviewer.__init__ = counting_init
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None, prompt_id=None:
                                             hooked.append((value, total, preview)))
    args.preview_method = LatentPreviewMethod(method)
    try:
        _sample(nodes)
    finally:
        latent_preview.Latent2RGBPreviewer.__init__ = real_init
        comfy.utils.set_progress_bar_global_hook(None)
    previews = [p for _, _, p in hooked if p is not None]
    return {"updates": [[v, t] for v, t, _ in hooked], "built": len(built),
            "previews": [[p[0], type(p[1]).__name__, list(p[1].size), p[2]] for p in previews]}


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_previews_in_real_comfyui(models_root):
    results = real_comfy.run_script(__file__, models_root)
    assert not any(isinstance(r, str) for r in results.values()), "\n".join(map(str, results.values()))
    on, off = results["latent2rgb"], results["none"]
    assert on["built"] == 1 and on["updates"] == [[1, STEPS], [2, STEPS]]
    assert on["previews"] == [["JPEG", "Image", [12, 8], on["previews"][0][3]]] * STEPS
    assert off == {"updates": [[1, STEPS], [2, STEPS]], "built": 0, "previews": []}


def _main(comfy_dir: str, base: str) -> None:
    """In a fresh process: real ComfyUI on the CPU, the pack imported as ComfyUI imports it, the Sampler run
    with latent2rgb then none; prints {method: result | traceback} as the last line."""
    real_comfy.enter(comfy_dir, base)
    results = {}
    nodes = load_pack("cogvid_real_preview")
    for method in ("latent2rgb", "none"):
        try:
            results[method] = scenario_previews(nodes, method)
        except BaseException:                  # noqa: BLE001 - reported per method
            results[method] = f"{method}:\n{traceback.format_exc()}"
    print(json.dumps(results))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
