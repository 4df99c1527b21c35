"""Prompt encoding with the T5 encoder, as CogVideoX was trained: 226 tokens, padded."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cogvid_core.model.variants import MAX_TEXT_TOKENS

log = logging.getLogger(__name__)


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor          # [1, 226, d_model], on CPU: the GPU holds it only while sampling
    prompt: str
    truncated: str | None = None  # the text that did not fit into 226 tokens


def encode_prompt(text_encoder, tokenizer, prompt: str, device=None) -> PromptEmbeds:
    """Tokenize like diffusers' CogVideoX pipelines (max_length padding, truncation) and run T5."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    device = torch.device(device) if device is not None else _module_device(text_encoder)
    ids = tokenizer([prompt], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    full = tokenizer([prompt], padding="longest", return_tensors="pt").input_ids
    truncated = None
    if full.shape[-1] > MAX_TEXT_TOKENS:
        truncated = tokenizer.batch_decode(full[:, MAX_TEXT_TOKENS - 1:-1])[0]
        log.warning("prompt is longer than %d tokens; dropped: %r", MAX_TEXT_TOKENS, truncated)
    with torch.inference_mode():
        embeds = text_encoder(ids.to(device))[0]
    return PromptEmbeds(embeds=embeds.to("cpu"), prompt=prompt, truncated=truncated)


def _module_device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
