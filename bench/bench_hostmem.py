"""Host memory of the streamed / offloaded transformer and T5: today's placements vs file streaming.

Today ("loaded"): the model is read into host memory, then group offloading (stream) or the offload
mode pins a full host copy. File streaming ("file", cogvid_core.memory.filestream): the model stays in its
safetensors files; blocks are read into two pinned staging buffers and copied to the GPU on a side
stream. Each case runs in its own process so host peaks do not mix; per case it records the load
time, the first and the steady forward time, and peak host memory by kind (cogvid_core.device.devmem:
anonymous + pinned, file-backed, torch's pinned allocator) during load and during the forwards.

    python3 bench/bench_hostmem.py --dir /tmp/ck --layers 16 --out bench/hostmem_h200.json
    python3 bench/bench_hostmem.py --case diag        # how pinned memory shows up; the soak counter

Transformer forwards are one CFG branch of CogVideoX1.5 at 81x768x1360 (22 latent frames after
1.5's padding: 44,880 video tokens + 226 text tokens), random inputs; T5 encodes two 226-token
prompts (prompt and negative prompt). ``--layers`` caps both models' depth (widths unchanged):
the loaded cases' host memory and every case's time scale with the block count, the file cases'
host memory does not.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cogvid_core.model import fileindex as FI  # noqa: E402
from cogvid_core.device import devmem  # noqa: E402
from cogvid_core.model import loading as L  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.memory import placement as P  # noqa: E402
from cogvid_core.model.sources import weight_files  # noqa: E402
from bench.common.checkpoints import hf_checkpoints  # noqa: E402
from bench.common.provenance import card_name, provenance, write_json  # noqa: E402
from bench.common.tables import fmt  # noqa: E402

GIB = 1024 ** 3
CASES = {   # name: (component, weights, placement mode)
    "t5_resident": ("text_encoder", "loaded", "resident"),
    "t5_group_stream": ("text_encoder", "loaded", "stream"),
    "t5_pinned_offload": ("text_encoder", "loaded", "offload"),
    "t5_file_stream": ("text_encoder", "file", "stream"),
    "t5_file_offload": ("text_encoder", "file", "offload"),
    "tr_resident": ("transformer", "loaded", "resident"),
    "tr_group_stream": ("transformer", "loaded", "stream"),
    "tr_pinned_offload": ("transformer", "loaded", "offload"),
    "tr_file_stream": ("transformer", "file", "stream"),
    "tr_file_offload": ("transformer", "file", "offload"),
}


def build(component: str, weights: str, folder: Path):
    """The model on the host ("loaded") or file-backed on the meta device ("file")."""
    if weights == "loaded":
        if component == "transformer":
            return L.load_transformer(folder, torch.bfloat16, "cpu", progress=False)[0]
        return L.load_text_encoder(folder, torch.bfloat16, "cpu", progress=False)[0]
    if component == "transformer":
        from diffusers import CogVideoXTransformer3DModel
        _, config, files, _ = L._transformer_source(folder, None, False)
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel.from_config(config)
        FI.lazy_load(model, files, torch.bfloat16)
        return L._finish(model)
    from transformers import T5Config, T5EncoderModel
    te = folder / "text_encoder"
    with torch.device("meta"):
        model = T5EncoderModel(T5Config.from_pretrained(str(te)))
    FI.lazy_load(model, weight_files(te, ("model",)), torch.bfloat16, finalize=L._tie_embeddings)
    return L._finish(model)


def transformer_inputs(cfg, frames: int, height: int, width: int, dev) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    lat_f = (frames - 1) // 4 + 1
    pt = cfg.patch_size_t or 1
    lat_f += -lat_f % pt                     # 1.5 pads the latent frames to whole temporal patches
    h, w = height // 8, width // 8
    tokens = lat_f // pt * (h // cfg.patch_size) * (w // cfg.patch_size)
    angle = torch.rand(tokens, cfg.attention_head_dim, generator=g, device=dev) * 6.0
    kw = dict(hidden_states=torch.randn(1, lat_f, cfg.in_channels, h, w, generator=g, device=dev, dtype=torch.bfloat16),
              encoder_hidden_states=torch.randn(1, M.MAX_TEXT_TOKENS, cfg.text_embed_dim, generator=g, device=dev,
                                                dtype=torch.bfloat16),
              timestep=torch.full((1,), 500, device=dev), image_rotary_emb=(angle.cos(), angle.sin()),
              return_dict=False)
    if cfg.ofs_embed_dim:
        kw["ofs"] = torch.full((1,), 2.0, device=dev)
    return kw


def run_case(name: str, folder: Path, frames: int, height: int, width: int, reps: int) -> dict:
    component, weights, mode = CASES[name]
    dev = torch.device("cuda", 0)
    torch.cuda.init()
    start = devmem.host_memory()
    with devmem.HostMemoryPeak() as whole:
        t0 = time.perf_counter()
        with devmem.HostMemoryPeak() as load:
            model = build(component, weights, folder)
            placed = P.place(model, dev, mode)
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        times, t1 = [], time.perf_counter()
        with devmem.HostMemoryPeak() as compute, placed.use() as m, torch.no_grad():    # offload: reads all in
            for _ in range(reps):
                if component == "transformer":
                    kw = transformer_inputs(m.config, frames, height, width, dev)
                    m(**kw)
                else:
                    for seed in (1, 2):          # prompt and negative prompt
                        ids = torch.randint(0, 32000, (1, M.MAX_TEXT_TOKENS), device=dev,
                                            generator=torch.Generator(device=dev).manual_seed(seed))
                        m(ids)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t1)
                t1 = time.perf_counter()
    files = placed._files
    row = dict(case=name, component=component, weights=weights, mode=mode, blocks=_blocks(model),
               load_s=round(load_s, 3), first_s=round(times[0], 3), load_plus_first_s=round(load_s + times[0], 3),
               steady_s=round(sum(times[1:]) / max(1, len(times) - 1), 3), times_s=[round(t, 3) for t in times],
               gpu_peak_alloc_gib=torch.cuda.max_memory_allocated(dev) / GIB,
               staging_gib=files.staging_bytes() / GIB if files is not None else None,
               host_start=_gib(start), host_peak_load=_gib(load.peak), host_peak_compute=_gib(compute.peak),
               host_peak=_gib(whole.peak))
    placed.release()
    del model, m
    devmem.free_memory(dev, host_cache=True)
    row["host_after_release"] = _gib(devmem.host_memory())
    return row


def _blocks(model) -> int:
    return len(P.stream_root(model).get_submodule("transformer_blocks" if hasattr(model, "transformer_blocks")
                                                  else "block"))


def _gib(d: dict) -> dict:
    return {k: round(v / GIB, 3) for k, v in d.items()}


# ------------------------------------------------------------------------------- diag: pinned memory in /proc
def _proc_kib(path: str, fields: tuple[str, ...]) -> dict:
    out = {}
    with open(path) as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                out[key] = int(line.split()[1])
    return out


def _smaps_nvidia_kib() -> dict:
    """Resident and locked KiB of this process's mappings of /dev/nvidia* vs all mappings."""
    out, nvidia = dict(nvidia_rss=0, nvidia_locked=0, locked=0), False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                nvidia = len(parts) > 5 and "nvidia" in parts[5]
            elif parts and parts[0] == "Rss:" and nvidia:
                out["nvidia_rss"] += int(parts[1])
            elif parts and parts[0] == "Locked:":
                out["locked"] += int(parts[1])
                out["nvidia_locked"] += int(parts[1]) if nvidia else 0
    return out


