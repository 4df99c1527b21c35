"""The tokenizer and scheduler files of the project's tiny random checkpoints (:mod:`cogvid_core.model.testing`
re-exports both writers): a sentencepiece T5 tokenizer trained on a few words, diffusers' DPM scheduler config."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

from cogvid_core.model import variants as M

_WORDS = ("the a an of in on over under near cat dog bird fish horse person woman man child car boat "
          "river mountain sky city street forest beach sun moon light dark bright red blue green white "
          "black small large slowly quickly walks runs jumps flies swims moves turns camera video frame "
          "image scene close view zoom pan wind water snow rain fire smoke cloud").split()


def write_tokenizer(folder: Path, seed: int = 0) -> Path:
    """A tiny sentencepiece unigram T5 tokenizer (pad 0, eos 1, unk 2, no bos) + 100 extra ids.

    Loads with ``AutoTokenizer.from_pretrained(folder)`` / ``T5Tokenizer.from_pretrained(folder)``;
    its ids stay far below the tiny T5's 32128 vocab so ComfyUI's real tokenizer fits too.
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, vocab_size=96, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
        num_threads=1)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": M.MAX_TEXT_TOKENS, "extra_ids": 100,
              "legacy": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def write_scheduler(folder: Path) -> Path:
    from diffusers import CogVideoXDPMScheduler

    CogVideoXDPMScheduler(**M.SCHEDULER_CONFIG).save_pretrained(folder)
    return folder
