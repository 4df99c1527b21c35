"""Faults in a real ComfyUI: out of memory, Cancel, and a mixed 20-queue session (issue 28, server half).

Each scenario runs in its own ComfyUI process, started as bench_comfyui_gpu starts it (main.py imported,
this pack loaded from custom_nodes, main.prompt_worker on a thread; only the HTTP layer replaced by what
its handlers call), with the shipped workflows converted to API prompts (bench/comfyui_scenarios.py):

- oom: the 24gb workflow with the VRAM Estimate's profile set to resident on an emulated 8 GB card (a
  second process holds the rest of the GPU: ComfyUI's --reserve-vram alone changes only its accounting,
  torch would allocate past it; `--oom-limit reserve` runs that instead), then the 12gb workflow with
  budget_gib 0 (its note's advice for 8 GB cards), then Unload models. Recorded: the message ComfyUI's
  execution_error event carries to the UI (its first line is the pack's: what the stage needed, what
  was free, which profile to pick), GPU / page-locked / host memory before, after the failure (settled)
  and after Unload models.
- cancel: the 12gb workflow to completion, Cancel after the sampler's k-th step, a new queue, Cancel
  during the decode, the same prompt again: memory after each Cancel against the completed queue, and
  which nodes the re-queue ran ('executing' messages) or took from ComfyUI's cache ('execution_cached').
- mixed: N queues rotating the 5B, the 1.5 12gb and the LoRA workflows (strength new on every LoRA
  queue): per queue NVML peak, host RSS (anonymous / file-backed) and page-locked memory after it, and
  whether the model loaders ran (they should only when the variant changes).

Every scenario's criteria are rows (criterion, measured, limit, ok) in the JSON and the printed table
(bench/comfyui_criteria.py). Where NVML is absent (a CPU run) the GPU rows say "not run on CPU" and the
host rows are the memory check; the CPU cannot run out of device memory, so the oom scenario injects the
CUDA allocator's error half-way through the resident transformer's read and says so.

    python3 bench/bench_comfyui_faults.py --comfyui ~/ComfyUI --models /tmp/m --make-checkpoints full \\
        --frames 17 --size 256x160 --steps 2 --json faults.json                            # GPU
    python3 bench/bench_comfyui_faults.py --comfyui ~/ComfyUI --models /tmp/tiny --make-checkpoints tiny \\
        --comfy-arg=--cpu --frames 17 --size 96x64 --steps 2 --mixed-queues 9               # CPU check
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_comfyui_gpu import comfy_version, prepare  # noqa: E402
from bench.comfyui_criteria import cancel_criteria, mixed_criteria, oom_criteria, table  # noqa: E402
from bench.comfyui_scenarios import worker as WORKER  # noqa: E402
from bench.comfyui_worker import VERSIONS, spawn_worker, worker_process  # noqa: E402
from bench.comfyui_workflows import WORKFLOW_FILES  # noqa: E402
from bench.common.checkpoints import hf_checkpoints  # noqa: E402
from bench.common.provenance import GIB, log, provenance, versions, write_json  # noqa: E402
from bench.common.sampling import MemSampler  # noqa: E402

WORKFLOWS = {"24gb": WORKFLOW_FILES["24gb"], "12gb": WORKFLOW_FILES["12gb"], "lora": WORKFLOW_FILES["lora_24gb"],
             "5b": "CogVideoX-5B I2V - any card - 49 frames 720x480.json"}
LORA_NAME = "my_cogvideox1.5_i2v_lora.safetensors"     # the name the LoRA workflow ships with
SCENARIOS = ("oom", "cancel", "mixed")


def size_of(spec: str | None) -> dict:
    if not spec:
        return {}
    w, h = (int(v) for v in spec.lower().split("x"))
    return {"width": w, "height": h}


def overrides(args) -> dict:
    """Per workflow: --frames for all, --size for the 1.5 ones, --size-5b for the 5B (default: the
    workflow's 720x480, its only size)."""
    frames = {"frames": args.frames} if args.frames else {}
    return {name: {**frames, **size_of(args.size_5b if name == "5b" else args.size)} for name in WORKFLOWS}


def prepare_all(args, work: Path) -> tuple[Path, Path]:
    """bench_comfyui_gpu's base folder and checkpoints (1.5), plus the 5B's checkpoints and a random
    LoRA for the mixed scenario, and a models/loras entry in extra_model_paths.yaml."""
    base, yaml = prepare(SimpleNamespace(models=args.models, make_checkpoints=args.make_checkpoints,
                                         layers=args.layers, pack=args.pack), work)
    root = Path(args.models).resolve()
    if "mixed" in args.scenarios:
        if args.make_checkpoints:
            # tiny widths at its trained 720x480: the 5B makes no other size, and the VRAM Estimate checks the
            # real model's size before the tiny transformer could say otherwise
            hf_checkpoints(root / "CogVideo", "cogvideox-5b-i2v", full=args.make_checkpoints == "full",
                           layers=args.layers, trained_size=args.make_checkpoints == "tiny", cwd=args.pack)
        lora = root / "loras" / LORA_NAME
        if not lora.is_file():
            code = ("import sys; from cogvid_core.model.testing import write_lora; write_lora(sys.argv[1], "
                    "'cogvideox1.5-5b-i2v', tiny=sys.argv[2] != 'full', layers=int(sys.argv[3]) or None)")
            subprocess.run([sys.executable, "-c", code, str(lora), args.make_checkpoints or "full", str(args.layers or 0)],
                           cwd=args.pack, check=True)
    yaml.write_text(yaml.read_text() + "    loras: loras\n")
    return base, yaml


def scenario_cfg(args, name: str, base: Path, yaml: Path, total: int | None, cpu: bool) -> dict:
    comfy_args = ["--base-directory", str(base), "--extra-model-paths-config", str(yaml), *args.comfy_arg]
    cfg = {"scenario": name, "comfyui": str(Path(args.comfyui).resolve()), "comfy_args": comfy_args,
           "workflows": {w: str(Path(args.pack) / "workflows" / f) for w, f in WORKFLOWS.items()},
           "steps": args.steps, "seed": args.seed + 1000 * SCENARIOS.index(name), "overrides": overrides(args),
           "queue_timeout": args.queue_timeout, "settle_s": args.settle_s, "cpu": cpu, "card": "full",
           "save_node": args.save_node}
    if name == "oom":
        cfg["next_budget_gib"] = args.oom_next_budget
        if cpu:
            cfg.update(inject_oom=True, card="cpu")
        elif args.oom_limit == "ballast":
            cfg.update(ballast_gib=args.oom_card, card=f"{args.oom_card:g} GiB (ballast)")
        else:
            cfg["comfy_args"] += ["--reserve-vram", f"{(total - args.oom_card * GIB) / GIB:.3f}"]
            cfg["card"] = f"{args.oom_card:g} GiB (--reserve-vram)"
    if name == "cancel":
        cfg["cancel_step"] = args.cancel_step
    if name == "mixed":
        cfg.update(queues=args.mixed_queues, rotation=args.rotation.split(","), strength_start=0.3, strength_step=0.1,
                   deadline=args.t0 + args.budget_s if args.budget_s else None)
    return cfg


def run_scenario(cfg: dict, base: Path, work: Path) -> dict:
    res, rc, tail = spawn_worker(__file__, cfg, f"faults_{cfg['scenario']}", base, work)
    if res is None:
        return {"scenario": cfg["scenario"], "error": f"worker rc {rc}", "log_tail": tail}
    return res


def criteria(res: dict, args) -> list[dict]:
    if "error" in res:
        return [{"criterion": "scenario ran", "measured": res["error"], "limit": "rc 0", "ok": False}]
    fn = {"oom": lambda r: oom_criteria(r, args.back_gib), "cancel": lambda r: cancel_criteria(r, args.back_gib),
          "mixed": lambda r: mixed_criteria(r, args.flat_gib)}[res["scenario"]]
    try:
        return fn(res)
    except Exception as e:     # a result the criteria cannot read is a failed scenario, shown, not a crash
        return [{"criterion": "criteria computed", "measured": f"{type(e).__name__}: {e}", "limit": "-", "ok": False}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout (or COMFYUI_DIR)")
    p.add_argument("--pack", default=str(REPO), help="this pack's folder (copied into custom_nodes)")
    p.add_argument("--models", required=True, help="folder that holds (or gets) CogVideo/<variant> and loras/")
    p.add_argument("--make-checkpoints", choices=["full", "tiny"], help="write random checkpoints (and the LoRA) if missing")
    p.add_argument("--layers", type=int, help="with --make-checkpoints: transformer and T5 blocks (full widths)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--comfy-arg", action="append", default=[], help="ComfyUI argument for every run (e.g. --cpu)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--frames", type=int, help="override every workflow's frame count")
    p.add_argument("--size", help="WxH: override the 1.5 workflows' video size")
    p.add_argument("--size-5b", help="WxH for the 5B workflow (default: its own 720x480, the only size it makes)")
    p.add_argument("--oom-card", type=float, default=8.0, help="GiB of the emulated card of the oom scenario")
    p.add_argument("--oom-limit", choices=["ballast", "reserve"], default="ballast",
                   help="ballast: a second process holds the rest of the GPU; reserve: --reserve-vram only")
    p.add_argument("--oom-next-budget", type=float, default=0.0,
                   help="oom: the 12gb workflow's budget_gib after the failure (0, as its note says for 8 GB cards)")
    p.add_argument("--cancel-step", type=int, default=1, help="Cancel after this sampling step (needs --steps above it)")
    p.add_argument("--mixed-queues", type=int, default=20)
    p.add_argument("--rotation", default="5b,12gb,lora", help="the mixed scenario's workflow order")
    p.add_argument("--save-node", choices=["mp4", "preview"], default="mp4",
                   help="preview: core's Preview Image takes the decoded frames in place of the pack's mp4 writer "
                        "(a machine without imageio-ffmpeg; both write files from the frames on the host)")
    p.add_argument("--settle-s", type=float, default=11.0,
                   help="wait after a fault before reading memory again (ComfyUI collects garbage every 10 s)")
    p.add_argument("--back-gib", type=float, default=0.3, help="memory after a fault: at most this above before")
    p.add_argument("--flat-gib", type=float, default=0.25, help="mixed: largest spread within one workflow")
    p.add_argument("--budget-s", type=float, help="start no mixed queue after this many seconds (the JSON says how many ran)")
    p.add_argument("--queue-timeout", type=float, default=300.0, help="Cancel a queue after this many seconds")
    p.add_argument("--work", help="work folder (default: a new temporary one)")
    p.add_argument("--json", help="write the raw results and the criteria here")
    args = p.parse_args(argv)
    args.t0 = time.time()
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if not args.comfyui or not Path(args.comfyui, "main.py").is_file():
        p.error("--comfyui (or COMFYUI_DIR) must name a ComfyUI checkout (a folder with main.py)")
    if set(args.scenarios) - set(SCENARIOS):
        p.error(f"--scenarios: unknown {sorted(set(args.scenarios) - set(SCENARIOS))}")
    if "cancel" in args.scenarios and args.steps <= args.cancel_step:
        p.error(f"--steps {args.steps}: the cancel scenario cancels after step {args.cancel_step}; give more steps")
    work = Path(args.work or tempfile.mkdtemp(prefix="cogvid-comfyfaults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base, yaml = prepare_all(args, work)
    sampler = MemSampler(os.getpid())
    total = sampler.total_bytes()
    cpu = total is None or "--cpu" in args.comfy_arg
    results, rows = {}, {}

    def save():
        if args.json:
            write_json(args.json, {**provenance(sampler.device_name()), "gpu_total_bytes": total,
                                   "comfyui": comfy_version(args.comfyui), "driver_versions": versions(*VERSIONS),
                                   "args": {k: v for k, v in vars(args).items() if k != "t0"}, "criteria": rows,
                                   "scenarios": results, "table": table(rows), "wall_s": time.time() - args.t0})
    for name in args.scenarios:
        results[name] = run_scenario(scenario_cfg(args, name, base, yaml, total, cpu), base, work)
        rows[name] = criteria(results[name], args)
        save()
    log(f"\n{sampler.device_name() or platform.processor() or 'CPU'}, ComfyUI {comfy_version(args.comfyui)}, "
        f"{args.steps} steps, {time.time() - args.t0:.0f} s\n\n{table(rows)}")
    return 0 if all(r["ok"] is not False for rs in rows.values() for r in rs) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_process(WORKER)
    sys.exit(main())
