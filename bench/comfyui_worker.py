"""The worker of bench_comfyui_gpu: one ComfyUI process (one emulated card) started through ComfyUI's
own code, its prompt worker on a thread, the shipped workflows queued, per queue its timing (from the
events ComfyUI sends its client) and memory peaks, then the UI's two /free calls.

Only the HTTP layer is replaced, by what its handlers call: POST /prompt = execution.validate_prompt +
PromptQueue.put, POST /free = PromptQueue.set_flag. Imported by the worker process before ComfyUI
starts; it imports no cogvid_core at module level (the pack ComfyUI loads brings its own).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.common.provenance import log, versions
from bench.common.sampling import MemSampler, nvml_gpu, proc_status, reset_host_peak
from bench.common.tables import fmt, gib
from bench.comfyui_workflows import edit_prompt, to_api

VERSIONS = ("torch", "diffusers", "transformers", "accelerate", "av", "nvidia-ml-py")


class BenchServer:
    """What PromptExecutor, PromptQueue, main.prompt_worker and main.hijack_progress call on
    server.PromptServer, minus the sockets: every event is kept with its time."""

    def __init__(self):
        self.client_id, self.last_node_id, self.last_prompt_id = None, None, None
        self.sockets_metadata, self.events = {}, []

    def send_sync(self, event, data, sid=None):
        self.events.append((time.perf_counter(), event, data))

    def queue_updated(self):
        pass


def start_comfyui(comfy_dir: str, comfy_args: list[str], server: BenchServer | None = None):
    """ComfyUI's start-up as main.py runs it, up to the prompt worker thread; returns (server, queue).
    ``server``: a BenchServer (or subclass) to receive the events; a new one by default."""
    sys.argv = [os.path.join(comfy_dir, "main.py"), *comfy_args]
    sys.path.insert(0, comfy_dir)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if "torch" in sys.modules:
        # cuda_malloc (below) picks the allocator through PYTORCH_CUDA_ALLOC_CONF, which torch reads
        # when it loads: a torch loaded earlier fails its first CUDA call (an internal assert).
        raise RuntimeError("the bench worker imported torch before ComfyUI's start-up; import it after "
                           "start_comfyui() returns")
    import comfy.options
    comfy.options.enable_args_parsing()
    import cuda_malloc  # noqa: F401   (main.py imports it before torch: ComfyUI's allocator choice)
    import main
    import execution
    import hook_breaker_ac10a0
    import nodes
    from comfy.cli_args import args
    main.cleanup_temp()
    server = server or BenchServer()
    hook_breaker_ac10a0.save_functions()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=not args.disable_all_custom_nodes,
                                       init_api_nodes=not args.disable_api_nodes))
    hook_breaker_ac10a0.restore_functions()
    main.hijack_progress(server)
    queue = execution.PromptQueue(server)
    threading.Thread(target=main.prompt_worker, daemon=True, args=(queue, server)).start()
    return server, queue


def post_prompt(queue, prompt: dict, number: int) -> str:
    import execution
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise ValueError(f"ComfyUI refused the prompt: {valid[1]} {valid[3]}")
    queue.put((number, prompt_id, prompt, {"client_id": "cogvid-bench"}, valid[2]))
    return prompt_id


def post_free(queue, free_memory: bool) -> None:
    """POST /free; returns once the prompt worker has acted on it and waits for work again.

    The flags are set while the worker waits in PromptQueue.get: set while it is busy (its gc after
    a prompt), the notify is lost and the real server, too, acts on them only at the next prompt or
    when get's 1000 s timeout ends."""
    def worker_waiting():
        return bool(queue.not_empty._waiters)
    while True:
        with queue.mutex:
            if worker_waiting():
                queue.set_flag("unload_models", True)
                if free_memory:
                    queue.set_flag("free_memory", True)
                break
        time.sleep(0.02)
    while True:
        with queue.mutex:
            if not queue.flags and worker_waiting():    # flags taken, worker back in get()
                return
        time.sleep(0.02)


