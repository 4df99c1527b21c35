"""See the Sampler's live preview in the real ComfyUI frontend: a check by eye, with a screenshot.

    /path/to/comfyui-venv/bin/python bench/check_preview_frontend.py --comfyui /path/to/ComfyUI --work /tmp/pvw

Starts ComfyUI (--cpu, --preview-method latent2rgb) with this pack and tiny random 1.5 checkpoints, opens its
page in headless Chromium (playwright), loads the shipped 24 GB workflow, makes it small (17 frames,
320x192, fp32, 12 steps), queues it from the page and records what the page receives: the
``b_preview_with_metadata`` events per node id and screenshots while the Sampler runs and after. The
weights are random, so the preview is coloured noise: what is checked is that it shows on the Sampler.
Needs playwright in ComfyUI's python and a Chromium (--chromium).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL_JS = """async (wf) => { await app.loadGraphData(wf);
  const set = (type, values) => { for (const n of app.graph._nodes)
  if (n.type === type) for (const [k, v] of Object.entries(values)) { const w = n.widgets.find(w => w.name === k);
  if (w) w.value = v; } };
  for (const t of ['CogVidTransformerLoader', 'CogVidT5Loader', 'CogVidVAELoader']) set(t, {precision: 'fp32'});
  set('CogVidVRAMEstimate', {frames: 17, width: 320, height: 192, precision: 'fp32'});
  set('CogVidImageEncode', {width: 320, height: 192}); set('LoadImage', {image: 'start.png'});
  set('CogVidSampler', {frames: 17, steps: 12, seed: 7, control_after_generate: 'fixed'});
  window.__previews = []; const api = window.comfyAPI.api.api;
  api.addEventListener('b_preview_with_metadata', e => window.__previews.push(e.detail.nodeId));
  return app.graph._nodes.find(n => n.type === 'CogVidSampler').id; }"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", required=True, help="a ComfyUI checkout (run this with its python)")
    p.add_argument("--work", type=Path, required=True, help="a folder for ComfyUI's base directory and the shots")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    return p.parse_args(argv)


def prepare(work: Path) -> Path:
    from PIL import Image
    from bench.common.checkpoints import hf_checkpoints
    base = work / "base"
    hf_checkpoints(base / "models" / "CogVideo", "cogvideox1.5-5b-i2v", full=False)
    pack = base / "custom_nodes" / "comfyui-cogvid-i2v"
    shutil.rmtree(pack, ignore_errors=True)
    shutil.copytree(REPO, pack, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    (base / "input").mkdir(parents=True, exist_ok=True)
    Image.linear_gradient("L").resize((320, 192)).convert("RGB").save(base / "input" / "start.png")
    return base


def serve(comfyui: str, base: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--base-directory", str(base), "--listen",
                               "127.0.0.1", "--port", str(port), "--preview-method", "latent2rgb",
                               "--disable-auto-launch"], cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2).read()
            return server, port
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(1)
    server.terminate()
    raise RuntimeError(f"ComfyUI did not serve: see {base / 'server.log'}")


def look(port: int, work: Path, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright
    from bench.comfyui_workflows import WORKFLOW_FILES
    wf = json.loads((REPO / "workflows" / WORKFLOW_FILES["24gb"]).read_text())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("window.app && window.app.graph && window.comfyAPI", timeout=120_000)
        time.sleep(2)
        page.keyboard.press("Escape")      # the first start's template dialog would cover the canvas
        sampler = page.evaluate(SMALL_JS, wf)
        page.evaluate("(id) => { const n = app.graph.getNodeById(id); app.canvas.centerOnNode(n); "
                      "app.canvas.ds.scale = 1.2; app.canvas.centerOnNode(n); app.canvas.setDirty(true, true); }",
                      sampler)
        page.evaluate("() => app.queuePrompt(0, 1)")
        shots, during = [], None
        for k in range(600):
            time.sleep(0.5)
            seen = page.evaluate("() => window.__previews.length")
            if seen and during is None:
                during = work / "preview_during.png"
                page.screenshot(path=str(during))
            queue = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/queue"))
            if k > 4 and not queue["queue_running"] and not queue["queue_pending"]:
                break
        time.sleep(1)
        after = work / "preview_after.png"
        page.screenshot(path=str(after))
        previews = page.evaluate("() => window.__previews")
        browser.close()
    return {"sampler_node": sampler, "previews_by_node": {str(n): previews.count(n) for n in set(previews)},
            "shots": [str(p) for p in (during, after) if p]}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    base = prepare(args.work)
    server, port = serve(args.comfyui, base)
    try:
        result = look(port, args.work, args.chromium)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(result, indent=1))
    return 0 if result["previews_by_node"].get(str(result["sampler_node"])) else 1


if __name__ == "__main__":
    sys.exit(main())