def snap(rows: list, tag: str) -> None:
    torch.cuda.synchronize()
    st = torch.cuda.host_memory_stats()
    rows.append(dict(tag=tag, **_gib(devmem.host_memory()),
                     torch_active_gib=st.get("active_bytes.current", 0) / GIB,
                     torch_allocated_gib=st.get("allocated_bytes.current", 0) / GIB,
                     smaps_gib={k: round(v / 2 ** 20, 3) for k, v in _smaps_nvidia_kib().items()},
                     meminfo_gib={k: round(v / 2 ** 20, 3) for k, v in _proc_kib(
                         "/proc/meminfo", ("MemAvailable", "Mlocked", "Unevictable", "Shmem")).items()}))


def diag() -> dict:
    """Where 1 GiB of pinned memory shows up (torch's allocator: cudaHostAlloc; our staging:
    cudaHostRegister), and torch's pinned counters over the soak's place/stream/release cycles."""
    from cogvid_core.model import testing

    dev, rows = torch.device("cuda", 0), []
    torch.cuda.init()
    snap(rows, "start")
    z = torch.empty(GIB, dtype=torch.uint8, pin_memory=True).fill_(1)
    del z
    devmem.empty_host_cache()
    snap(rows, "1 GiB pinned, freed without any copy, cache emptied")
    x = torch.empty(GIB, dtype=torch.uint8, pin_memory=True).fill_(1)
    snap(rows, "torch.empty(1 GiB, pin_memory=True)")
    on_gpu = x.to(dev, non_blocking=True)
    del x, on_gpu
    snap(rows, "freed after a non_blocking copy (torch caches the block)")
    devmem.empty_host_cache()
    snap(rows, "empty_host_cache")
    y = torch.ones(GIB, dtype=torch.uint8)
    snap(rows, "plain 1 GiB tensor")
    rc = torch.cuda.cudart().cudaHostRegister(y.data_ptr(), y.numel(), 0)
    snap(rows, f"cudaHostRegister on it (rc {int(getattr(rc, 'value', rc))})")
    torch.cuda.cudart().cudaHostUnregister(y.data_ptr())
    del y
    snap(rows, "unregistered, freed")
    for i in range(3):       # the soak: a streamed model placed, run, released, host cache emptied
        model = testing._build("transformer", M.V15, tiny=False, layers=2).to(torch.bfloat16).eval()
        placed = P.place(model, dev, "stream")
        with placed.use() as m, torch.no_grad():
            m(**transformer_inputs(m.config, 9, 64, 64, dev))
        placed.release()
        del model, placed, m
        devmem.free_memory(dev, host_cache=True)
        snap(rows, f"soak cycle {i + 1}: group-offloaded 2-block transformer placed, run, released, cache emptied")
    d = rows[2]["anon"] + rows[2].get("shmem", 0) - rows[1]["anon"] - rows[1].get("shmem", 0)
    return dict(rows=rows, pinned_in_rss=d > 0.9)


