"""ComfyUI core's own CogVideoX transformer layout, as names.

Core loads CogVideoX natively since 2026 (``comfy/ldm/cogvideo``, added for Netflix's VOID model): its
"Load Diffusion Model" reads a transformer file in core's module names, bare or under
``model.diffusion_model.``, and recognises it by ``blocks.0.norm1.linear.weight``. Those names are
diffusers' with eight modules renamed in each block and the time/ofs embeddings flattened:

    core                              diffusers (CogVideoXTransformer3DModel)
    blocks.N.q / k / v                transformer_blocks.N.attn1.to_q / to_k / to_v
    blocks.N.norm_q / norm_k          transformer_blocks.N.attn1.norm_q / norm_k
    blocks.N.attn_out                 transformer_blocks.N.attn1.to_out.0
    blocks.N.ff_proj / ff_out         transformer_blocks.N.ff.net.0.proj / ff.net.2
    blocks.N.norm1 / norm2            transformer_blocks.N.norm1 / norm2
    time_embedding_linear_1 / _2      time_embedding.linear_1 / linear_2
    ofs_embedding_linear_1 / _2       ofs_embedding.linear_1 / linear_2

``patch_embed.*``, ``norm_final``, ``norm_out.*`` and ``proj_out`` keep diffusers' names, and core's
VAE file (e.g. ``vae/cogvideox_vae.safetensors``) keeps diffusers' AutoencoderKLCogVideoX names whole.
diffusers has no single-file converter for CogVideoX, so the table above is the mapping; it is a
rename only (same shapes, same values).
"""
from __future__ import annotations

BLOCK = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "norm_q": "attn1.norm_q",
         "norm_k": "attn1.norm_k", "attn_out": "attn1.to_out.0", "ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2"}
TOP = {"time_embedding_linear_1": "time_embedding.linear_1", "time_embedding_linear_2": "time_embedding.linear_2",
       "ofs_embedding_linear_1": "ofs_embedding.linear_1", "ofs_embedding_linear_2": "ofs_embedding.linear_2"}
# core's own detection key, plus two that only its CogVideoX has (other "blocks." models lack them)
MARKS = ("blocks.0.norm1.linear.weight", "blocks.0.attn_out.weight", "patch_embed.proj.weight")
_BLOCK_BACK = {v: k for k, v in BLOCK.items()}
_TOP_BACK = {v: k for k, v in TOP.items()}


def is_core(names) -> bool:
    """Whether prefix-stripped state-dict names are core's CogVideoX layout (not diffusers')."""
    names = set(names)
    return all(m in names for m in MARKS)


def to_diffusers(name: str) -> str:
    """diffusers' name of one tensor of a core-layout file (names outside the table pass unchanged)."""
    head, _, rest = name.partition(".")
    if head == "blocks" and rest:
        index, _, inner = rest.partition(".")
        module, _, leaf = inner.partition(".")
        return f"transformer_blocks.{index}.{BLOCK.get(module, module)}" + (f".{leaf}" if leaf else "")
    if head in TOP:
        return f"{TOP[head]}.{rest}"
    return name


def to_core(name: str) -> str:
    """core's name of one diffusers transformer tensor: the inverse of :func:`to_diffusers`."""
    if name.startswith("transformer_blocks."):
        index, _, inner = name[len("transformer_blocks."):].partition(".")
        for long, short in _BLOCK_BACK.items():
            if inner == long or inner.startswith(long + "."):
                inner = short + inner[len(long):]
                break
        return f"blocks.{index}.{inner}"
    for long, short in _TOP_BACK.items():
        if name.startswith(long + "."):
            return short + name[len(long):]
    return name
