"""diffusers' own pipeline, the reference our profiles are measured against, and the inputs both use.

``apply_recipe`` puts a ``CogVideoXImageToVideoPipeline`` in one of diffusers' documented memory
recipes; ``run_staged`` calls it the way every bench does (same prompt, dynamic CFG, seed on the CPU
generator, frames as tensors) with each stage (text encode, image encode, denoise, decode) under an
engine ``StageRecorder``, so its rows line up with ours stage by stage.
"""
from __future__ import annotations

from contextlib import ExitStack

PROMPT = "a small red boat moves slowly over the river under a bright sky, camera pans"
RECIPES = ("diffusers-resident", "diffusers-model-offload", "diffusers-group-offload",
           "diffusers-sequential-offload")


def start_image(height: int, width: int, seed: int = 0):
    """A deterministic start picture with structure at every scale (gradients, waves, noise)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 37.0 + yy / 23.0)], -1)
    arr = np.clip(base * 200 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def apply_recipe(pipe, recipe: str, device) -> None:
    """One of RECIPES on ``pipe`` (on the CPU every recipe is the resident one: nothing to offload to)."""
    import torch
    if recipe not in RECIPES:
        raise ValueError(f"unknown diffusers recipe {recipe!r}; known: {', '.join(RECIPES)}")
    if recipe == "diffusers-resident" or device.type == "cpu":
        pipe.to(device)
    elif recipe == "diffusers-model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif recipe == "diffusers-sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:                      # diffusers-group-offload
        from diffusers.hooks import apply_group_offloading
        for m in (pipe.transformer, pipe.text_encoder):
            apply_group_offloading(m, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        # the VAE runs through encode()/decode(), not forward(): block level never onloads its top group
        apply_group_offloading(pipe.vae, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="leaf_level", use_stream=True)


def run_staged(pipe, rec, image, *, frames: int, height: int, width: int, steps: int, cfg: float, seed: int,
               on_step=None, decode_to_end: bool = False):
    """``pipe(...)`` with its stages recorded in ``rec``; returns the video tensor batch ([B, T, C, H, W]).

    The denoise stage runs from the end of prepare_latents to the start of decode_latents.
    ``decode_to_end``: the decode stage ends when the pipeline returns (postprocessing and the offload
    hooks' release included, as our decode stage ends after the frames are on the host), else when
    decode_latents returns. ``on_step()``: called at each step's end (callback_on_step_end)."""
    import torch
    stack = ExitStack()
    encode, prepare, decode = pipe.encode_prompt, pipe.prepare_latents, pipe.decode_latents

    def text_stage(*a, **k):
        with rec.stage("text encode"):
            return encode(*a, **k)

    def image_stage(*a, **k):
        with rec.stage("image encode"):
            out = prepare(*a, **k)
        stack.enter_context(rec.stage("denoise", steps=steps))
        return out

    def decode_stage(*a, **k):
        stack.close()                                    # denoise ends here
        if decode_to_end:
            stack.enter_context(rec.stage("decode"))     # closed after the pipeline returns
            return decode(*a, **k)
        with rec.stage("decode"):
            return decode(*a, **k)

    pipe.encode_prompt, pipe.prepare_latents, pipe.decode_latents = text_stage, image_stage, decode_stage
    callback = {} if on_step is None else {"callback_on_step_end": lambda p, i, t, kw: on_step() or {}}
    try:
        out = pipe(image=image, prompt=PROMPT, negative_prompt="", height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=cfg, use_dynamic_cfg=True,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", return_dict=False,
                   **callback)[0]
        stack.close()
        return out
    finally:
        stack.close()
        for name in ("encode_prompt", "prepare_latents", "decode_latents"):   # the class's methods again
            vars(pipe).pop(name, None)


def fbc_probe(block) -> tuple[list, object]:
    """First-block cache's measure on an uncached run, per transformer call: block 0's residual (output -
    input) against the previous call's, mean |difference| / mean |previous| (diffusers' FirstBlockCache
    test, here between consecutive steps): which ``fbc:T`` would skip on these weights."""
    seen, prev = [], [None]

    def hook(_m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        res = (out[0] - x).float()
        if prev[0] is not None:
            seen.append(((res - prev[0]).abs().mean() / prev[0].abs().mean()).item())
        prev[0] = res
    return seen, block.register_forward_hook(hook, with_kwargs=True)
