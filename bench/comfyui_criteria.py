"""bench_comfyui_faults' pure logic: what ComfyUI's client events say about a queue (which nodes ran,
which came from the cache, how it ended), the pack's out-of-memory line, and each scenario's pass/fail
criteria as rows (criterion, measured, limit, ok). No ComfyUI, torch or GPU: tests/test_bench.py
checks it on made-up events and results.

A criterion that cannot be measured where the bench ran (no NVML on a CPU machine) is a row with
``ok`` None and the reason as its measured value: "not run on CPU" is never counted as a pass.
"""
from __future__ import annotations

import re

GIB = 2 ** 30
KEPT_EVENTS = ("execution_start", "execution_cached", "executing", "execution_error", "execution_interrupted",
               "execution_success")
MODEL_LOADERS = ("CogVidTransformerLoader", "CogVidT5Loader", "CogVidVAELoader")
NOT_ON_CPU = "not run on CPU (no NVML / CUDA)"


# ----------------------------------------------------------------------------- events
def compact(events: list) -> list[dict]:
    """ComfyUI's (time, event, data) messages -> the few fields the criteria read, in order."""
    out = []
    for _, ev, d in events:
        if ev not in KEPT_EVENTS:
            continue
        row = {"event": ev}
        for key in ("node", "nodes", "node_id", "node_type", "exception_type", "exception_message", "executed"):
            if key in d:
                row[key] = d[key]
        out.append(row)
    return out


def executed(log: list[dict]) -> list[str]:
    """Nodes that ran (an 'executing' message; a cached node gets none), in order."""
    return [str(e["node"]) for e in log if e["event"] == "executing" and e.get("node") is not None]


def cached(log: list[dict]) -> list[str]:
    return [str(n) for e in log if e["event"] == "execution_cached" for n in e.get("nodes", [])]


def outcome(log: list[dict]) -> dict:
    """How the queue ended: success, interrupted (where) or error (where, and ComfyUI's message)."""
    for e in log:
        if e["event"] == "execution_success":
            return {"status": "success"}
        if e["event"] in ("execution_interrupted", "execution_error"):
            out = {"status": "interrupted" if e["event"] == "execution_interrupted" else "error",
                   "node": str(e.get("node_id")), "node_type": e.get("node_type")}
            if "exception_message" in e:
                out["exception_type"] = e.get("exception_type")
                out["message"] = e["exception_message"]
                out["first_line"] = first_line(e["exception_message"])
            return out
    return {"status": "unknown"}


def downstream(prompt: dict, node: str) -> set[str]:
    """The nodes that take ``node``'s outputs, directly or through others (an API prompt's links)."""
    found, todo = set(), [str(node)]
    while todo:
        cur = todo.pop()
        for nid, n in prompt.items():
            if nid not in found and any(isinstance(v, list) and len(v) == 2 and str(v[0]) == cur
                                        for v in n["inputs"].values()):
                found.add(nid)
                todo.append(nid)
    return found


def ids_of(prompt: dict, *classes: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] in classes]


# ----------------------------------------------------------------------------- the pack's OOM line
def first_line(message: str) -> str:
    """What the UI's error dialog shows first: ComfyUI appends its own OOM tips after a newline."""
    return (message or "").strip().splitlines()[0] if (message or "").strip() else ""


def parse_oom_line(line: str) -> dict:
    """guard.oom_message's parts: what the stage needs, what the GPU had free, the profile to pick."""
    need = re.search(r"needs ~([\d.]+) GiB", line)
    free = re.search(r"has ([\d.]+) GiB free", line)
    pick = re.search(r"use the '(\w+)' profile", line) or re.search(r"use the (\w+) profile", line)
    return {"needs_gib": float(need.group(1)) if need else None, "free_gib": float(free.group(1)) if free else None,
            "pick": pick.group(1) if pick else None}


# ----------------------------------------------------------------------------- memory
def levels(state: dict) -> dict:
    """GPU (NVML: the process, else the device), page-locked host and anonymous host bytes of a gpu_state."""
    return {"gpu": state.get("nvml"), "pinned": state.get("pinned_held"),
            "host_anon": (state.get("host") or {}).get("rss_anon"), "host_file": (state.get("host") or {}).get("rss_file")}


def delta_gib(after: dict, before: dict, key: str) -> float | None:
    a, b = levels(after)[key], levels(before)[key]
    return None if a is None or b is None else (a - b) / GIB


