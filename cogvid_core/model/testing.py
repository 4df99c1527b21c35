"""Random-weight CogVideoX I2V checkpoints in the real on-disk layouts, for tests, demos and benches.

Layouts written under ``root`` (see ``write_checkpoints``):

* ``<root>/<hub folder name>/`` (e.g. CogVideoX-5b-I2V) : a hub / ``save_pretrained`` folder (``model_index.json``,
  ``transformer/`` and ``text_encoder/`` sharded with ``*.safetensors.index.json``, ``vae/``,
  ``tokenizer/`` (sentencepiece ``spiece.model``), ``scheduler/``).
* ``<root>/single/`` : single files as people download them: transformer and VAE with diffusers
  key names (ours, kijai's), a kijai-style fp8 transformer, a ComfyUI ``t5xxl_*.safetensors``
  encoder, a ComfyUI ``t5xxl_fp8_e4m3fn_scaled`` encoder and a ``tokenizer/`` folder beside them.
* ``<root>/comfy/`` : ComfyUI core's own files (``corelayout``): ``diffusion_models/`` transformers in
  core's names (bare, under ``model.diffusion_model.``, scaled fp8) and ``vae/`` in diffusers' names.

Every tensor is drawn from its own generator seeded by (seed, component, tensor name), so all
layouts hold identical values, the output is reproducible, and full-size files are streamed
shard by shard from a meta-device model without ever holding a whole model in RAM (the values and
the writer: model/testing_files.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cogvid_core.model import corelayout
from cogvid_core.model import precision as P
from cogvid_core.model import variants as M
from cogvid_core.model.testing_files import (_plan_shards, random_tensor, to_fp8, to_scaled_fp8,  # noqa: F401
                                             write_safetensors)
from cogvid_core.model.testing_tokenizer import write_scheduler, write_tokenizer  # noqa: F401  (public writers)

TRANSFORMER_SHARD_BYTES = {True: 100_000, False: 5_000_000_000}   # tiny: force >= 2 shards
T5_SHARD_BYTES = {True: 1_000_000, False: 5_000_000_000}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

MODEL_INDEX = {
    "_class_name": "CogVideoXImageToVideoPipeline",
    "scheduler": ["diffusers", "CogVideoXDPMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"],
}
_COMPONENT_FILES = {  # (weights file stem, shard bytes table); stems are the libraries' own names
    "transformer": ("diffusion_pytorch_model", TRANSFORMER_SHARD_BYTES),
    "vae": ("diffusion_pytorch_model", None),
    "text_encoder": ("model", T5_SHARD_BYTES),
}


# ----------------------------------------------------------------------------- model skeletons
def _build(component: str, variant: M.Variant, tiny: bool, layers: int | None = None):
    """Construct a component with default init on the current torch default device.

    ``layers`` caps the transformer's and T5's depth (widths unchanged): real activation and
    weight shapes per block for GPU checks, without tens of GB of files."""
    cls = P.model_class(component)
    depth = {"num_layers": layers} if layers else {}
    if component == "transformer":
        return cls(**{**M.transformer_config(variant, tiny), **depth})
    if component == "vae":
        return cls(**M.vae_config(variant, tiny))
    from transformers import T5Config
    return cls(T5Config(**{**M.t5_config(tiny), **depth}))


def build_random(component: str, variant: M.Variant | str, tiny: bool = True,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int | None = 0):
    """A diffusers/transformers module with random (default-init) weights, built on ``device``.

    Construction happens directly on the device (``with torch.device(device)``), so a full-size
    transformer appears on a GPU in about a second. Values differ from ``write_checkpoints``.
    """
    variant = M.VARIANTS[variant] if isinstance(variant, str) else variant
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = _build(component, variant, tiny)
    return model.to(dtype=dtype).eval()


def _skeleton(component: str, variant: M.Variant, tiny: bool, layers: int | None = None):
    """Meta-device model: its config and tensor names/shapes without allocating any weights."""
    with torch.device("meta"):
        return _build(component, variant, tiny, layers)


def tensor_shapes(component: str, variant: M.Variant, tiny: bool,
                  layers: int | None = None) -> dict[str, tuple[int, ...]]:
    sd = _skeleton(component, variant, tiny, layers).state_dict()
    if component == "text_encoder":
        sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files store it once
    return {k: tuple(v.shape) for k, v in sd.items()}


def _save_component(folder: Path, component: str, variant: M.Variant, tiny: bool,
                    dtype: torch.dtype, seed: int, layers: int | None = None) -> None:
    """config.json + safetensors (sharded with an index when over the shard size), one shard in RAM at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    skeleton = _skeleton(component, variant, tiny, layers)
    if component == "text_encoder":
        skeleton.config.architectures = ["T5EncoderModel"]
        skeleton.config.save_pretrained(folder)
    else:
        skeleton.save_config(folder)
    shapes = tensor_shapes(component, variant, tiny, layers)
    del skeleton
    stem, shard_bytes = _COMPONENT_FILES[component]
    shards = _plan_shards(shapes, dtype, shard_bytes[bool(tiny)] if shard_bytes else None)
    if len(shards) == 1:
        write_safetensors(folder / f"{stem}.safetensors", component, {n: shapes[n] for n in shards[0]}, dtype, seed)
        return
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / fname, component, {n: shapes[n] for n in names}, dtype, seed)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- public writers
def _dtype_tag(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def write_checkpoints(root: str | Path, variant_key: str, tiny: bool = True, dtype: torch.dtype = torch.float32,
                      layouts=("hf", "single"), seed: int = 0, layers: int | None = None) -> dict:
    """Write one variant's random checkpoints; returns where they are.

    Returns ``{"hf": Path(<root>/<folder>), "single": {"transformer", "transformer_fp8", "vae",
    "text_encoder", "text_encoder_fp8_scaled", "tokenizer"} -> Path, "comfy": {"transformer",
    "transformer_prefixed", "transformer_fp8_scaled", "vae"} -> Path}`` (only the layouts asked for).
    The T5 files and tokenizer are shared by both variants (same values, same names).
    ``layers``: cap the transformer's and T5's depth, keeping every width (see ``_build``).
    """
    variant = M.VARIANTS[variant_key]
    root = Path(root)
    out: dict = {}
    if "hf" in layouts:
        folder = root / variant.folder
        for component in ("transformer", "vae", "text_encoder"):
            _save_component(folder / component, component, variant, tiny, dtype, seed, layers)
        write_tokenizer(folder / "tokenizer", seed)
        write_scheduler(folder / "scheduler")
        (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
        out["hf"] = folder
    if "single" in layouts:
        out["single"] = _write_single(root / "single", variant, tiny, dtype, seed, layers)
    if "comfy" in layouts:
        out["comfy"] = _write_comfy(root / "comfy", variant, tiny, dtype, seed, layers)
    return out


def to_core_names(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers transformer names -> ComfyUI core's (``corelayout.to_core``), under ``prefix``."""
    return {prefix + corelayout.to_core(n): t for n, t in tensors.items()}


def _write_comfy(folder: Path, variant: M.Variant, tiny: bool, dtype: torch.dtype, seed: int, layers=None) -> dict:
    stem, tag = variant.key.replace(".", "_"), _dtype_tag(dtype)
    models, vae = folder / "diffusion_models", folder / "vae"
    paths = {"transformer": models / f"{stem}_{tag}.safetensors",
             "transformer_prefixed": models / f"{stem}_{tag}_model_diffusion_model.safetensors",
             "transformer_fp8_scaled": models / f"{stem}_fp8_e4m3fn_scaled.safetensors",
             "vae": vae / f"{stem}_vae_{tag}.safetensors"}
    for d in (models, vae):
        d.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes("transformer", variant, tiny, layers)
    write_safetensors(paths["transformer"], "transformer", shapes, dtype, seed, to_core_names)
    write_safetensors(paths["transformer_prefixed"], "transformer", shapes, dtype, seed,
           lambda d: to_core_names(d, "model.diffusion_model."))
    write_safetensors(paths["transformer_fp8_scaled"], "transformer", shapes, dtype, seed,
           lambda d: to_core_names(to_scaled_fp8(d)))
    write_safetensors(paths["vae"], "vae", tensor_shapes("vae", variant, tiny, layers), dtype, seed)
    return paths


def _write_single(folder: Path, variant: M.Variant, tiny: bool, dtype: torch.dtype, seed: int,
                  layers: int | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tag, stem = _dtype_tag(dtype), variant.key.replace(".", "_")
    paths = {
        "transformer": folder / f"{stem}_transformer_{tag}.safetensors",
        "transformer_fp8": folder / f"{stem}_transformer_fp8_e4m3fn.safetensors",
        "vae": folder / f"{stem}_vae_{tag}.safetensors",
        "text_encoder": folder / f"t5xxl_{tag}.safetensors",
        "text_encoder_fp8_scaled": folder / "t5xxl_fp8_e4m3fn_scaled.safetensors",
    }
    shapes = {c: tensor_shapes(c, variant, tiny, layers) for c in ("transformer", "vae", "text_encoder")}
    write_safetensors(paths["transformer"], "transformer", shapes["transformer"], dtype, seed)
    write_safetensors(paths["transformer_fp8"], "transformer", shapes["transformer"], dtype, seed, to_fp8)
    write_safetensors(paths["vae"], "vae", shapes["vae"], dtype, seed)
    write_safetensors(paths["text_encoder"], "text_encoder", shapes["text_encoder"], dtype, seed)
    write_safetensors(paths["text_encoder_fp8_scaled"], "text_encoder", shapes["text_encoder"], dtype, seed, to_scaled_fp8)
    paths["tokenizer"] = write_tokenizer(folder / "tokenizer", seed)
    return paths


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("out_dir", type=Path, help="folder to write the checkpoints into")
    parser.add_argument("--variant", default="both", choices=[*M.VARIANTS, "both"])
    parser.add_argument("--full", action="store_true", help="full-size shapes (tens of GB) instead of tiny ones")
    parser.add_argument("--trained-size", action="store_true",
                        help="tiny widths but the real sample sizes (CogVideoX-5B-I2V then runs at 720x480)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="weight dtype (default: bf16 with --full, fp32 for tiny)")
    parser.add_argument("--layouts", default="hf,single", help="comma list of: hf, single, comfy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None,
                        help="cap the transformer's and T5's depth (every width kept): real per-block shapes in a few GB")
    return parser


def run(args: argparse.Namespace) -> dict:
    keys = list(M.VARIANTS) if args.variant == "both" else [args.variant]
    dtype = DTYPES[args.dtype or ("bf16" if args.full else "fp32")]
    layouts = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    result = {}
    for key in keys:
        result[key] = write_checkpoints(args.out_dir, key, tiny=not args.full and (M.TRAINED_SIZE if args.trained_size else True), dtype=dtype,
                                        layouts=layouts, seed=args.seed, layers=args.layers)
        print(f"{key}: {json.dumps(result[key], default=str, indent=2)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m cogvid_core.model.testing",
                                                   description="Write random CogVideoX I2V checkpoints."))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def write_lora(path: str | Path, variant_key: str, targets=("attn", "ff"), rank: int = 4, seed: int = 0, *,
               layout: str = "peft", alpha: float | None = None, tiny: bool | str = True,
               width: int | None = None, layers: int | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A random LoRA safetensors file for one variant's transformer, in a real on-disk layout.

    ``targets``: "attn" (attn1.to_q/k/v/to_out.0) and "ff" (ff.net.0.proj, ff.net.2) in every block,
    or literal module names ("proj_out"). ``layout``: "peft" (``transformer.<m>.lora_A.weight`` as
    CogVideoX training scripts save), "alpha" (plus ``<m>.alpha`` tensors), "metadata" (diffusers'
    ``lora_adapter_metadata`` header with ``lora_alpha``), "attn_procs" (diffusers' older
    ``attn1.processor.to_q_lora.down.weight`` names). ``width`` replaces the model width (1920: a
    CogVideoX-2B-shaped LoRA). lora_B is non-zero (unlike a fresh training init) so it has an effect.
    """
    from safetensors.torch import save_file

    variant = M.VARIANTS[variant_key]
    shapes = tensor_shapes("transformer", variant, tiny, layers)
    cfg = M.transformer_config(variant, tiny)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    wide = {inner: width, 4 * inner: 4 * width} if width else {}
    suffixes = {"attn": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
                "ff": ("ff.net.0.proj", "ff.net.2")}
    modules = []
    for target in targets:
        if target in suffixes:
            modules += [n[: -len(".weight")] for n in shapes
                        if n.endswith(".weight") and n[: -len(".weight")].endswith(suffixes[target])]
        else:
            modules.append(target)
    tensors, old_names = {}, {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    for m in modules:
        out_f, in_f = (wide.get(d, d) for d in shapes[f"{m}.weight"][:2])
        down = random_tensor("lora", f"{m}.down", (rank, in_f), dtype, seed)
        up = random_tensor("lora", f"{m}.up", (out_f, rank), dtype, seed)
        if layout == "attn_procs":
            head, _, leaf = m.partition(".attn1.")
            base = f"transformer.{head}.attn1.processor.{old_names[leaf]}" if leaf else f"transformer.{m}.lora"
            tensors.update({f"{base}.down.weight": down, f"{base}.up.weight": up})
            continue
        tensors.update({f"transformer.{m}.lora_A.weight": down, f"transformer.{m}.lora_B.weight": up})
        if layout == "alpha":
            tensors[f"transformer.{m}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    metadata = None
    if layout == "metadata":
        config = {"r": rank, "lora_alpha": alpha if alpha is not None else rank, "target_modules": modules}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()}),
                    "format": "pt"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
