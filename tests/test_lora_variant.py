"""A LoRA for the other CogVideoX variant: refused when the file tells (metadata, ofs_embedding, shapes),
else applied with one line saying the variant could not be told (issue 31)."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvid_core.model import loading, lora, lora_origin, testing
from cogvid_core.model import variants as M
from cogvid_core.run import pipeline

K10, K15 = M.VARIANTS


@pytest.fixture(scope="module")
def transformers(tiny_ckpts):
    return {k: loading.load_transformer(tiny_ckpts[k]["single"]["transformer"], dtype=torch.float32,
                                        file_backed=False)[0] for k in (K10, K15)}


def _with_metadata(path, metadata):
    """Rewrite a LoRA file with ``metadata`` as its safetensors header (as training tools write it)."""
    save_file(load_file(str(path)), str(path), metadata=metadata)
    return path


def _adapter(base: str) -> dict:
    # diffusers' save_lora_weights: the PEFT LoraConfig, whose base_model_name_or_path names the model
    cfg = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"], "base_model_name_or_path": base}
    return {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg.items()}), "format": "pt"}


@pytest.mark.parametrize("metadata,made_for", [
    (_adapter("THUDM/CogVideoX1.5-5B-I2V"), K15),
    (_adapter("/models/CogVideoX-5b-I2V"), K10),
    ({"ss_base_model_version": "cogvideox_1.5_i2v"}, K15),
    ({"training_config": json.dumps({"model": {"pretrained_model_name_or_path": "THUDM/CogVideoX-5b-I2V"}})}, K10),
])
def test_lora_named_for_the_other_variant_is_refused(tmp_path, transformers, metadata, made_for):
    path = _with_metadata(testing.write_lora(tmp_path / "orbit.safetensors", made_for, ("attn", "ff")), metadata)
    lw = lora.load_lora(path)
    assert lw.made_for == made_for and lora.variant_note(lw) is None
    lora.check(transformers[made_for], lw)                    # its own variant: fine
    other = K10 if made_for == K15 else K15
    with pytest.raises(lora.LoraError) as e:                  # same shapes, but the file says what it is
        lora.check(transformers[other], lw)
    msg = str(e.value)
    assert "orbit.safetensors was made for " + M.VARIANTS[made_for].label in msg and "metadata" in msg
    assert "pick a LoRA trained for " + M.VARIANTS[other].label in msg and "\n" not in msg


def test_ofs_embedding_lora_is_told_apart_by_its_layers(tmp_path, transformers):
    path = testing.write_lora(tmp_path / "ofs.safetensors", K15, ("attn", "ofs_embedding.linear_1"))
    lw = lora.load_lora(path)
    assert lw.made_for == K15 and "ofs_embedding" in lw.origin
    with pytest.raises(lora.LoraError, match="made for CogVideoX1.5-5B-I2V"):
        lora.check(transformers[K10], lw)


def test_untold_variant_is_applied_with_a_note(tmp_path, transformers):
    path = testing.write_lora(tmp_path / "plain.safetensors", K15, ("attn", "ff"))
    lw = lora.load_lora(path)
    assert lw.made_for is None
    for key in (K10, K15):                                   # attn/ff widths are the same in both: it fits
        lora.check(transformers[key], lw)
    note = lora.variant_note(lw)
    assert "plain.safetensors" in note and "cannot be told from the file" in note and "\n" not in note


def test_shapes_still_refuse_and_contradicting_metadata_tells_nothing(tmp_path, transformers):
    path = testing.write_lora(tmp_path / "out.safetensors", K10, ("attn", "proj_out"))
    with pytest.raises(lora.LoraError, match="made for CogVideoX-5B-I2V"):
        lora.check(transformers[K15], lora.load_lora(path))
    both = {"base_model": "THUDM/CogVideoX-5b-I2V", "model": "THUDM/CogVideoX1.5-5B-I2V"}
    lw = lora.load_lora(_with_metadata(testing.write_lora(tmp_path / "both.safetensors", K15), both))
    assert lw.made_for is None and "both variants" in lora.variant_note(lw)


@pytest.mark.parametrize("name,version", [
    ("THUDM/CogVideoX1.5-5B-I2V", "1.5"), ("cogvideox15_5b_i2v", "1.5"), ("THUDM/CogVideoX-5b-I2V", "1.0"),
    ("CogVideoX-5B", "1.0"), ("THUDM/CogVideoX-2b", None), ("stabilityai/sdxl", None), ("", None),
])
def test_version_of_name(name, version):
    assert lora_origin.version_of_name(name) == version


def test_cli_and_node_notes_say_the_variant_is_untold(tmp_path, tiny_ckpts, caplog):
    path = testing.write_lora(tmp_path / "plain.safetensors", K15, ("attn",))
    sources = dataclasses.replace(pipeline.Sources.from_model(str(tiny_ckpts[K15]["hf"])), loras=((path, 1.0),))
    with caplog.at_level("WARNING"):
        run = pipeline._prepare(sources, pipeline.Job(image=None, prompt="a boat"), "fp32", "cpu", "resident",
                                None, None)
    notes = [n for n in run.notes if "cannot be told" in n]
    assert len(notes) == 1 and notes[0] in caplog.text