# ------------------------------------------------------------------------------- driver
def _sub(args, case: str, pinned_in_rss: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--dir", str(args.dir), "--frames", str(args.frames),
           "--height", str(args.height), "--width", str(args.width), "--reps", str(args.reps),
           "--pinned-in-rss", str(int(pinned_in_rss))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return dict(case=case, error=(proc.stdout + proc.stderr)[-2000:])


def table(rows: list[dict]) -> str:
    f = fmt
    lines = ["| case | blocks | load s | first fwd s | load+first s | steady s/fwd | host anon+pinned peak GiB "
             "(load / compute) | file-backed peak GiB | torch pinned peak GiB | staging GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][-120:]!r} |")
            continue
        lo, co = r["host_peak_load"], r["host_peak_compute"]
        lines.append(f"| {r['case']} | {r['blocks']} | {f(r['load_s'])} | {f(r['first_s'])} | "
                     f"{f(r['load_plus_first_s'])} | {f(r['steady_s'], '.3f')} | {f(lo.get('anon_pinned'))} / "
                     f"{f(co.get('anon_pinned'))} | {f(r['host_peak'].get('file'))} | {f(r['host_peak'].get('pinned'))} | "
                     f"{f(r['staging_gib'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/hostmem_ck"), help="checkpoint folder (written if absent)")
    ap.add_argument("--layers", type=int, default=None, help="cap transformer and T5 depth (default: full)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=1360)
    ap.add_argument("--reps", type=int, default=3, help="forwards per case (first one includes the first reads)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--case", default=None, help="run one case (or 'diag') in this process and print RESULT json")
    ap.add_argument("--pinned-in-rss", type=int, default=1)
    ap.add_argument("--case-timeout", type=int, default=300)
    ap.add_argument("--no-diag", action="store_true", help="skip the pinned-memory diagnosis")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    devmem.PINNED_IN_RSS = bool(args.pinned_in_rss)
    if args.case:
        folder = args.dir / M.V15.folder
        res = diag() if args.case == "diag" else run_case(args.case, folder, args.frames, args.height, args.width,
                                                          args.reps)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    out = dict(provenance(card_name(torch.device("cuda", 0))), host=platform.node(), layers=args.layers,
               frames=args.frames, height=args.height, width=args.width, reps=args.reps)
    pinned_in_rss = devmem.PINNED_IN_RSS
    if not args.no_diag:
        out["diag"] = _sub(args, "diag", False)
        pinned_in_rss = bool(out["diag"].get("pinned_in_rss"))
        print(json.dumps(out["diag"], indent=1), flush=True)
    if not (args.dir / M.V15.folder / "model_index.json").exists():
        t0 = time.perf_counter()
        hf_checkpoints(args.dir, M.V15.key, full=True, layers=args.layers)
        out["write_s"] = round(time.perf_counter() - t0, 1)
    out["cases"] = []
    for case in args.cases.split(","):
        out["cases"].append(_sub(args, case, pinned_in_rss))
        print(json.dumps(out["cases"][-1]), flush=True)
        if args.out:
            write_json(args.out, out)
    print(table(out["cases"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
