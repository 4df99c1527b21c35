"""Live previews in the real ComfyUI server: previews arrive on the websocket, one per sampling step,
tagged with the Sampler's node id, and none when the preview method is off.

The server (ComfyUI's main.py, --cpu, this pack in its custom_nodes, the tiny checkpoints as its models)
starts once per preview method; a websocket client that declares ``supports_preview_metadata`` (as the
frontend does) queues a small workflow (tiny 1.5, 17 frames at 96x64, 2 steps) and counts what arrives.
The preview method reaches the server as ``--preview-method`` (ComfyUI 0.3.64) and in the prompt's
``extra_data["preview_method"]`` (newer core applies it per prompt). Runs under COMFYUI_PYTHON (aiohttp);
skipped unless COMFYUI_DIR names a ComfyUI checkout.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import real_comfy

from test_nodes import REPO, models_root  # noqa: F401  (fixture used by name)

STEPS, SAMPLER = 2, "6"
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA = 1, 4     # ComfyUI's protocol.BinaryEventTypes


def workflow() -> dict:
    model = "CogVideo/CogVideoX1.5-5B-I2V"
    kw = dict(model=model, precision="fp32", placement="auto", device="auto")
    node = lambda cls, **inputs: {"class_type": cls, "inputs": inputs}
    return {"1": node("CogVidTransformerLoader", speed="exact", **kw), "2": node("CogVidT5Loader", **kw),
            "3": node("CogVidVAELoader", **kw),
            "4": node("CogVidTextEncode", t5=["2", 0], positive="a fox", negative=""),
            "5": node("CogVidImageEncode", vae=["3", 0], image=["8", 0], width=96, height=64, resize="crop"),
            SAMPLER: node("CogVidSampler", transformer=["1", 0], conditioning=["4", 0], image_latent=["5", 0],
                          frames=17, steps=STEPS, cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=0),
            "7": node("CogVidDecode", vae=["3", 0], latent=[SAMPLER, 0], tile="auto", overlap=0.1667),
            "8": node("LoadImage", image="start.png"), "9": node("PreviewImage", images=["7", 0])}


def prepare_base(base: Path, models: Path) -> None:
    """A ComfyUI --base-directory: the pack in custom_nodes/, the tiny models, a start image in input/."""
    from PIL import Image
    shutil.copytree(REPO, base / "custom_nodes" / "comfyui-cogvid-i2v",
                    ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv", "venv"))
    (base / "models").symlink_to(models)
    (base / "input").mkdir()
    Image.new("RGB", (110, 70), (200, 120, 40)).save(base / "input" / "start.png")


async def queue_and_listen(port: int, method: str, timeout: float = 600) -> dict:
    import aiohttp
    got = {"previews": [], "progress": [], "status": None}
    async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws?clientId=t") as ws:
        await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        body = {"prompt": workflow(), "client_id": "t", "extra_data": {"preview_method": method}}
        async with http.post(f"http://127.0.0.1:{port}/prompt", json=body) as r:
            prompt_id = (await r.json())["prompt_id"]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = await ws.receive(timeout=end - time.monotonic())
            if msg.type == aiohttp.WSMsgType.BINARY:
                got["previews"].append(_binary(msg.data))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                data = event.get("data", {})
                if event["type"] == "progress" and data.get("node") == SAMPLER:
                    got["progress"].append([data["value"], data["max"]])
                if event["type"] in ("execution_success", "execution_error") and data.get("prompt_id") == prompt_id:
                    got["status"] = event["type"] if event["type"] == "execution_success" else data
                    return got
    return got


def _binary(data: bytes) -> dict:
    event = struct.unpack(">I", data[:4])[0]
    if event == PREVIEW_IMAGE_WITH_METADATA:
        n = struct.unpack(">I", data[4:8])[0]
        meta = json.loads(data[8:8 + n])
        return {"event": event, "node_id": meta.get("node_id"), "type": meta.get("image_type"),
                "jpeg": data[8 + n:8 + n + 2] == b"\xff\xd8", "bytes": len(data) - 8 - n}
    return {"event": event, "jpeg": data[8:10] == b"\xff\xd8", "bytes": len(data) - 8}


def run_server(comfy_dir: str, base: str, method: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(base) / f"server_{method}.log", "w")
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--base-directory", base, "--listen", "127.0.0.1",
                               "--port", str(port), "--preview-method", method, "--disable-auto-launch"],
                              cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, server)
        return asyncio.run(queue_and_listen(port, method))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _wait_ready(port: int, server, timeout: float = 300) -> None:
    import urllib.request
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {server.returncode} before it served")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError("ComfyUI did not serve in time")


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_previews_arrive_on_the_websocket(models_root, tmp_path):
    prepare_base(tmp_path / "base", models_root / "models")
    def logs() -> str:
        return "".join(p.read_text()[-3000:] for p in (tmp_path / "base").glob("server_*.log"))
    results = real_comfy.run_script(__file__, tmp_path / "base", timeout=1500, context=logs)
    print(json.dumps(results))
    on, off = results["latent2rgb"], results["none"]
    assert on["status"] == "execution_success" == off["status"], logs
    assert on["progress"] == off["progress"] == [[1, STEPS], [2, STEPS]]
    assert len(on["previews"]) == STEPS, on["previews"]
    assert all(p["event"] == PREVIEW_IMAGE_WITH_METADATA and p["node_id"] == SAMPLER and p["type"] == "image/jpeg"
               and p["jpeg"] and p["bytes"] > 100 for p in on["previews"])
    assert off["previews"] == []


if __name__ == "__main__":
    comfy_dir, base = sys.argv[1:3]
    print(json.dumps({m: run_server(comfy_dir, base, m) for m in ("latent2rgb", "none")}))
