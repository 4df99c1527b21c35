"""ComfyUI workflows as the bench queues them: the UI format turned into the API prompt POST /prompt
takes (widget order from the node classes' INPUT_TYPES; a seed's control_after_generate and an image
upload button carry an extra value), the few values a run changes, and the command line that runs
the same plan."""
from __future__ import annotations

import json

IMAGE_NAME = "cogvid_bench_start.png"
# The bench's short names (--run CARD:WF, the "workflow" field of its JSON files) for the shipped
# workflows/ files, whose names are the titles ComfyUI's Browse Templates shows. The bench makes and
# runs 1.5 checkpoints only: the 5B workflow has no short name (pass its .json with 5B checkpoints).
WORKFLOW_FILES = {
    "24gb": "CogVideoX1.5 I2V - 24 GB cards - 81 frames 1360x768.json",
    "12gb": "CogVideoX1.5 I2V - 12 GB and 8 GB cards - 81 frames 1360x768.json",
    "lora_24gb": "CogVideoX1.5 I2V + LoRA - 24 GB cards - 81 frames 1360x768.json",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
EXTRA_WIDGET_FLAGS = ("control_after_generate", "image_upload")   # the UI stores one more value for each
FRONTEND_ONLY = ("Note", "MarkdownNote")    # virtual nodes: drawn by the UI, never sent to the server


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
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:   # muted / bypassed / a note: not sent
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