def gpu_state(sampler: MemSampler) -> dict:
    """GPU and pinned host memory now (torch's caching host allocator, and what the pack page-locked with
    cudaHostRegister: staging buffers, offload copies), host RSS."""
    import torch
    out = {"host": proc_status()}
    out["nvml"], out["nvml_source"] = nvml_gpu(sampler.sample())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_allocated"] = torch.cuda.memory_allocated()
        out["torch_reserved"] = torch.cuda.memory_reserved()
        try:
            st = torch.cuda.host_memory_stats()    # allocated_bytes: blocks held (cache included); active: in use
            out["pinned_stats"] = {k: v for k, v in st.items() if "bytes" in k and k.endswith((".current", ".peak"))}
            out["pinned_held"] = st.get("allocated_bytes.current")
            out["pinned_active"] = st.get("active_bytes.current")
        except (RuntimeError, AttributeError) as e:
            out["pinned_error"] = f"{type(e).__name__}: {e}"
    from cogvid_core.memory.fileread import registered_bytes
    out["pinned_registered"] = registered_bytes()
    if "pinned_held" in out:
        out["pinned_held"] += out["pinned_registered"]
    return out


def timing(events: list, t0: float, sampler_id: str, decode_id: str | None) -> dict:
    """Per-node seconds (from 'executing' events), time to step 1 and s/step (sampler progress)."""
    starts = [(t, d.get("node")) for t, ev, d in events if ev == "executing"]
    nodes_s = {}
    for (t, node), (t_next, _) in zip(starts, starts[1:]):
        if node is not None:
            nodes_s[node] = nodes_s.get(node, 0.0) + t_next - t
    steps = [(t, d["value"]) for t, ev, d in events if ev == "progress" and str(d.get("node")) == sampler_id]
    out = {"nodes_s": nodes_s, "cached": next((d["nodes"] for _, ev, d in events if ev == "execution_cached"), [])}
    sampler_start = next((t for t, n in starts if n == sampler_id), None)
    if steps:
        out["to_first_step_s"] = steps[0][0] - t0
        if len(steps) > 1:
            out["s_per_step"] = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1])
        if sampler_start is not None:    # sampler start -> step 1 done, less one step: placing the weights
            out["sampler_to_first_step_s"] = steps[0][0] - sampler_start
    out["decode_s"] = nodes_s.get(decode_id)
    errors = [d for _, ev, d in events if ev == "execution_error"]
    if errors:
        out["error"] = f"{errors[0].get('exception_type')}: {errors[0].get('exception_message')}"[:500]
    return out


class WeightTimer:
    """Seconds the pack spends making placements (reading weights, pinning, copying resident ones) and
    moving offloaded weights onto the GPU (``Placed.__init__`` and ``Placed._onload``, GPU synchronised),
    and how many placements a queue made: a queue that re-places nothing shows 0 placements. Block
    streaming during the steps is not load: it is part of each step."""

    def __init__(self):
        self.placed, self.seconds, self.what = 0, 0.0, []

    def install(self) -> None:
        import torch
        from cogvid_core.memory import placement
        timer = self
        for name in ("__init__", "_onload"):
            orig = getattr(placement.Placed, name)

            def timed(*a, _orig=orig, _name=name, **k):
                t = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    if torch.cuda.is_available() and torch.cuda.is_initialized():
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t
                    timer.seconds += dt
                    timer.placed += _name == "__init__"
                    if _name == "__init__" or dt > 0.05:   # which model, in which mode, took the time
                        p = a[0]
                        timer.what.append(f"{_name}:{type(p.module).__name__}:{p.mode}:{dt:.2f}s")
            setattr(placement.Placed, name, timed)

    def take(self) -> dict:
        out = {"weights_placed": self.placed, "weights_load_s": self.seconds, "weights_what": self.what}
        self.placed, self.seconds, self.what = 0, 0.0, []
        return out


def run_queue(server, queue, sampler, prompt: dict, number: int, timeout: float, weights: WeightTimer) -> dict:
    """One POST /prompt, waited for; the memory peaks of this queue alone."""
    import torch
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_host_peak()
    sampler.take()
    weights.take()
    server.events.clear()
    t0 = time.perf_counter()
    prompt_id = post_prompt(queue, prompt, number)
    while not any(ev == "executing" and d.get("node") is None and d.get("prompt_id") == prompt_id
                  for _, ev, d in list(server.events)):
        if time.perf_counter() - t0 > timeout:
            import nodes
            nodes.interrupt_processing(True)     # Cancel, as POST /interrupt does
            timeout = float("inf")
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    peak = sampler.take()
    by_class = {n["class_type"]: k for k, n in prompt.items()}
    out = {"wall_s": wall, **timing(list(server.events), t0, by_class.get("CogVidSampler"), by_class.get("CogVidDecode")),
           **weights.take()}
    out["nvml_peak"], out["nvml_source"] = nvml_gpu(peak)
    out["host_peak"] = {k[5:]: v for k, v in peak.items() if k.startswith("host_")}
    out["host_peak"]["rss_hwm"] = proc_status().get("rss_hwm")
    if cuda:
        out["torch_peak_reserved"] = torch.cuda.max_memory_reserved()
        out["torch_peak_allocated"] = torch.cuda.max_memory_allocated()
    history = queue.get_history(prompt_id)[prompt_id]
    out["status"] = (history.get("status") or {}).get("status_str")
    out["plan_report"] = next((o["text"][0] for o in history.get("outputs", {}).values()
                               if isinstance(o, dict) and isinstance(o.get("text"), list) and o["text"]), None)
    out["after"] = gpu_state(sampler)
    return out


