"""Known CogVideoX image-to-video variants as data, their configs, and structural detection.

``VARIANTS`` is the one table: each row holds how a checkpoint of that variant is recognised (its
transformer config; ``RECOGNISED_BY`` names the fields, all readable off a state dict's keys and
shapes), its task and its defaults. Adding a variant is a row plus its config. A variant is
recognised by structure (config fields or keys and shapes), never by a file name or a file size,
so tiny test checkpoints are detected exactly like real ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class CheckpointError(ValueError):
    """A file or folder is not the component the caller asked for (message says what it is)."""


IMAGE_TO_VIDEO = "image-to-video"
LATENT_CHANNELS = 16       # every CogVideoX VAE
# Config fields that tell variants apart; each shows in a state dict: in_channels and patch_size_t
# in the patch embedding's shape (Conv2d rank 4 for none, Linear rank 2 for a temporal patch),
# ofs in ofs_embedding.*, learned positions in patch_embed.pos_embedding. RoPE has no weights.
RECOGNISED_BY = ("in_channels", "patch_size_t", "ofs", "learned_positions", "rotary")


def transformer_traits(cfg: dict) -> dict:
    """The recognising fields of a diffusers CogVideoXTransformer3DModel config (its defaults when absent)."""
    return {"in_channels": cfg.get("in_channels"), "patch_size_t": cfg.get("patch_size_t"),
            "ofs": cfg.get("ofs_embed_dim") is not None,
            "learned_positions": bool(cfg.get("use_learned_positional_embeddings", False)),
            "rotary": bool(cfg.get("use_rotary_positional_embeddings", False))}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    version: str             # as people name it: "1.0", "1.5"
    repo_id: str
    task: str
    frame_step: int          # frames must be frame_step * N + 1
    fp16_ok: bool
    invert_scale_latents: bool  # latent scaling rule: 1.5 divides by the VAE scaling factor, 1.0 multiplies
    fps: int
    default_frames: int
    default_height: int
    default_width: int
    # full-size diffusers transformer config: also how the variant is recognised (RECOGNISED_BY)
    transformer: dict = field(compare=False, repr=False)
    tiny_sample: dict = field(compare=False, repr=False)  # trained size of the tiny test checkpoints

    @property
    def folder(self) -> str:
        """The model's folder name as the hub spells it (what downloads and the shipped workflows use)."""
        return self.repo_id.split("/")[-1]

    @property
    def patch_size_t(self) -> int | None:
        return self.transformer["patch_size_t"]

    @property
    def fixed_size(self) -> bool:
        """Learned positional embedding: only the trained size works."""
        return self.transformer["use_learned_positional_embeddings"]

    @property
    def traits(self) -> dict:
        return transformer_traits(self.transformer)


