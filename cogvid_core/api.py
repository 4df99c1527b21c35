"""The engine's public surface: every name the ComfyUI nodes and the command line use, and where it lives.

The rest of cogvid_core is internal and may move between releases; a name the adapters need is added to
PUBLIC under the name they call it by. A name is looked up in its home module at each access (PEP 562),
so importing this module costs nothing (ComfyUI's start-up stays light) and the surface never holds a
copy that a test's or a plugin's patch of the home module would miss. tests/test_import_graph.py holds
nodes/ and cli.py to this module.
"""
from __future__ import annotations

import importlib

# public name -> (home module under cogvid_core, its name there)
PUBLIC: dict[str, tuple[str, str]] = {
    # device: what the machine has
    "GiB": ("device.devmem", "GiB"),
    "free_memory": ("device.devmem", "free_memory"),
    "host_available_bytes": ("device.devmem", "host_available_bytes"),
    # model: models, files, precision, encode
    "file_stamp": ("model.fileindex", "file_stamp"),
    "load_text_encoder": ("model.loading", "load_text_encoder"),
    "load_transformer": ("model.loading", "load_transformer"),
    "load_vae": ("model.loading", "load_vae"),
    "peek_transformer": ("model.loading", "peek_transformer"),
    "load_lora": ("model.lora", "load_lora"),
    "lora_bytes": ("model.lora", "lora_bytes"),
    "lora_scale_hint": ("model.lora", "scale_hint"),
    "lora_variant_note": ("model.lora", "variant_note"),
    "LATENT_RGB_BIAS": ("model.latent_rgb", "RGB_BIAS"),
    "LATENT_RGB_FACTORS": ("model.latent_rgb", "RGB_FACTORS"),
    "AUTO": ("model.precision", "AUTO"),
    "FP8": ("model.precision", "FP8"),
    "default_device": ("model.precision", "default_device"),
    "precision_dtypes": ("model.precision", "dtypes"),
    "resolve_precision": ("model.precision", "resolve"),
    "resolve_precisions": ("model.precision", "resolve_all"),
    "resolve_source": ("model.sources", "resolve"),
    "checkpoint_arguments": ("model.testing", "add_arguments"),
    "make_checkpoints": ("model.testing", "run"),
    "write_checkpoints": ("model.testing", "write_checkpoints"),
    "encode_prompt": ("model.text", "encode_prompt"),
    "RESIZE_MODES": ("model.vae", "RESIZE_MODES"),
    "encode_image": ("model.vae", "encode_image"),
    "CheckpointError": ("model.variants", "CheckpointError"),
    "DEFAULT_VARIANT": ("model.variants", "DEFAULT_VARIANT"),
    "VARIANTS": ("model.variants", "VARIANTS"),
    "check_video_shape": ("model.variants", "check_video_shape"),
    "variant_by_label": ("model.variants", "variant_by_label"),
    "transformer_config": ("model.variants", "transformer_config"),
    # memory: profiles and placement
    "placed_of": ("memory.placement", "placed_of"),
    "PROFILES": ("memory.profiles", "PROFILES"),
    "TileSpec": ("memory.profiles", "TileSpec"),
    "get_profile": ("memory.profiles", "get_profile"),
    # speed: speed options, step caches, several GPUs
    "CACHES": ("speed.caches", "CHOICES"),
    "CACHE_TOOLTIP": ("speed.caches", "TOOLTIP"),
    "SPEEDS": ("speed.fast", "CHOICES"),
    "check_speed_alone": ("speed.fast", "resolve_alone"),
    "set_compile_cache": ("speed.compile_cache", "set_folder"),
    "speed_recipe": ("speed.fast", "recipe"),
    "DeviceMap": ("speed.multigpu", "DeviceMap"),
    "PAIR_SEPARATOR": ("speed.multigpu", "PAIR_SEPARATOR"),
    "attach_second": ("speed.multigpu", "attach_second"),
    "device_choices": ("speed.multigpu", "device_choices"),
    "on_device": ("speed.multigpu", "on_device"),
    "parse_devices": ("speed.multigpu", "parse_devices"),
    "parse_pair": ("speed.multigpu", "parse_pair"),
    "init_sequence_parallel": ("speed.seqpar", "init"),
    "rank_writes_output": ("speed.seqpar", "writes"),
    "torchrun_launched": ("speed.seqpar", "launched"),
    # plan: the estimate and the planner
    "chart_image": ("plan.chart", "chart_image"),
    "cache_bytes": ("plan.estimate", "cache_bytes"),
    "estimate": ("plan.estimate", "estimate"),
    "best_estimate": ("plan.planner", "best_estimate"),
    "PlanMismatch": ("plan.match", "PlanMismatch"),
    "check_plan": ("plan.match", "check_plan"),
    "PlanBeyondCard": ("plan.match", "PlanBeyondCard"),
    "check_plan_fits_card": ("plan.match", "check_plan_fits_card"),
    "plan_beyond_card": ("plan.match", "plan_beyond_card"),
    "plan_mismatch": ("plan.match", "plan_mismatch"),
    "gpu_budget": ("plan.planner", "gpu_budget"),
    "one_branch": ("plan.planner", "one_branch"),
    "own_budget": ("plan.planner", "own_budget"),
    "plan_run": ("plan.planner", "plan"),
    # run: one video: pipeline, sampling, components, guard, report, kept latents, video files
    "RunInfo": ("run.guard", "RunInfo"),
    "StageOOM": ("run.guard", "StageOOM"),
    "decode_with_retries": ("run.guard", "decode"),
    "oom_guard": ("run.guard", "oom_guard"),
    "check_writable": ("run.keep", "check_writable"),
    "kept_message": ("run.keep", "kept_message"),
    "latents_path": ("run.keep", "latents_path"),
    "load_latents": ("run.keep", "load"),
    "save_latents": ("run.keep", "save"),
    "Job": ("run.pipeline", "Job"),
    "Sources": ("run.pipeline", "Sources"),
    "decode_saved": ("run.pipeline", "decode_saved"),
    "generate": ("run.pipeline", "generate"),
    "pick_device": ("run.pipeline", "pick_device"),
    "StageRecorder": ("run.report", "StageRecorder"),
    "SCHEDULERS": ("run.sampling", "SCHEDULERS"),
    "sample": ("run.sampling", "sample"),
    "Component": ("run.session", "Component"),
    "PLACEMENTS": ("run.session", "PLACEMENTS"),
    "PROMPTS": ("run.session", "PROMPTS"),
    "decode_bytes": ("run.session", "decode_bytes"),
    "plan_for": ("run.session", "plan_for"),
    "write_mp4": ("run.video", "write_mp4"),
    "write_pngs": ("run.video", "write_pngs"),
}
__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    try:
        home, attr = PUBLIC[name]
    except KeyError:
        raise AttributeError(f"cogvid_core.api has no {name!r}; the public names are in api.PUBLIC") from None
    return getattr(importlib.import_module(f"cogvid_core.{home}"), attr)


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])
