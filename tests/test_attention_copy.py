"""activations.LowMemCogVideoXAttnProcessor is a copy of the installed diffusers' CogVideoXAttnProcessor2_0
(rotary applied a few heads at a time in place). requirements.txt allows any diffusers >= 0.42, so this
holds the copy to the installed original: same outputs, bit for bit, on random inputs through an
attention layer built as diffusers' CogVideoXBlock builds it, with each variant's settings and its
rotary tables. When it fails, diffusers changed its processor: port the change into the copy.

Why a copy and not diffusers' processor plus hooks: the rotary step sits inside the processor, between
the q/k layer norms and SDPA. Hooks could reach it (a pre-hook taking image_rotary_emb away, forward
hooks on norm_q/norm_k rotating their outputs in place), but they rely on the same internals without
showing them, and hooks inside the blocks turn the 'compile' speed option off (fast._compile) exactly on
the low-memory profiles that use this processor. Patching diffusers.models.embeddings.apply_rotary_emb
(the processor imports it at call time) would change every diffusers model in the process.
"""
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from cogvid_core.memory.activations import LowMemCogVideoXAttnProcessor
from cogvid_core.model import variants as models
from cogvid_core.run import sampling

HEADS = 6            # more heads than the tiny checkpoints' 2, so head chunks of 4 leave a remainder
TEXT_TOKENS = 11
FRAMES, HEIGHT, WIDTH = 17, 64, 96


def _attention(variant: models.Variant, dtype: torch.dtype):
    """attn1 of a one-block diffusers transformer with the variant's settings, every weight random
    (layer-norm scales and biases too, so the q/k norms matter), and the transformer's config."""
    cfg = models.transformer_config(variant, tiny=True)
    cfg.update(num_layers=1, num_attention_heads=HEADS)
    tr = CogVideoXTransformer3DModel(**cfg)
    attn = tr.transformer_blocks[0].attn1
    assert isinstance(attn.processor, CogVideoXAttnProcessor2_0)      # diffusers' own default for this block
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return attn.to(dtype), tr.config


def _inputs(config, dtype):
    n_lat = models.latent_frames(models.variant_from_transformer_config(dict(config)), FRAMES)[0]
    rope = sampling.rotary_embedding(config, HEIGHT, WIDTH, n_lat, "cpu")
    g = torch.Generator().manual_seed(6)
    dim = config.num_attention_heads * config.attention_head_dim
    video = torch.randn(2, rope[0].shape[0], dim, generator=g).to(dtype)
    text = torch.randn(2, TEXT_TOKENS, dim, generator=g).to(dtype)
    return video, text, rope


def _run(attn, processor, video, text, rope):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(hidden_states=video, encoder_hidden_states=text, image_rotary_emb=rope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant_key", list(models.VARIANTS))
def test_low_mem_processor_matches_installed_diffusers(variant_key, dtype):
    attn, config = _attention(models.VARIANTS[variant_key], dtype)
    video, text, rope = _inputs(config, dtype)
    want_video, want_text = _run(attn, CogVideoXAttnProcessor2_0(), video, text, rope)
    no_rope = _run(attn, CogVideoXAttnProcessor2_0(), video, text, None)[0]
    assert (want_video - no_rope).abs().max() > 1e-2, "the rotary step must change the output to be compared"
    for head_chunk in (1, 4, 8):
        got_video, got_text = _run(attn, LowMemCogVideoXAttnProcessor(head_chunk), video, text, rope)
        assert got_video.shape == want_video.shape and got_text.shape == want_text.shape
        assert torch.equal(got_video, want_video) and torch.equal(got_text, want_text), (
            f"{variant_key} {dtype} head_chunk {head_chunk}: LowMemCogVideoXAttnProcessor differs from the installed "
            f"diffusers' CogVideoXAttnProcessor2_0 by {(got_video - want_video).abs().max().item():.3e}: "
            "port diffusers' change into cogvid_core/memory/activations.py")
    assert torch.equal(_run(attn, LowMemCogVideoXAttnProcessor(), video, text, None)[0], no_rope)
