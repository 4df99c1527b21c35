"""The pack inside a real ComfyUI on the GPU: the shipped workflows queued as a user queues them.

Each emulated card gets its own worker process that starts ComfyUI (a checkout named by --comfyui
or COMFYUI_DIR) through ComfyUI's own code: main.py imported as a module (its argument parsing,
extra model paths, start-up scripts; cuda_malloc first, as main.py does under __main__), this pack
loaded by nodes.init_extra_nodes from a custom_nodes folder, and main.prompt_worker running on a
thread over execution.PromptQueue. Only the HTTP layer is replaced, by what its handlers call:
POST /prompt = execution.validate_prompt + PromptQueue.put, POST /free = PromptQueue.set_flag
("unload_models", then also "free_memory": the UI's two buttons). Progress and per-node timing
come from the events ComfyUI sends to its client (send_sync).

The UI-format workflows are converted to API prompts with the node classes' INPUT_TYPES (widget
order; a seed's control_after_generate and an image upload button carry an extra value); only the
steps (--steps), the seed (new per queue) and the Load Image file (a generated picture in ComfyUI's
input folder) change, plus --frames/--size for quick checks. Cards are emulated with ComfyUI's
--reserve-vram (total VRAM minus the card). Per queue: wall time, time to the first step, s/step
(from the sampler's progress events), NVML peak of this process (what nvidia-smi shows; the
device's used memory where NVML does not list the process), torch peak reserved, host peak RSS
(anonymous / file-backed), pinned host memory; after each workflow's queues the two /free calls
and what GPU and pinned host memory is left. The command line runs the same plan for comparison
(its per-step time read from its progress line the same way). Per-step times are the spacing of
the progress callbacks, which run on the host: with full-size models the launch queue keeps the host
within a fraction of a step of the GPU, so steps 2..N give the GPU's pace; with a few blocks
(--layers) the host runs ahead and the figure says nothing (the CLI report's denoise stage, synced,
is printed beside it).

    python3 bench/bench_comfyui_gpu.py --comfyui ~/ComfyUI --models /tmp/cogvid-models \\
        --make-checkpoints full --steps 3 --json comfyui_gpu.json
    python3 bench/bench_comfyui_gpu.py --comfyui ~/ComfyUI --models /tmp/tiny --make-checkpoints tiny \\
        --comfy-arg=--cpu --run full:12gb --frames 17 --size 96x64 --steps 2      # CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common.checkpoints import hf_checkpoints  # noqa: E402
from bench.common.provenance import GIB, log, provenance, versions, write_json  # noqa: E402
from bench.common.sampling import MemSampler, nvml_gpu  # noqa: E402
from bench.common.tables import fmt, gib  # noqa: E402
from bench.comfyui_workflows import IMAGE_NAME, WORKFLOW_FILES, plan_args  # noqa: E402
from bench.comfyui_worker import VERSIONS, spawn_worker, worker_process  # noqa: E402
from bench.comfyui_worker import worker as WORKER  # noqa: E402

PACK_NAME = "comfyui-cogvid-i2v"
DEFAULT_RUNS = ("full:24gb,12gb", "12:12gb", "8:12gb")


def run_cli(args, workflow: dict, model_dir: Path, image: Path, work: Path, name: str) -> dict:
    """The engine's command line on the same plan, in its own process; per-step time read from its
    progress line ('denoise i/N' on stderr) as the node path reads the sampler's progress events."""
    report, out = work / f"cli_{name}.json", work / f"cli_{name}.mp4"
    cmd = [sys.executable, "-m", "cogvid_core", "i2v", "--model", str(model_dir), "--image", str(image),
           "--out", str(out), "--report", str(report), *plan_args(workflow, args.steps, args.seed + 1, overrides_of(args))]
    if "--cpu" in args.comfy_arg:
        cmd += ["--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=args.pack, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = MemSampler(proc.pid)
    sampler.start()
    steps, err = [], b""
    stdout = []
    threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True).start()
    while chunk := proc.stderr.read1(4096):
        err += chunk
        steps += [(time.perf_counter(), int(m)) for m in re.findall(rb"denoise (\d+)/\d+", chunk)]
    rc = proc.wait()
    peak = sampler.take()
    res = {"cmd": shlex.join(cmd), "rc": rc, "wall_s": time.perf_counter() - t0, "host_peak":
           {k[5:]: v for k, v in peak.items() if k.startswith("host_")}}
    res["nvml_peak"], res["nvml_source"] = nvml_gpu(peak)
    if len(steps) > 1:
        res["s_per_step"] = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1])
    if rc == 0 and report.is_file():
        rep = json.loads(report.read_text())
        res["report"] = rep
        res["report_s_per_step"] = next((s["s_per_step"] for s in rep["stages"] if s["stage"] == "denoise"), None)
    else:
        res["stderr_tail"] = err.decode(errors="replace")[-3000:]
    res["stdout"] = (stdout[0] if stdout else b"").decode(errors="replace")[-2000:]
    return res


