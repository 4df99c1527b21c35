"""The worker side of bench_comfyui_faults: one ComfyUI process, started as bench_comfyui_gpu's worker
starts it (main.py's start-up, this pack from custom_nodes, main.prompt_worker on a thread), runs one
scenario and returns its raw rows; the criteria are computed by the caller (comfyui_criteria).

- oom: the 24gb workflow with the VRAM Estimate's profile set to resident, on an emulated small card,
  then the 12gb workflow (budget_gib as its note says for 8 GB cards: 0), then the UI's "Unload models".
- cancel: the 12gb workflow queued to completion (the reference), Cancel after the sampler's k-th step,
  a new queue, Cancel during the decode, and the same prompt queued again.
- mixed: N queues rotating the 5B, the 1.5 12gb and the LoRA workflows, the LoRA strength new each time.

Cancel is what POST /interrupt does (nodes.interrupt_processing), called from the prompt worker's
thread while it sends the progress message of the chosen step or decoder call: deterministic, and
the node sees it at its next interrupt check as it would a click. Memory is read right after a queue
and, for the fault scenarios, again after ``settle_s`` (ComfyUI's prompt worker runs gc.collect and
empties the cache at most every 10 s: what nvidia-smi shows a few seconds after Cancel).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.comfyui_criteria import MODEL_LOADERS, compact, downstream, executed, ids_of, outcome
from bench.comfyui_worker import VERSIONS, BenchServer, WeightTimer, gpu_state, post_free, run_queue, start_comfyui
from bench.comfyui_workflows import edit_prompt, to_api
from bench.common.provenance import log, versions
from bench.common.sampling import MemSampler
from bench.common.tables import gib

# A second process holds all but `keep` GiB of the GPU: the worker then sees what an 8 GB card shows
# (cudaMemGetInfo, the driver's refusal). ComfyUI's --reserve-vram alone only changes its accounting:
# torch would still allocate past it, and a resident plan that does not fit simply runs.
BALLAST = r"""
import sys, torch
keep, blocks = int(float(sys.argv[1]) * 2 ** 30), []
free = torch.cuda.mem_get_info()[0]
while free - keep > 64 * 2 ** 20:
    try:
        blocks.append(torch.empty(min(free - keep, 4 * 2 ** 30), dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        break
    free = torch.cuda.mem_get_info()[0]
print(free, torch.cuda.mem_get_info()[1], sum(b.numel() for b in blocks), flush=True)
sys.stdin.read()      # held until the worker closes the pipe (or dies)
"""


def start_ballast(keep_gib: float):
    proc = subprocess.Popen([sys.executable, "-c", BALLAST, str(keep_gib)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 3:
        raise RuntimeError(f"the ballast process did not start (rc {proc.wait()}): it needs CUDA and torch")
    free, total, held = (int(x) for x in line)
    log(f"ballast process {proc.pid} holds {gib(held)} GiB; {gib(free)} GiB of {gib(total)} GiB left free")
    return proc, {"pid": proc.pid, "held": held, "free_left": free, "total": total, "keep_gib": keep_gib}


class TriggerServer(BenchServer):
    """A BenchServer that offers every message to ``trigger(event, data)``, in the thread that sends it,
    until it returns True; ``fired`` says which message did it."""

    def __init__(self):
        super().__init__()
        self.trigger, self.fired = None, None

    def send_sync(self, event, data, sid=None):
        super().send_sync(event, data, sid)
        if self.trigger is not None and self.trigger(event, data):
            self.trigger = None
            self.fired = {"event": event, **{k: data.get(k) for k in ("node", "value", "max")}}


def cancel_on_progress(node_id: str, at_value: int):
    """Cancel (POST /interrupt) once ``node_id`` reported progress ``at_value`` (a step, a decoder call)."""
    def fire(event, data):
        if event == "progress" and str(data.get("node")) == node_id and (data.get("value") or 0) >= at_value:
            import nodes
            nodes.interrupt_processing(True)
            return True
        return False
    return fire


def inject_oom(armed: list) -> None:
    """CPU runs: the resident transformer's read raises the CUDA allocator's error once while ``armed[0]``,
    half-way through its blocks, where a small GPU raises it for real (H100, session 15: after 7.2 GiB of the
    24gb workflow's transformer). What was read must go back before the pack's guard turns it into its line."""
    import torch
    from cogvid_core.memory import filestream
    orig = filestream.FilePlacement._fetch

    def fetch(self, i):
        if (armed[0] and self.mode == "resident" and "Transformer" in type(self.model).__name__
                and i == len(self.blocks) // 2):
            armed[0] = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected by "
                                         "bench_comfyui_faults: a CPU has no device memory to run out of)")
        return orig(self, i)
    filestream.FilePlacement._fetch = fetch


class Run:
    """One ComfyUI process: its queue, the prompts, and one queue at a time with its events kept."""

    def __init__(self, cfg: dict):
        self.cfg, self.number, self.seed = cfg, 0, cfg["seed"]
        self.sampler = MemSampler(os.getpid())
        self.server, self.queue = start_comfyui(cfg["comfyui"], cfg["comfy_args"], TriggerServer())
        import torch    # only now: ComfyUI's cuda_malloc sets the allocator before torch loads
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.sampler.start()
        self.weights = WeightTimer()
        self.weights.install()
        import nodes
        self.prompts = {name: to_api(json.loads(Path(path).read_text()), nodes.NODE_CLASS_MAPPINGS)
                        for name, path in cfg["workflows"].items()}

    def prompt(self, name: str, seed: int | None = None) -> dict:
        if seed is None:
            self.seed += 1
            seed = self.seed
        p = edit_prompt(self.prompts[name], self.cfg["steps"], seed, self.cfg["overrides"].get(name, {}))
        if self.cfg.get("save_node") == "preview":     # core's Preview Image in place of the mp4 writer
            for nid in ids_of(p, "CogVidSaveVideo"):
                p[nid] = {"class_type": "PreviewImage", "inputs": {"images": p[nid]["inputs"]["images"]}}
        return p

    def run(self, prompt: dict, label: str, trigger=None, settle: bool = False) -> dict:
        self.server.trigger, self.server.fired = trigger, None
        row = run_queue(self.server, self.queue, self.sampler, prompt, self.number, self.cfg["queue_timeout"],
                        self.weights)
        self.number += 1
        row.update(label=label, fired=self.server.fired, log=compact(list(self.server.events)))
        row["outcome"] = outcome(row["log"])
        self.server.trigger = None
        if settle:
            time.sleep(self.cfg["settle_s"])
            row["settled"] = gpu_state(self.sampler)
        o = row["outcome"]
        log(f"[{self.cfg['scenario']}] {label}: {o['status']}" + (f" in {o.get('node_type')}" if o.get("node_type") else "")
            + f", {row['wall_s']:.1f} s, NVML peak {gib(row['nvml_peak'])} GiB, after {gib(row['after'].get('nvml'))}"
            + (f" / settled {gib(row['settled'].get('nvml'))}" if settle else "")
            + (f"\n    {o.get('first_line')}" if o.get("first_line") else ""))
        return row


def oom(r: Run) -> dict:
    before = gpu_state(r.sampler)
    p = r.prompt("24gb")
    for nid in ids_of(p, "CogVidVRAMEstimate"):
        p[nid]["inputs"]["profile"] = "resident"
    armed = [bool(r.cfg.get("inject_oom"))]
    if armed[0]:
        inject_oom(armed)
    failed = r.run(p, "24gb, profile resident", settle=True)
    armed[0] = False
    p12 = r.prompt("12gb")
    for nid in ids_of(p12, "CogVidVRAMEstimate"):     # its note: "on an 8 GB card set its budget_gib to 0"
        p12[nid]["inputs"]["budget_gib"] = r.cfg["next_budget_gib"]
    nxt = r.run(p12, f"12gb, budget_gib {r.cfg['next_budget_gib']:g}")
    post_free(r.queue, free_memory=False)
    return {"before": before, "failed": failed, "next": nxt, "after_unload": gpu_state(r.sampler),
            "injected": bool(r.cfg.get("inject_oom")), "prompt_classes": classes(p)}


def cancel(r: Run) -> dict:
    k = r.cfg["cancel_step"]
    p = r.prompt("12gb")
    sampler_id, decode_id = ids_of(p, "CogVidSampler")[0], ids_of(p, "CogVidDecode")[0]
    out = {"before": gpu_state(r.sampler), "cancel_step": k, "sampler_id": sampler_id, "decode_id": decode_id,
           "decode_downstream": sorted(downstream(p, decode_id)), "prompt_classes": classes(p)}
    out["baseline"] = r.run(p, "12gb to completion (reference)", settle=True)
    out["sampling"] = r.run(r.prompt("12gb"), f"Cancel after step {k}", cancel_on_progress(sampler_id, k), settle=True)
    out["next"] = r.run(r.prompt("12gb"), "next queue")
    again = r.prompt("12gb")
    out["decode"] = r.run(again, "Cancel during decode", cancel_on_progress(decode_id, 1), settle=True)
    out["requeue"] = r.run(again, "same prompt again")
    return out


def mixed(r: Run) -> dict:
    rows, n_lora = [], 0
    for i in range(r.cfg["queues"]):
        if r.cfg.get("deadline") and time.time() > r.cfg["deadline"]:
            log(f"[mixed] time budget spent after {i} queues")
            break
        name = r.cfg["rotation"][i % len(r.cfg["rotation"])]
        p, strength = r.prompt(name), None
        for nid in ids_of(p, "CogVidLoraLoader"):
            strength = round(r.cfg["strength_start"] + r.cfg["strength_step"] * n_lora, 3)
            p[nid]["inputs"]["strength"] = strength
            n_lora += 1
        row = r.run(p, f"q{i + 1} {name}" + (f" strength {strength}" if strength is not None else ""))
        ran = set(executed(row["log"]))
        row.update(workflow=name, strength=strength, model=p[ids_of(p, "CogVidTransformerLoader")[0]]["inputs"]["model"],
                   loaders_ran=sorted(ran & set(ids_of(p, *MODEL_LOADERS))),
                   lora_ran=bool(ran & set(ids_of(p, "CogVidLoraLoader"))),
                   pinned=row["after"].get("pinned_held"), host_anon=row["after"]["host"].get("rss_anon"),
                   host_file=row["after"]["host"].get("rss_file"))
        rows.append(row)
    return {"queues": rows, "requested": r.cfg["queues"], "rotation": r.cfg["rotation"]}


def classes(prompt: dict) -> dict:
    return {nid: n["class_type"] for nid, n in prompt.items()}


SCENARIOS = {"oom": oom, "cancel": cancel, "mixed": mixed}


def imported_distributions() -> dict:
    """{distribution: version} of every installed package this ComfyUI process imported: what a
    machine needs beside ComfyUI's source to run the scenario."""
    from importlib import metadata
    by_module = metadata.packages_distributions()
    names = {d for m in list(sys.modules) for d in by_module.get(m.partition(".")[0], [])}
    out = {}
    for name in sorted(names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def worker(cfg: dict) -> dict:
    ballast = start_ballast(cfg["ballast_gib"]) if cfg.get("ballast_gib") else (None, None)
    try:
        r = Run(cfg)
        result = {"scenario": cfg["scenario"], "comfy_args": cfg["comfy_args"], "card": cfg.get("card"),
                  "ballast": ballast[1], "cpu": cfg.get("cpu", False)}
        result.update(SCENARIOS[cfg["scenario"]](r))
    finally:
        if ballast[0] is not None:
            ballast[0].stdin.close()
            ballast[0].wait(timeout=60)
    import comfy.model_management as mm
    import torch
    result.update(versions=versions(*VERSIONS), distributions=imported_distributions(), comfy_vram_state=mm.vram_state.name,
                  comfy_reserved_vram=mm.extra_reserved_memory(),
                  allocator=torch.cuda.get_allocator_backend() if torch.cuda.is_available() else None)
    return result