def worker(cfg: dict) -> dict:
    """One ComfyUI process (one emulated card): each workflow queued cfg['queues'] times, then /free."""
    sampler = MemSampler(os.getpid())
    server, queue = start_comfyui(cfg["comfyui"], cfg["comfy_args"])
    import nodes
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    sampler.start()
    weights = WeightTimer()
    weights.install()           # the pack's folder is on sys.path once ComfyUI loaded it
    result = {"comfy_args": cfg["comfy_args"], "before": gpu_state(sampler), "workflows": []}
    number, seed = 0, cfg["seed"]
    for wf_name, wf_path in cfg["workflows"]:
        prompt = to_api(json.loads(Path(wf_path).read_text()), nodes.NODE_CLASS_MAPPINGS)
        entry = {"workflow": wf_name, "queues": []}
        for i in range(cfg["queues"]):
            seed += 1
            row = run_queue(server, queue, sampler, edit_prompt(prompt, cfg["steps"], seed, cfg["overrides"]),
                            number, cfg["queue_timeout"], weights)
            row["seed"], number = seed, number + 1
            entry["queues"].append(row)
            log(f"[{cfg['card']}] {wf_name} queue {i + 1}: {row['status']} in {row['wall_s']:.1f} s, "
                f"s/step {fmt(row.get('s_per_step'), '.3f')}, NVML peak {gib(row['nvml_peak'])} GiB"
                + (f"  ERROR {row['error']}" if row.get("error") else ""))
            time.sleep(cfg["idle_s"])
        post_free(queue, free_memory=False)
        entry["after_unload_models"] = gpu_state(sampler)
        post_free(queue, free_memory=True)
        entry["after_free_memory"] = gpu_state(sampler)
        result["workflows"].append(entry)
    result["versions"] = versions(*VERSIONS)
    if torch.cuda.is_available():
        result["allocator"] = torch.cuda.get_allocator_backend()
    import comfy.model_management as mm
    result["comfy_vram_state"] = mm.vram_state.name
    result["comfy_reserved_vram"] = mm.extra_reserved_memory()
    return result


def worker_process(worker_fn) -> None:
    """A script's ``--worker CONFIG OUT`` child: ``worker_fn(config)`` written to OUT as JSON, then exit.
    The worker's ComfyUI imports cogvid_core from the pack it loads (copied into custom_nodes), never from
    this tree, and no folder of bench/ (common/) may shadow a module ComfyUI or a node imports: only
    bench.* (imported before this) was wanted from here."""
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # `kill -USR1`: where a stuck worker is
    repo = Path(__file__).resolve().parents[1]
    cfg_path, out_path = sys.argv[2], sys.argv[3]    # before ComfyUI's start-up, which rewrites sys.argv
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (repo, repo / "bench")]
    result = worker_fn(json.loads(Path(cfg_path).read_text()))
    Path(out_path).write_text(json.dumps(result, default=str))
    os._exit(0)     # the prompt worker thread never returns; skip interpreter teardown with CUDA live


def spawn_worker(script: str, cfg: dict, stem: str, base: Path, work: Path) -> tuple[dict | None, int, str]:
    """Run ``script --worker`` (its :func:`worker_process`) on ``cfg`` in ComfyUI's base folder ``base``:
    (its result, 0, "") or, when it failed, (None, its return code, the end of its log, also logged)."""
    import subprocess
    cfg_file, out_file, log_file = (work / f"{stem}.{ext}" for ext in ("json", "out.json", "log"))
    cfg_file.write_text(json.dumps(cfg))
    with open(log_file, "w") as logf:
        rc = subprocess.run([sys.executable, script, "--worker", str(cfg_file), str(out_file)],
                            cwd=str(base), stderr=logf).returncode
    if rc != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace")[-6000:]
        log(f"worker {stem} failed (rc {rc}); its log ends:\n{tail}")
        return None, rc, tail
    return json.loads(out_file.read_text()), 0, ""
