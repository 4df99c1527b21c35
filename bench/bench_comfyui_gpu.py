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
import asyncio
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
import uuid
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
PACK_NAME = "comfyui-cogvid-i2v"
IMAGE_NAME = "cogvid_bench_start.png"
DEFAULT_RUNS = ("full:24gb,12gb", "12:12gb", "8:12gb")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
EXTRA_WIDGET_FLAGS = ("control_after_generate", "image_upload")   # the UI stores one more value for each
STATUS_FIELDS = {"VmRSS": "rss", "VmHWM": "rss_hwm", "RssAnon": "rss_anon", "RssFile": "rss_file",
                 "RssShmem": "rss_shmem"}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- memory readings
def proc_status(pid: int | str = "self") -> dict:
    """Host memory of a process in bytes (resident, its peak, anonymous / file-backed / shared)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in STATUS_FIELDS:
                    out[STATUS_FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def reset_host_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # resets VmHWM to the current RSS
    except OSError:
        pass


class MemSampler(threading.Thread):
    """Every 50 ms: NVML memory of one process (what nvidia-smi lists) and of the whole GPU, and the
    process's host memory; keeps the maxima since the last take()."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period, self.nvml, self.error = pid, period, None, None
        self.lock, self.peak, self.halt = threading.Lock(), {}, threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(index) if index.isdigit() else 0)
            self.nvml = pynvml
        except Exception as e:      # no NVML (CPU machine, no nvidia-ml-py): host memory only
            self.error = f"{type(e).__name__}: {e}"

    def read(self) -> dict:
        out = {f"host_{k}": v for k, v in proc_status(self.pid).items() if k != "rss_hwm"}
        if self.nvml is not None:
            out["nvml_device_used"] = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == self.pid and p.usedGpuMemory is not None:
                    out["nvml_process"] = p.usedGpuMemory
        return out

    def run(self):
        while not self.halt.wait(self.period):
            self.sample()

    def sample(self) -> dict:
        now = self.read()
        with self.lock:
            for k, v in now.items():
                self.peak[k] = max(v, self.peak.get(k, v))
        return now

    def take(self) -> dict:
        """Peaks since the last take (one last sample included), then start over."""
        self.sample()
        with self.lock:
            peak, self.peak = self.peak, {}
        return peak

    def total_bytes(self) -> int | None:
        return None if self.nvml is None else self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total

    def device_name(self) -> str | None:
        if self.nvml is None:
            return None
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return name.decode() if isinstance(name, bytes) else name


def nvml_gpu(reading: dict) -> tuple[int | None, str]:
    """The process's own NVML figure where NVML lists it, else the whole GPU's used memory."""
    if "nvml_process" in reading:
        return reading["nvml_process"], "process"
    return reading.get("nvml_device_used"), "device"


# ----------------------------------------------------------------------------- UI workflow -> API prompt
def _is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def widget_names(cls) -> list[tuple[str, int]]:
    """(input name, values the UI stores for it) in the order the UI lays out the widgets."""
    types = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            if _is_widget(spec):
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                out.append((name, 1 + sum(bool(opts.get(f)) for f in EXTRA_WIDGET_FLAGS)))
    return out


def to_api(workflow: dict, classes: dict) -> dict:
    """ComfyUI's UI format (nodes, links, widgets_values) -> the API prompt POST /prompt takes."""
    links = {ln[0]: (str(ln[1]), ln[2]) for ln in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):          # muted / bypassed: not sent by the UI
            continue
        cls = classes[node["type"]]
        values, inputs, i = list(node.get("widgets_values") or []), {}, 0
        optional = set(cls.INPUT_TYPES().get("optional", {}))
        for name, width in widget_names(cls):
            if i >= len(values) and name in optional:     # a newer optional input: ComfyUI takes its default
                continue
            if i >= len(values):
                raise ValueError(f"node {node['id']} ({node['type']}): fewer widget values than widgets "
                                 f"({values}); the workflow and the node's inputs disagree")
            inputs[name] = values[i]
            i += width
        if i != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, "
                             f"{i} expected from its inputs")
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                inputs[inp["name"]] = list(links[inp["link"]])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def edit_prompt(prompt: dict, steps: int, seed: int, overrides: dict) -> dict:
    """Steps, seed, start image and the --frames/--size overrides; everything else as shipped."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            inputs["image"] = IMAGE_NAME
        if node["class_type"].startswith("CogVid"):
            for key, value in (("steps", steps), ("seed", seed), *overrides.items()):
                if key in inputs and not isinstance(inputs[key], list):
                    inputs[key] = value
    return out


# ----------------------------------------------------------------------------- the worker: ComfyUI in-process
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


def start_comfyui(comfy_dir: str, comfy_args: list[str]):
    """ComfyUI's start-up as main.py runs it, up to the prompt worker thread; returns (server, queue)."""
    sys.argv = [os.path.join(comfy_dir, "main.py"), *comfy_args]
    sys.path.insert(0, comfy_dir)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import comfy.options
    comfy.options.enable_args_parsing()
    import cuda_malloc  # noqa: F401   (main.py imports it before torch: ComfyUI's allocator choice)
    import main
    import execution
    import hook_breaker_ac10a0
    import nodes
    from comfy.cli_args import args
    main.cleanup_temp()
    server = BenchServer()
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
    result["versions"] = versions()
    if torch.cuda.is_available():
        result["allocator"] = torch.cuda.get_allocator_backend()
    import comfy.model_management as mm
    result["comfy_vram_state"] = mm.vram_state.name
    result["comfy_reserved_vram"] = mm.extra_reserved_memory()
    return result