# diffusers CogVideoXTransformer3DModel arguments shared by both 5B I2V variants.
_TRANSFORMER_COMMON = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=2 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
    flip_sin_to_cos=True, freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=42,
    dropout=0.0, attention_bias=True, temporal_compression_ratio=4, max_text_seq_length=226,
    activation_fn="gelu-approximate", timestep_activation_fn="silu", norm_elementwise_affine=True,
    norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=True, patch_size=2,
)
V10 = Variant(
    key="cogvideox-5b-i2v", label="CogVideoX-5B-I2V", version="1.0", repo_id="THUDM/CogVideoX-5b-I2V",
    task=IMAGE_TO_VIDEO, frame_step=4, fp16_ok=True, invert_scale_latents=False,
    fps=8, default_frames=49, default_height=480, default_width=720,
    transformer=dict(_TRANSFORMER_COMMON, patch_size_t=None, patch_bias=True, ofs_embed_dim=None,
                     use_learned_positional_embeddings=True, sample_height=60, sample_width=90, sample_frames=49),
    tiny_sample=dict(sample_height=8, sample_width=12, sample_frames=9),
)
V15 = Variant(
    key="cogvideox1.5-5b-i2v", label="CogVideoX1.5-5B-I2V", version="1.5", repo_id="THUDM/CogVideoX1.5-5B-I2V",
    task=IMAGE_TO_VIDEO, frame_step=16, fp16_ok=False, invert_scale_latents=True,
    fps=16, default_frames=81, default_height=768, default_width=1360,
    transformer=dict(_TRANSFORMER_COMMON, patch_size_t=2, patch_bias=False, ofs_embed_dim=512,
                     use_learned_positional_embeddings=False, sample_height=300, sample_width=300, sample_frames=81),
    tiny_sample={},
)
VARIANTS = {v.key: v for v in (V10, V15)}
# What a new workflow starts from (the nodes' default size is its); also the label of a size error
# before any transformer says which variant runs (the VAE serves every variant).
DEFAULT_VARIANT = V15

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 512), latent_channels=LATENT_CHANNELS,
    layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32,
    temporal_compression_ratio=4, sample_height=480, sample_width=720, scaling_factor=0.7,
    force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
)
T5_CONFIG = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)
# scheduler/scheduler_config.json of both 5B I2V repos (CogVideoXDDIMScheduler there; the
# official demo swaps in CogVideoXDPMScheduler with the same config).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, clip_sample_range=1.0, prediction_type="v_prediction", rescale_betas_zero_snr=True,
    sample_max_value=1.0, set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0,
    timestep_spacing="trailing",
)
MAX_TEXT_TOKENS = 226
TEMPORAL_COMPRESSION = 4   # VAE: 4 frames per latent frame (after the first)
SPATIAL_COMPRESSION = 8    # VAE: 8x8 pixels per latent

# Tiny shapes keep every structural trait of the real ones (patching, ofs, learned positions,
# RoPE head split, 4 VAE levels) so detection and the pipeline run the same code paths.
TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32,
                        text_embed_dim=32, num_layers=2)
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                sample_height=64, sample_width=96)
TINY_T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)


TRAINED_SIZE = "trained-size"


def variant_by_label(label: str) -> Variant:
    """The variant a front end's combo names (its label, e.g. "CogVideoX1.5-5B-I2V")."""
    for v in VARIANTS.values():
        if v.label == label:
            return v
    raise ValueError(f"unknown variant {label!r}; choose one of {[v.label for v in VARIANTS.values()]}")


def transformer_config(variant: Variant, tiny: bool | str = False) -> dict:
    """tiny=True: tiny widths and a tiny trained size (1.0 then runs at 96x64);
    tiny="trained-size": tiny widths, real sample sizes (1.0 runs at 720x480, as its workflows ask)."""
    cfg = dict(variant.transformer)
    if tiny:
        cfg.update(TINY_TRANSFORMER, **({} if tiny == TRAINED_SIZE else variant.tiny_sample))
        if cfg["ofs_embed_dim"] is not None:  # the ofs embedding is added to the time embedding
            cfg["ofs_embed_dim"] = cfg["time_embed_dim"]
    return cfg


def vae_config(variant: Variant | None = None, tiny: bool = False) -> dict:
    """AutoencoderKLCogVideoX arguments. The weights serve every variant; ``variant`` only records
    its latent scaling rule (``invert_scale_latents``) for diffusers' own pipelines: this engine
    applies the transformer's variant's rule when sampling."""
    cfg = dict(VAE_CONFIG)
    if variant is not None:
        cfg["invert_scale_latents"] = variant.invert_scale_latents
    if tiny:
        cfg.update(TINY_VAE)
    return cfg


def t5_config(tiny: bool = False) -> dict:
    return dict(T5_CONFIG, **(TINY_T5 if tiny else {}))


def closest_variant(traits: dict) -> Variant:
    """The row sharing the most of ``traits`` (first row on a tie): the base for configs read off shapes."""
    rows = list(VARIANTS.values())
    return max(rows, key=lambda v: (sum(v.traits.get(k) == x for k, x in traits.items()), -rows.index(v)))