# ----------------------------------------------------------------------------- driver
def overrides_of(args) -> dict:
    out = {"frames": args.frames} if args.frames else {}
    if args.size:
        out["width"], out["height"] = (int(v) for v in args.size.lower().split("x"))
    return out


def workflow_path(name: str, pack: Path) -> Path:
    """A short name (24gb, 12gb, lora_24gb) -> the shipped workflow's file; a .json path as given."""
    if name.endswith(".json"):
        return Path(name)
    if name not in WORKFLOW_FILES:
        raise SystemExit(f"--run: no workflow named {name!r}; short names: {', '.join(WORKFLOW_FILES)}, or a .json path")
    return pack / "workflows" / WORKFLOW_FILES[name]


def parse_run(spec: str) -> tuple[str, list[str], list[str]]:
    """'CARD:WF[,WF][:COMFY ARGS]' -> (card, workflows, extra ComfyUI args); CARD: 'full' or GiB."""
    card, _, rest = spec.partition(":")
    wfs, _, extra = rest.partition(":")
    if card != "full":
        float(card)
    return card, [w for w in wfs.split(",") if w], shlex.split(extra)


def prepare(args, work: Path) -> tuple[Path, Path]:
    """ComfyUI's base folder (this pack copied into custom_nodes, the start image in input) and an
    extra_model_paths.yaml that shows ComfyUI the checkpoints; writes the checkpoints if asked."""
    from PIL import Image
    import numpy as np
    model_root = Path(args.models).resolve() / "CogVideo"
    if args.make_checkpoints:
        hf_checkpoints(model_root, "cogvideox1.5-5b-i2v", full=args.make_checkpoints == "full", layers=args.layers,
                       cwd=args.pack)
    base = work / "comfy_base"
    ignore = shutil.ignore_patterns(".git", ".gpu", ".whl", "__pycache__", "tests", "bench", "*.pyc")
    shutil.copytree(args.pack, base / "custom_nodes" / PACK_NAME, ignore=ignore, dirs_exist_ok=True)
    (base / "input").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:768, 0:1360]
    rgb = np.stack([xx * 255 // 1359, yy * 255 // 767, 128 + 64 * np.sin(xx / 60.0) * np.cos(yy / 45.0)], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(base / "input" / IMAGE_NAME)
    yaml = work / "extra_model_paths.yaml"
    yaml.write_text(f"cogvid_bench:\n    base_path: {model_root.parent}\n    CogVideo: CogVideo\n")
    return base, yaml


def run_worker(args, card: str, wfs: list[str], extra: list[str], base: Path, yaml: Path,
               total: int | None, work: Path) -> dict:
    comfy_args = ["--base-directory", str(base), "--extra-model-paths-config", str(yaml), *args.comfy_arg, *extra]
    if card != "full":
        if total is None:
            raise SystemExit(f"card {card} GiB needs NVML to read the GPU's total memory (run on the GPU machine)")
        comfy_args += ["--reserve-vram", f"{(total - float(card) * GIB) / GIB:.3f}"]   # GiB, as ComfyUI reads it
    cfg = {"comfyui": str(Path(args.comfyui).resolve()), "comfy_args": comfy_args, "card": card,
           "workflows": [(w, str(workflow_path(w, Path(args.pack)))) for w in wfs], "queues": args.queues,
           "steps": args.steps, "seed": args.seed, "overrides": overrides_of(args), "idle_s": args.idle,
           "queue_timeout": args.queue_timeout}
    res, rc, tail = spawn_worker(__file__, cfg, f"worker_{card}", base, work)
    if res is None:
        return {"card": card, "error": f"worker rc {rc}", "log_tail": tail}
    res["card"] = card
    return res


def load_seconds(row: dict, prompt_classes: dict) -> float | None:
    """Loader nodes plus the sampler's time before step 1 less one step: what reading and placing
    the weights cost this queue (0 when ComfyUI's cache and the loaded models are reused)."""
    loaders = sum(s for node, s in row.get("nodes_s", {}).items() if prompt_classes.get(node, "").endswith("Loader"))
    if row.get("sampler_to_first_step_s") is None or row.get("s_per_step") is None:
        return None
    return loaders + max(0.0, row["sampler_to_first_step_s"] - row["s_per_step"])


def table(results: list[dict], cli: dict, classes: dict) -> str:
    lines = ["| card | workflow | queue | wall s | to step 1 s | load s (derived) | weights placed / s | s/step | x CLI "
             "| decode s | NVML peak GiB | torch peak reserved GiB | host peak RSS GiB (anon / file / shmem) "
             "| pinned GiB after |", "|---" * 14 + "|"]
    free = ["| card | workflow | GPU GiB before 1st queue | after last queue | after unload_models | after free_memory "
            "| pinned GiB after unload / free | host RSS GiB before / after free |", "|---" * 8 + "|"]
    for res in results:
        if "error" in res:
            lines.append(f"| {res['card']} | worker failed: {res['error']} |" + " |" * 12)
            continue
        for wf in res["workflows"]:
            ref = cli.get(wf["workflow"], {}).get("s_per_step")
            for i, q in enumerate(wf["queues"], 1):
                ratio = q["s_per_step"] / ref if q.get("s_per_step") and ref else None
                hp, after = q["host_peak"], q["after"]
                lines.append(f"| {res['card']} | {wf['workflow']} | {i}{' FAILED' if q.get('error') else ''} | "
                             f"{fmt(q['wall_s'], '.1f')} | {fmt(q.get('to_first_step_s'), '.1f')} | "
                             f"{fmt(load_seconds(q, classes[wf['workflow']]), '.1f')} | "
                             f"{q.get('weights_placed', '-')} / {fmt(q.get('weights_load_s'), '.2f')} | {fmt(q.get('s_per_step'), '.3f')} | "
                             f"{fmt(ratio, '.3f')} | {fmt(q.get('decode_s'), '.1f')} | {gib(q['nvml_peak'])} | "
                             f"{gib(q.get('torch_peak_reserved'))} | {gib(hp.get('rss_hwm'))} ({gib(hp.get('rss_anon'))} / "
                             f"{gib(hp.get('rss_file'))} / {gib(hp.get('rss_shmem'))}) | {gib(after.get('pinned_held'))} |")
            u, f_, last = wf["after_unload_models"], wf["after_free_memory"], wf["queues"][-1]["after"]
            free.append(f"| {res['card']} | {wf['workflow']} | {gib(res['before']['nvml'])} | {gib(last['nvml'])} | "
                        f"{gib(u['nvml'])} | {gib(f_['nvml'])} | {gib(u.get('pinned_held'))} / "
                        f"{gib(f_.get('pinned_held'))} | {gib(res['before']['host'].get('rss'))} / "
                        f"{gib(f_['host'].get('rss'))} |")
    clil = ["| command line, same plan | s/step (progress) | s/step (report: denoise stage / steps) | wall s "
            "| NVML peak GiB | host peak RSS GiB | profile |", "|---" * 7 + "|"]
    for name, c in cli.items():
        rep = c.get("report", {})
        clil.append(f"| {name} | {fmt(c.get('s_per_step'), '.3f')} | {fmt(c.get('report_s_per_step'), '.3f')} | "
                    f"{fmt(c['wall_s'], '.1f')} | {gib(c['nvml_peak'])} | {gib(c['host_peak'].get('rss'))} | "
                    f"{rep.get('profile', 'FAILED rc %s' % c['rc'])} {json.dumps(rep.get('settings', ''))} |")
    return "\n".join(lines + [""] + free + [""] + clil)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout (or COMFYUI_DIR)")
    p.add_argument("--pack", default=str(REPO), help="this pack's folder (copied into custom_nodes)")
    p.add_argument("--models", required=True, help="folder that holds (or gets) CogVideo/CogVideoX1.5-5B-I2V")
    p.add_argument("--make-checkpoints", choices=["full", "tiny"], help="write random checkpoints there if missing")
    p.add_argument("--layers", type=int, help="with --make-checkpoints: transformer and T5 blocks (full widths)")
    p.add_argument("--run", action="append", help="CARD:WF[,WF][:COMFY ARGS], CARD 'full' or GiB, WF "
                   f"{'/'.join(WORKFLOW_FILES)} or a .json; repeatable (default {' '.join(DEFAULT_RUNS)})")
    p.add_argument("--comfy-arg", action="append", default=[], help="ComfyUI argument for every run (e.g. --cpu)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--queues", type=int, default=2, help="queues per workflow, each with a new seed")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--frames", type=int, help="override the workflows' frame count (quick checks only)")
    p.add_argument("--size", help="WxH: override the workflows' video size (quick checks only)")
    p.add_argument("--idle", type=float, default=0.0, help="seconds between queues")
    p.add_argument("--queue-timeout", type=float, default=900.0, help="Cancel a queue after this many seconds")
    p.add_argument("--no-cli", action="store_true", help="skip the command-line comparison")
    p.add_argument("--work", help="work folder (default: a new temporary one)")
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args(argv)
    if not args.comfyui or not Path(args.comfyui, "main.py").is_file():
        p.error("--comfyui (or COMFYUI_DIR) must name a ComfyUI checkout (a folder with main.py)")
    work = Path(args.work or tempfile.mkdtemp(prefix="cogvid-comfybench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base, yaml = prepare(args, work)
    total = MemSampler(os.getpid()).total_bytes()
    runs = [parse_run(s) for s in (args.run or DEFAULT_RUNS)]
    names = sorted({w for _, wfs, _ in runs for w in wfs})
    workflows = {w: json.loads(workflow_path(w, Path(args.pack)).read_text()) for w in names}
    classes = {w: {str(n["id"]): n["type"] for n in wf["nodes"]} for w, wf in workflows.items()}
    model_dir = Path(args.models).resolve() / "CogVideo" / "CogVideoX1.5-5B-I2V"
    sampler = MemSampler(os.getpid())
    results, cli = [], {}

    def save():     # after every worker and CLI run: a run cut short by a time limit still leaves its JSON
        if args.json:
            write_json(args.json, {
                **provenance(sampler.device_name()), "gpu_total_bytes": total, "comfyui": comfy_version(args.comfyui),
                "driver_versions": versions(*VERSIONS), "args": vars(args), "runs": results, "cli": cli,
                "table": table(results, cli, classes)})
    for card, wfs, extra in runs:
        results.append(run_worker(args, card, wfs, extra, base, yaml, total, work))
        save()
    for w in [] if args.no_cli else names:
        cli[w] = run_cli(args, workflows[w], model_dir, base / "input" / IMAGE_NAME, work, w)
        save()
    log(f"\n{sampler.device_name() or platform.processor() or 'CPU'}, ComfyUI {comfy_version(args.comfyui)}, "
        f"{args.steps} steps, {args.queues} queues per workflow\n\n{table(results, cli, classes)}")
    return 0 if all("error" not in r for r in results) else 1


def comfy_version(comfy_dir: str) -> str | None:
    m = re.search(r'__version__\s*=\s*"([^"]+)"', Path(comfy_dir, "comfyui_version.py").read_text())
    return m.group(1) if m else None


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_process(WORKER)
    sys.exit(main())
