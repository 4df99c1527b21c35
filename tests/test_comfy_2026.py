"""The pack on the 2026 ComfyUI contract, with the stub: core's VIDEO from Decode, folders registered
in ComfyExtension.on_load (and still on 0.3.64, which never calls it), and interrupts that derive
from BaseException passing through the nodes while the models are still released."""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from fractions import Fraction

import pytest

import comfy_stub
from test_nodes import _encoded, REPO, _counter, _image, comfy, models_root, run  # noqa: F401  (fixtures)


class Interrupt2026(BaseException):
    """ComfyUI 2026's InterruptProcessingException: no longer an Exception."""


def _import_pack(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _chain_10(nodes, frames=9):
    """The 5B-I2V (1.0) tiny model through load, encode and one sampling step."""
    tr, t5, vae, cond, lat = _encoded(nodes, "CogVideo/CogVideoX-5b-I2V", positive="waves")
    latent = run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=frames, steps=1,
                 cfg=1.0, dynamic_cfg=False, scheduler="ddim", seed=0)[0]
    return tr, cond, lat, vae, latent


def test_decode_offers_image_fps_and_core_video(comfy):
    nodes, _ = comfy
    outputs = nodes["CogVidDecode"].GET_SCHEMA().outputs
    assert [o.io_type for o in outputs] == ["IMAGE", "FLOAT", "VIDEO"]
    assert [o.display_name for o in outputs] == ["images", "fps", "video"]
    *_, vae, latent = _chain_10(nodes)
    images, fps, video = run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="off", overlap=0.0).args
    assert images.shape == (9, 64, 96, 3) and fps == 8.0
    parts = video.get_components()
    assert parts.images is images                     # the same frames, not a copy
    assert parts.frame_rate == Fraction(8) and parts.audio is None
    assert video.get_dimensions() == (96, 64)


def test_ntsc_frame_rate_stays_a_small_fraction(comfy):
    nodes, _ = comfy
    video_mod = sys.modules[nodes["CogVidDecode"].__module__.rsplit(".", 1)[0] + ".video"]
    rate = video_mod.as_video(_image(), 24000 / 1001).get_components().frame_rate
    assert rate == Fraction(24000, 1001)


def test_on_load_registers_folders_before_nodes_are_listed(models_root):
    mods = comfy_stub.install(str(models_root))
    try:
        fp = mods["folder_paths"]
        name = f"cogvid_pack_{next(_counter)}"
        ext = asyncio.run(_import_pack(name).comfy_entrypoint())
        assert "CogVideo" not in fp.folder_names_and_paths
        asyncio.run(ext.on_load())                     # 2026: awaited first
        assert fp.get_folder_paths("CogVideo") == [str(models_root / "models" / "CogVideo")]
        assert f"{name}.nodes.loaders" not in sys.modules   # nothing listed yet
        nodes = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
        model_input = next(i for i in nodes["CogVidTransformerLoader"].GET_SCHEMA().inputs if i.id == "model")
        assert "CogVideo/CogVideoX1.5-5B-I2V" in model_input.options
        assert fp.get_folder_paths("CogVideo") == [str(models_root / "models" / "CogVideo")]   # once
    finally:
        comfy_stub.uninstall()


def test_get_node_list_alone_registers_folders_as_on_0_3_64(models_root):
    mods = comfy_stub.install(str(models_root))
    try:
        ext = asyncio.run(_import_pack(f"cogvid_pack_{next(_counter)}").comfy_entrypoint())
        nodes = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}   # 0.3.64: no on_load
        assert "CogVideo" in mods["folder_paths"].folder_names_and_paths
        model_input = next(i for i in nodes["CogVidVAELoader"].GET_SCHEMA().inputs if i.id == "model")
        assert "CogVideo/CogVideoX-5b-I2V" in model_input.options
    finally:
        comfy_stub.uninstall()


@pytest.fixture
def interrupt_2026(comfy, monkeypatch):
    """The stub's interrupt as ComfyUI 2026 raises it; records which components end their use."""
    from cogvid_core.run import session
    monkeypatch.setattr(comfy_stub, "InterruptProcessingException", Interrupt2026)
    mm = comfy[1]["comfy.model_management"]
    monkeypatch.setattr(mm, "InterruptProcessingException", Interrupt2026)
    done = []
    original = session.Component.done
    monkeypatch.setattr(session.Component, "done", lambda self: (done.append(self.kind), original(self))[1])
    return comfy[0], mm, done


def test_interrupt_in_sampler_passes_through_and_releases(interrupt_2026):
    nodes, mm, done = interrupt_2026
    tr, cond, lat, _vae, _latent = _chain_10(nodes)
    done.clear()
    mm.interrupt_processing = True
    with pytest.raises(Interrupt2026):
        run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=9, steps=2,
            cfg=1.0, dynamic_cfg=False, scheduler="ddim", seed=0)
    assert done == ["transformer"]


def test_interrupt_in_decode_passes_through_and_releases(interrupt_2026):
    nodes, mm, done = interrupt_2026
    *_, vae, latent = _chain_10(nodes)
    done.clear()
    mm.interrupt_processing = True
    with pytest.raises(Interrupt2026):
        run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="off", overlap=0.0)
    assert done == ["vae"]
    images, fps, video = run(nodes["CogVidDecode"], vae=vae, latent=latent, tile="off", overlap=0.0).args
    assert images.shape[0] == 9 and video.get_components().images is images   # the latents decode again