def variant_from_transformer_config(cfg: dict) -> Variant:
    """The table row whose recognising fields all match; refuse T2V, 2B and unknown models."""
    traits = transformer_traits(cfg)
    for v in VARIANTS.values():
        if v.traits == traits:
            return v
    labels = " or ".join(v.label for v in VARIANTS.values())
    i2v = sorted({v.traits["in_channels"] for v in VARIANTS.values() if v.task == IMAGE_TO_VIDEO})
    if traits["in_channels"] not in i2v:
        kind = {LATENT_CHANNELS: "a text-to-video model",
                3 * LATENT_CHANNELS: "an inpainting model (48 input channels: CogVideoX-Fun InP, Netflix's VOID)",
                }.get(traits["in_channels"], f"in_channels={traits['in_channels']}")
        raise CheckpointError(
            f"this CogVideoX transformer is {kind}, not image-to-video (expected in_channels="
            f"{'/'.join(map(str, i2v))}): load a {labels} transformer")
    if not traits["rotary"]:
        raise CheckpointError("this CogVideoX transformer has no rotary embeddings (a 2B model?); "
                              f"only the 5B I2V variants are supported ({labels})")
    raise CheckpointError(f"this CogVideoX transformer matches no known variant ({traits}); load a {labels} "
                          "transformer")


def default_size(variant: Variant, cfg: dict) -> tuple[int, int, int]:
    """(frames, height, width) a checkpoint generates by default; 1.0 is pinned to its trained size."""
    if variant.fixed_size:
        return cfg["sample_frames"], cfg["sample_height"] * 8, cfg["sample_width"] * 8
    full = variant.transformer
    if cfg.get("num_layers", full["num_layers"]) != full["num_layers"] or cfg.get("sample_height") != full["sample_height"]:
        return 17, 64, 96  # tiny random checkpoint: keep the demo fast
    return variant.default_frames, variant.default_height, variant.default_width


def check_video_shape(variant: Variant, cfg: dict, frames: int, height: int, width: int) -> None:
    """Raise ValueError with a fix when the variant cannot make this many frames at this size."""
    step = variant.frame_step
    if frames < step + 1 or (frames - 1) % step:
        lo = (max(frames - 1, 0) // step) * step + 1
        hint = f"{lo} or {lo + step}" if lo > step else f"{step + 1}"
        raise ValueError(f"{variant.label} takes {step}N+1 frames (e.g. {step * 3 + 1}, {variant.default_frames}); "
                         f"got {frames}: try {hint}")
    if variant.fixed_size:
        h, w = cfg["sample_height"] * 8, cfg["sample_width"] * 8
        if (height, width) != (h, w):
            raise ValueError(f"{variant.label} only generates {w}x{h} (width x height; learned positional "
                             f"embedding); got {width}x{height}")
        if frames > cfg["sample_frames"]:
            raise ValueError(f"{variant.label} generates at most {cfg['sample_frames']} frames; got {frames}")
        return
    for name, v in (("width", width), ("height", height)):
        if v < 32 or v % 16:
            raise ValueError(f"{name} must be a multiple of 16 and at least 32 for {variant.label}; got {v}: "
                             f"try {max(32, round(v / 16) * 16)}")
    limit = cfg["sample_height"] * 8
    if max(width, height) > limit:
        raise ValueError(f"{variant.label} supports sides up to {limit} px; got {width}x{height}")


def positions_note(variant: Variant, cfg: dict, frames: int) -> str | None:
    """One line when a variant with a learned positional embedding runs shorter than it was trained:
    diffusers' CogVideoXPatchEmbed then adds a sin-cos table computed for the shorter video instead of
    the checkpoint's learned one (no error, no warning there). None when the learned one is used."""
    trained = cfg.get("sample_frames")
    if not variant.fixed_size or trained is None or frames >= trained:
        return None
    return (f"{variant.label} at {frames} frames: its positional embedding is learned for {trained} frames; "
            f"at any other length diffusers replaces it with a fixed sin-cos embedding computed for "
            f"{frames} frames, values the model was not trained with, which can lower the quality: "
            f"use {trained} frames for the trained embedding")


def latent_frames(variant: Variant, frames: int) -> tuple[int, int]:
    """(latent frames incl. padding, padding frames dropped before decode)."""
    n = (frames - 1) // TEMPORAL_COMPRESSION + 1
    pad = 0
    if variant.patch_size_t and n % variant.patch_size_t:
        pad = variant.patch_size_t - n % variant.patch_size_t
    return n + pad, pad
