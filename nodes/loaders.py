"""Loader nodes: transformer, T5 text encoder, VAE -> engine components."""
from __future__ import annotations

import os

from comfy_api.latest import io

from . import common as C
from . import memory

_MODEL_TIP = ("models/CogVideo folders (hub layout), single .safetensors files from {single}, or a hub repo "
              "(downloaded once into models/CogVideo, only the needed sub-folders)")
_PRECISION_TIP = ("Weight precision. auto: bf16 where the card has it (RTX 30xx / A100 and newer), else fp16, or fp32 "
                  "for CogVideoX1.5 (slower). fp16 gives CogVideoX1.5 black frames and is refused for it")
_FP8_TIP = ("; fp8_e4m3fn: attention and feed-forward weights stored in 8 bits (about 0.6x the memory), computed "
            "in bf16")
_DEVICE_TIP = "auto: ComfyUI's device (the CPU when ComfyUI runs with --cpu); cuda, cuda:N or cpu to force one"
_PAIR_TIP = ("; cuda:I+cuda:J (transformer): the two CFG branches at once, one per GPU, each GPU holding a copy of "
             "the transformer (or streaming it from the files) and one branch's activations")
# What each choice does and costs; the measured speed-ups are in the README (Speed options), not here:
# a long tooltip covers the canvas.
_SPEED_TIP = ("Speed while sampling. exact: bit for bit. cudnn, compile (first step slower): same math, other "
              "rounding. sage (8-bit attention), fp8 (float8 matmuls, RTX 40xx / L4 / H100+), fa3fp8 (FP8 attention, "
              "H100 / H200): faster, change the video slightly. '+' combines. fastest: the best this GPU runs. What "
              "this machine cannot run is skipped with a message")


def placement_modes() -> list[str]:
    from cogvid_core.api import PLACEMENTS
    return list(PLACEMENTS)


def _placement_input(tip: str) -> io.Combo.Input:
    return io.Combo.Input("placement", options=placement_modes(), default="auto", tooltip=tip)


def _common_inputs(component: str, single: str, placement_tip: str) -> list:
    # fp8 storage is offered where the engine stores it (the transformer's block Linear weights); auto
    # after the saved workflows' values (options only grow at the end)
    from cogvid_core.api import AUTO, FP8
    precisions = [p for p in C.PRECISIONS if component == "transformer" or p != FP8] + [AUTO]
    return [
        io.Combo.Input("model", options=C.model_options(component), tooltip=_MODEL_TIP.format(single=single)),
        io.Combo.Input("precision", options=precisions, default=AUTO,
                       tooltip=_PRECISION_TIP + (_FP8_TIP if component == "transformer" else "")),
        _placement_input(placement_tip),
        io.Combo.Input("device", options=_device_options(component), default="auto",
                       tooltip=_DEVICE_TIP + (_PAIR_TIP if component == "transformer" else "")),
    ]


def _device_options(component: str) -> list[str]:
    import torch
    from cogvid_core.api import PAIR_SEPARATOR, device_choices
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    extra = device_choices(gpus)
    return list(C.DEVICES) + (extra if component == "transformer" else [d for d in extra if PAIR_SEPARATOR not in d])


def _devices(choice: str, component: str):
    """A device value -> (compute device, the second GPU of a CFG pair or None)."""
    from cogvid_core.api import PAIR_SEPARATOR, parse_pair
    if choice in C.DEVICES:
        return C.compute_device(choice), None
    if PAIR_SEPARATOR in choice and component != "transformer":
        raise ValueError(f"device {choice!r}: a GPU pair runs the transformer's two CFG branches; the {component} "
                         "computes on one device: choose cuda:N, cuda, auto or cpu")
    C.compute_device("cuda")   # refused when ComfyUI computes on the CPU (--cpu)
    devs = parse_pair(choice)
    return devs[0], (devs[1] if len(devs) > 1 else None)


def _source(component: str, model: str) -> str:
    """A listed option -> local path; a hub repo is downloaded (only the needed sub-folders) into
    models/CogVideo/<repo name> first, so it shows up there as a local folder afterwards."""
    from cogvid_core import api as cv
    src = C.resolve_model(component, model)
    if src not in C.HUB_REPOS:
        return src
    local = os.path.join(C.download_dir(), src.split("/")[-1])
    folders = [C.SUBFOLDER[component]] + (["tokenizer"] if component == "t5" else [])
    return str([cv.resolve_source(src, sub, local_dir=local) for sub in folders][0])


def _model_files(component: str, model: str) -> list[str]:
    """The weight files a listed option reads (none yet for a hub repo not downloaded)."""
    src = C.resolve_model(component, model)
    if src in C.HUB_REPOS:
        src = os.path.join(C.download_dir(), src.split("/")[-1])
    if os.path.isfile(src):
        return [src]
    sub = os.path.join(src, C.SUBFOLDER[component])
    top = sub if os.path.isdir(sub) else src
    return sorted(os.path.join(d, f) for d, _, names in os.walk(top) for f in names
                  if f.endswith(C.MODEL_EXTENSIONS))