def spread_gib(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return (max(vals) - min(vals)) / GIB if len(vals) > 1 else None


# ----------------------------------------------------------------------------- rows
def row(criterion: str, measured, limit, ok) -> dict:
    return {"criterion": criterion, "measured": measured, "limit": limit, "ok": ok}


def within(criterion: str, value: float | None, limit: float, cpu: bool, what: str = "GiB") -> dict:
    """|value| <= limit; where no value could be read: not run on CPU (or 'not measured')."""
    if value is None:
        return row(criterion, NOT_ON_CPU if cpu else "not measured", f"<= {limit} {what}", None)
    return row(criterion, round(value, 3), f"<= {limit} {what}", abs(value) <= limit)


def memory_rows(label: str, after: dict, before: dict, limit: float, cpu: bool, against: str = "before",
                judge=("gpu", "pinned", "host_anon")) -> list[dict]:
    """GPU, page-locked and anonymous host memory after - before; those not in ``judge`` are recorded only."""
    rows = []
    for key, what in (("gpu", "GPU (NVML)"), ("pinned", "page-locked host"), ("host_anon", "host anonymous RSS")):
        r = within(f"{label}: {what} vs {against}", delta_gib(after, before, key), limit, cpu)
        if key not in judge and r["ok"] is not None:
            r.update(limit="recorded", ok=None)
        rows.append(r)
    return rows


def oom_criteria(res: dict, back_gib: float) -> list[dict]:
    cpu = res.get("cpu", False)
    fail, nxt = res["failed"], res["next"]
    out = fail["outcome"]
    line = out.get("first_line", "")
    parts = parse_oom_line(line)
    rows = [row("24gb resident queue fails with an error (not a crash)", f"{out['status']} in {out.get('node_type')}",
                "error", out["status"] == "error"),
            row("UI error (its first line)", line or "-", "-", None),
            row("out of memory was real", "injected (CPU: no device memory to run out of)" if res.get("injected")
                else out.get("exception_type"), "torch.OutOfMemoryError (the pack's StageOOM is one)",
                None if res.get("injected") else any(t in str(out.get("exception_type"))
                                                     for t in ("OutOfMemoryError", "StageOOM"))),
            row("UI error's first line: what the stage needed", parts["needs_gib"], "GiB named",
                parts["needs_gib"] is not None),
            row("UI error's first line: what was free", parts["free_gib"] if parts["free_gib"] is not None
                else (NOT_ON_CPU if cpu else None), "GiB named", None if cpu else parts["free_gib"] is not None),
            row("UI error's first line: what to pick", parts["pick"], "a profile named", parts["pick"] is not None)]
    # against a fresh process: the GPU must be back; host memory may hold what ComfyUI keeps cached (the
    # loaders' outputs, their page-locked buffers), so it is recorded, and judged only on a CPU, where the
    # models' memory is host memory
    judge = ("host_anon",) if cpu else ("gpu",)
    rows += memory_rows("after the failed queue (settled)", fail["settled"], res["before"], back_gib, cpu, judge=judge)
    rows.append(row("next queue (12gb) succeeds", nxt["outcome"]["status"], "success",
                    nxt["outcome"]["status"] == "success"))
    rows += memory_rows("after the 12gb queue and Unload models", res["after_unload"], res["before"], back_gib, cpu,
                        judge=judge)
    return rows


def cancel_criteria(res: dict, back_gib: float) -> list[dict]:
    cpu = res.get("cpu", False)
    base = res["baseline"]["settled"]
    rows = []
    for key, where, label in (("sampling", "CogVidSampler", f"cancel after step {res.get('cancel_step')}"),
                              ("decode", "CogVidDecode", "cancel during decode")):
        q = res[key]
        out = q["outcome"]
        rows.append(row(f"{label}: interrupted in {where}", f"{out['status']} in {out.get('node_type')}"
                        + ("" if q.get("fired") else " (trigger never fired)"), f"interrupted in {where}",
                        out["status"] == "interrupted" and out.get("node_type") == where and bool(q.get("fired"))))
        rows += memory_rows(f"after {label} (settled)", q["settled"], base, back_gib, cpu, "a completed queue")
    nxt = res["next"]["outcome"]["status"]
    rows.append(row("next queue after the sampling cancel succeeds", nxt, "success", nxt == "success"))
    rq = res["requeue"]
    rows.append(row("re-queue after the decode failure succeeds", rq["outcome"]["status"], "success",
                    rq["outcome"]["status"] == "success"))
    prompt, dec = res["prompt_classes"], res["decode_id"]
    allowed = set(res["decode_downstream"]) | {dec}
    ran = executed(rq["log"])
    names = [prompt.get(n, n) for n in ran]
    rows.append(row("re-queue re-ran only the decode (and what takes its frames)", ", ".join(names) or "nothing",
                    "CogVidDecode + its consumers; Sampler cached",
                    dec in ran and set(ran) <= allowed and res["sampler_id"] in cached(rq["log"])))
    return rows


def mixed_criteria(res: dict, flat_gib: float) -> list[dict]:
    cpu = res.get("cpu", False)
    qs = res["queues"]
    ok_count = sum(q["outcome"]["status"] == "success" for q in qs)
    rows = [row("queues run", f"{len(qs)} of {res['requested']}", f"{res['requested']}", len(qs) == res["requested"]),
            row("queues that succeeded", f"{ok_count} of {len(qs)}", f"{len(qs)}", ok_count == len(qs))]
    wrong, reloads, changes = [], 0, 0
    for i, q in enumerate(qs):
        changed = i == 0 or q["model"] != qs[i - 1]["model"]     # the first queue loads too
        reloads, changes = reloads + bool(q["loaders_ran"]), changes + changed
        if bool(q["loaders_ran"]) != changed:
            wrong.append(f"q{i + 1} {q['workflow']}: {'re-ran' if q['loaders_ran'] else 'cached'}")
    rows.append(row("model loaders re-ran only when the variant changed",
                    f"{reloads} reloads, {changes} variant changes" + (f"; {'; '.join(wrong)}" if wrong else ""),
                    "reload <=> variant change", not wrong))
    lora = [q for q in qs if q.get("strength") is not None]
    lora_ran = sum(bool(q["lora_ran"]) for q in lora)
    rows.append(row("LoRA strength change applied (LoRA Loader re-ran)", f"{lora_ran} of {len(lora)}",
                    f"{len(lora)}", lora_ran == len(lora) if lora else None))
    for q in qs:
        q["gpu_peak"] = gpu_peak(q)
    for key, label in (("gpu_peak", "GPU peak as nvidia-smi would show it (see gpu_peak)"),
                       ("nvml_peak", "nvidia-smi peak, sampled every 50 ms"),
                       ("pinned", "page-locked host after the queue"),
                       ("host_anon", "host anonymous RSS after the queue")):
        worst, name = None, "-"
        for wf in dict.fromkeys(q["workflow"] for q in qs):
            later = [q[key] for q in qs if q["workflow"] == wf][1:]     # its first queue loads: left out
            s = spread_gib(later)
            if s is not None and (worst is None or s > worst):
                worst, name = s, wf
        r = within(f"{label}: largest spread within one workflow (its 2nd..last queue)", worst, flat_gib, cpu)
        if worst is not None:
            r["measured"] = f"{worst:.3f} ({name})"
        elif any(q[key] is not None for q in qs):
            r["measured"] = "too few queues: a workflow needs 3"
        if key == "nvml_peak" and r["ok"] is not None:    # a lower bound: judged through gpu_peak
            r.update(limit="recorded", ok=None)
        rows.append(r)
    return rows


def gpu_peak(q: dict) -> int | None:
    """A queue's GPU peak as nvidia-smi would show it: the larger of the 50 ms NVML samples' peak and
    torch's reserved peak plus what the process holds outside torch (NVML minus torch's reserved, after
    the queue: the CUDA context, library handles). A sample misses a peak shorter than 50 ms (H100,
    session 16: the LoRA workflow at 256x160 samples 0.07 s a step; 2 of its 6 queues read 0.34-0.41 GiB
    below torch's own reserved peak + context, while that sum stayed within 0.06 GiB)."""
    after = q.get("after") or {}
    parts = (q.get("torch_peak_reserved"), after.get("nvml"), after.get("torch_reserved"))
    derived = None if None in parts else parts[0] + parts[1] - parts[2]
    found = [v for v in (q.get("nvml_peak"), derived) if v is not None]
    return max(found) if found else None


def table(rows_by_scenario: dict) -> str:
    lines = ["| scenario | criterion | measured | limit | ok |", "|---|---|---|---|---|"]
    for scen, rows in rows_by_scenario.items():
        for r in rows:
            ok = {True: "yes", False: "**NO**", None: "-"}[r["ok"]]
            measured = str(r["measured"]).replace("|", "/").replace("\n", " ")
            lines.append(f"| {scen} | {r['criterion']} | {measured[:200]} | {r['limit']} | {ok} |")
    return "\n".join(lines)