# ----------------------------------------------------------------------------- the command line, same plan
def plan_args(workflow: dict, steps: int, seed: int, overrides: dict) -> list[str]:
    """`cogvid_core i2v` arguments for the workflow's settings: sampler, image size, estimate plan."""
    by_type = {n["type"]: n["widgets_values"] for n in workflow["nodes"]}
    frames, _, cfg, dynamic, scheduler = by_type["CogVidSampler"][:5]
    width, height, resize = by_type["CogVidImageEncode"][:3]
    _, _, _, _, profile, budget = by_type["CogVidVRAMEstimate"][:6]
    positive, negative = by_type["CogVidTextEncode"][:2]
    frames, width, height = (overrides.get(k, v) for k, v in (("frames", frames), ("width", width), ("height", height)))
    out = ["--frames", frames, "--width", width, "--height", height, "--steps", steps, "--cfg", cfg,
           "--scheduler", scheduler, "--seed", seed, "--resize", resize, "--profile", profile,
           "--prompt", positive, "--negative-prompt", negative]
    if budget:
        out += ["--vram-budget", budget]
    return [str(x) for x in out] + ([] if dynamic else ["--no-dynamic-cfg"])


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
def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def gib(v) -> str:
    return fmt(None if v is None else v / GIB)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "av", "nvidia-ml-py"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def overrides_of(args) -> dict:
    out = {"frames": args.frames} if args.frames else {}
    if args.size:
        out["width"], out["height"] = (int(v) for v in args.size.lower().split("x"))
    return out


def workflow_path(name: str, pack: Path) -> Path:
    p = Path(name)
    return p if p.suffix == ".json" else pack / "workflows" / f"cogvideox1.5_i2v_{name}.json"


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
    if args.make_checkpoints and not (model_root / "CogVideoX1.5-5B-I2V" / "model_index.json").is_file():
        cmd = [sys.executable, "-m", "cogvid_core", "make-checkpoints", str(model_root), "--variant",
               "cogvideox1.5-5b-i2v", "--layouts", "hf"] + (["--full"] if args.make_checkpoints == "full" else [])
        cmd += ["--layers", str(args.layers)] if args.layers else []
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=args.pack, check=True, stdout=subprocess.DEVNULL)
        log(f"checkpoints written in {time.perf_counter() - t0:.0f} s: {shlex.join(cmd)}")
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
    cfg_file, out_file, log_file = (work / f"worker_{card}.{ext}" for ext in ("json", "out.json", "log"))
    cfg_file.write_text(json.dumps(cfg))
    with open(log_file, "w") as logf:
        rc = subprocess.run([sys.executable, __file__, "--worker", str(cfg_file), str(out_file)],
                            cwd=str(base), stderr=logf).returncode
    if rc != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace")[-6000:]
        log(f"worker for card {card} failed (rc {rc}); its log ends:\n{tail}")
        return {"card": card, "error": f"worker rc {rc}", "log_tail": tail}
    res = json.loads(out_file.read_text())
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
    p.add_argument("--run", action="append", help="CARD:WF[,WF][:COMFY ARGS], CARD 'full' or GiB, WF 24gb/12gb "
                   f"or a .json; repeatable (default {' '.join(DEFAULT_RUNS)})")
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
            Path(args.json).write_text(json.dumps({
                "command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "card": sampler.device_name(), "gpu_total_bytes": total, "comfyui": comfy_version(args.comfyui),
                "driver_versions": versions(), "args": vars(args), "runs": results, "cli": cli,
                "table": table(results, cli, classes)}, indent=1, default=str))
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
        import faulthandler
        import signal
        faulthandler.register(signal.SIGUSR1, all_threads=True)    # `kill -USR1`: where a stuck worker is
        out_path = sys.argv[3]
        result = worker(json.loads(Path(sys.argv[2]).read_text()))
        Path(out_path).write_text(json.dumps(result, default=str))
        os._exit(0)     # the prompt worker thread never returns; skip interpreter teardown with CUDA live
    sys.exit(main())