def files_fingerprint(component: str, model: str):
    """ComfyUI runs a loader again when this value changes: a model file replaced under the same name
    (a new download, a converted copy) is then loaded and indexed anew at the next queue, instead of the
    cached model reading the new file at the old offsets (the engine refuses that: fileindex)."""
    from cogvid_core.api import file_stamp
    try:
        files = _model_files(component, model)
    except ValueError:
        return model             # not in the list: the loader's own validation says so
    stamps = []
    for path in files:
        try:
            stamps.append((path, file_stamp(path)))
        except OSError:
            stamps.append((path, None))
    return model, tuple(stamps)


class CogVidTransformerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CogVidTransformerLoader",
            display_name="CogVideoX I2V Transformer Loader",
            category=f"{C.CATEGORY}/loaders",
            description="Loads a CogVideoX-5B-I2V or CogVideoX1.5-5B-I2V transformer. The variant is recognised "
                        "from the weights, not the file name.",
            inputs=_common_inputs("transformer", "diffusion_models",
                                  "Where the weights live while sampling: resident (all on the GPU, fastest), "
                                  "offload (on the GPU only while sampling), stream (blocks copied to the GPU "
                                  "one by one, least memory), auto (chosen from free memory)")
            + [io.Combo.Input("speed", options=C.speed_options(), default="exact", tooltip=_SPEED_TIP)],
            outputs=[C.TRANSFORMER.Output(display_name="transformer")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, **_other):
        return files_fingerprint("transformer", model)

    @classmethod
    def execute(cls, model, precision, placement, device, speed="exact") -> io.NodeOutput:
        from cogvid_core import api as cv
        dev, second = _devices(device, "transformer")
        cv.resolve_precision("transformer", precision, dev, warn=False)   # a bad name fails before any download
        cv.check_speed_alone(speed, dev, second)   # before the load (a pair: what both of its GPUs run)
        src = _source("transformer", model)
        # the variant from the headers: 1.5 in fp16 is refused here, before gigabytes load (and NaN at step 1)
        precision = cv.resolve_precision("transformer", precision, dev, cv.peek_transformer(src)[0])
        dtype, storage = cv.precision_dtypes(precision)
        memory.free_for_load(0, dev)
        module, variant = cv.load_transformer(src, dtype, device="cpu", storage_dtype=storage)
        if second is not None:      # the sampler finds the copy on the module (cogvid_core.speed.multigpu)
            cv.attach_second(module, second)
        comp = cv.Component("transformer", module, dev, dtype, placement, variant=variant, source=model,
                                 speed=speed, precision=precision)
        return io.NodeOutput(memory.expose(comp))


class CogVidT5Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CogVidT5Loader",
            display_name="CogVideoX I2V T5 Loader",
            category=f"{C.CATEGORY}/loaders",
            description="Loads the T5 v1.1 XXL text encoder and its tokenizer (from the model folder, or "
                        "ComfyUI's own T5 tokenizer for single files such as t5xxl_fp16.safetensors).",
            inputs=_common_inputs("t5", "text_encoders",
                                  "Where T5 lives: it runs once per prompt and then leaves the GPU unless "
                                  "resident; offload/stream keep it on the host between prompts"),
            outputs=[C.T5.Output(display_name="t5")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, **_other):
        return files_fingerprint("t5", model)

    @classmethod
    def execute(cls, model, precision, placement, device) -> io.NodeOutput:
        from cogvid_core import api as cv
        dev, _ = _devices(device, "t5")
        precision = cv.resolve_precision("text_encoder", precision, dev)
        dtype, _storage = cv.precision_dtypes(precision)
        src = _source("t5", model)
        memory.free_for_load(0, dev)
        module, tokenizer = cv.load_text_encoder(src, dtype, device="cpu", tokenizer=C.t5_tokenizer_dir(src))
        comp = cv.Component("t5", module, dev, dtype, placement, source=model, tokenizer=tokenizer,
                                 precision=precision)
        return io.NodeOutput(memory.expose(comp))


class CogVidVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CogVidVAELoader",
            display_name="CogVideoX I2V VAE Loader",
            category=f"{C.CATEGORY}/loaders",
            description="Loads the CogVideoX video VAE (encodes the start image, decodes the video).",
            inputs=_common_inputs("vae", "vae",
                                  "Where the VAE lives: it is small; offload moves it to the GPU only "
                                  "for encode and decode"),
            outputs=[C.VAE.Output(display_name="vae")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, **_other):
        return files_fingerprint("vae", model)

    @classmethod
    def execute(cls, model, precision, placement, device) -> io.NodeOutput:
        from cogvid_core import api as cv
        dev, _ = _devices(device, "vae")
        precision = cv.resolve_precision("vae", precision, dev)
        dtype, _storage = cv.precision_dtypes(precision)
        src = _source("vae", model)
        # The VAE weights serve both variants: the latent scaling rule is the transformer's variant's,
        # applied by the sampler, so the VAE needs none.
        module = cv.load_vae(src, dtype, device="cpu")
        comp = cv.Component("vae", module, dev, dtype, placement, source=model, precision=precision)
        return io.NodeOutput(memory.expose(comp))


NODES = [CogVidTransformerLoader, CogVidT5Loader, CogVidVAELoader]
