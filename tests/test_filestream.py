"""File-backed models (filestream): the same weights and outputs as loaded ones, and never a full copy."""
from __future__ import annotations

import shutil

import pytest
import torch
from test_placement import _inputs, _run

from cogvid_core.model import fileindex as FI
from cogvid_core.model import loading as L
from cogvid_core.model import variants as M
from cogvid_core.memory import placement as P
from cogvid_core.model.checkpoints import plain_shapes, read_shapes, t5_config_from_shapes
from cogvid_core.model.variants import CheckpointError
from cogvid_core.model.testing import write_checkpoints

V15 = M.V15.key


def _lazy_transformer(source, dtype=torch.float32, storage_dtype=None):
    """The loader's default: a file-backed model."""
    return L.load_transformer(source, dtype=dtype, storage_dtype=storage_dtype, progress=False)[0]


def _lazy_t5(path, dtype=torch.float32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**t5_config_from_shapes(plain_shapes(read_shapes(path))))
    with torch.device("meta"):
        model = T5EncoderModel(config)
    FI.lazy_load(model, [path], dtype, ignore=lambda k: k.startswith(("decoder.", "lm_head.")),
                 finalize=L._tie_embeddings)
    return L._finish(model)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Tiny 1.5 single files with 6 blocks: enough to tell "a few blocks" from "all of them"."""
    root = tmp_path_factory.mktemp("deep")
    return write_checkpoints(root, V15, tiny=True, dtype=torch.float32, layouts=("single",), layers=6)["single"]


def _bits(model) -> dict:
    return {k: v.view(torch.uint8) if v.dtype.is_floating_point else v for k, v in model.state_dict().items()}


def _same_bits(a, b):
    sa, sb = _bits(a), _bits(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _live_block_bytes(model, blocks) -> list[int]:
    return [sum(t.numel() * t.element_size() for t in b.parameters() if not t.is_meta) for b in blocks]


# ------------------------------------------------------------------------------- same weights as the loader
@pytest.mark.parametrize("case", ["fp32->bf16", "fp8 file", "fp8 storage"])
def test_resident_weights_match_loader(tiny_ckpts, case):
    single = tiny_ckpts[V15]["single"]
    path = single["transformer_fp8" if case == "fp8 file" else "transformer"]
    dtype = torch.bfloat16 if case == "fp32->bf16" else torch.float32
    storage = torch.float8_e4m3fn if case == "fp8 storage" else None
    ref, _ = L.load_transformer(path, dtype=dtype, storage_dtype=storage, file_backed=False)
    lazy = _lazy_transformer(path, dtype, storage)
    assert all(t.is_meta for t in lazy.parameters())                     # nothing read before placement
    placed = P.place(lazy, "cpu", "stream")                              # CPU: degrades to resident
    assert placed.mode == "resident" and not any(t.is_meta for t in lazy.parameters())
    _same_bits(ref, lazy)
    assert type(lazy.transformer_blocks[0].attn1.to_q) is type(ref.transformer_blocks[0].attn1.to_q)
    placed.release()
    assert all(t.is_meta for t in lazy.parameters())                     # released: no copy kept anywhere


def test_scaled_fp8_t5_matches_loader(tiny_ckpts):
    path = tiny_ckpts[V15]["single"]["text_encoder_fp8_scaled"]
    ref, _ = L.load_text_encoder(path, dtype=torch.float32, tokenizer=tiny_ckpts[V15]["single"]["tokenizer"],
                                file_backed=False)
    lazy = _lazy_t5(path)
    P.place(lazy, "cpu", "resident")
    _same_bits(ref, lazy)
    assert lazy.shared is lazy.encoder.embed_tokens


# ------------------------------------------------------------------------------- streaming
def _reference_and_lazy(deep):
    """The in-memory model, inputs and its output; the same file as a file-backed (lazy) model."""
    path = deep["transformer"]
    ref, _ = L.load_transformer(path, dtype=torch.float32, file_backed=False)
    kw = _inputs(ref, M.V15)
    return ref, kw, _run(ref, kw), _lazy_transformer(path)


def test_stream_equals_resident_and_holds_few_blocks(deep):
    ref, kw, want, lazy = _reference_and_lazy(deep)
    placed = P.place(lazy, "cpu", "stream", degrade_on_cpu=False)
    blocks = lazy.transformer_blocks
    assert len(blocks) == 6 and placed.mode == "stream"
    full = [sum(t.numel() * t.element_size() for t in b.parameters()) for b in ref.transformer_blocks]
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(_live_block_bytes(lazy, blocks))) for b in blocks]
    with placed.use():
        for _ in range(2):                      # the second call starts on blocks prefetched at the end of the first
            assert torch.equal(_run(lazy, kw), want)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * len(blocks)
    depth = placed._files.depth
    for live in seen:                           # the running block plus at most `depth` prefetched ones
        assert sum(b > 0 for b in live) <= depth + 1
        assert sum(live) <= (depth + 1) * max(full) < sum(full)
    assert sum(_live_block_bytes(lazy, blocks)) == 0          # after use: no block left
    assert lazy.patch_embed.proj.weight.is_meta              # outside the blocks too: read per use
    with placed.use():
        assert not lazy.patch_embed.proj.weight.is_meta
        assert torch.equal(_run(lazy, kw), want)
    placed.release()
    assert all(t.is_meta for t in lazy.parameters())


def test_stream_under_inference_mode(deep):
    """ComfyUI runs nodes under torch.inference_mode: blocks read by the worker thread must be written
    in the caller's mode (a buffer made in inference mode cannot be filled in-place outside it)."""
    _, kw, want, lazy = _reference_and_lazy(deep)
    with torch.inference_mode():
        placed = P.place(lazy, "cpu", "stream", degrade_on_cpu=False)
        with placed.use():
            assert torch.equal(_run(lazy, kw), want)
        placed.release()


def test_stream_reuses_a_fixed_ring_of_block_buffers(deep):
    """Streamed blocks land in 1 + depth buffers made once per use (not one allocation per block:
    those interleaved with activations fragmented the GPU pool); a block that raised before it was
    dropped keeps its buffer and the next use is still exact; a use under inference mode followed by
    one without works on the same placement."""
    ref, kw, want, lazy = _reference_and_lazy(deep)
    placed = P.place(lazy, "cpu", "stream", degrade_on_cpu=False)
    blocks, files = lazy.transformer_blocks, placed._files
    storages = set()
    hooks = [b.register_forward_pre_hook(
        lambda m, a: storages.add(m.attn1.to_q.weight.untyped_storage().data_ptr())) for b in blocks]
    with torch.inference_mode(), placed.use():
        assert torch.equal(_run(lazy, kw), want)
    with placed.use():
        assert torch.equal(_run(lazy, kw), want)
        assert len(files._ring._bufs) == files.depth + 1
    assert files._ring._bufs == []                           # given back when the use ends
    for h in hooks:
        h.remove()
    assert len(storages) <= 2 * (files.depth + 1) < 2 * len(blocks)   # one ring per use

    def boom(m, a):
        raise RuntimeError("interrupted")
    h = blocks[3].register_forward_pre_hook(boom)
    with placed.use():
        with pytest.raises(RuntimeError, match="interrupted"):
            _run(lazy, kw)
        h.remove()
        assert torch.equal(_run(lazy, kw), want)             # blocks held by the failed call keep their buffers
    placed.release()


def test_offload_reads_all_blocks_per_use(tiny_ckpts):
    path = tiny_ckpts[V15]["single"]["text_encoder"]
    ref, _ = L.load_text_encoder(path, dtype=torch.float32, tokenizer=tiny_ckpts[V15]["single"]["tokenizer"],
                                file_backed=False)
    ids = torch.randint(0, ref.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).last_hidden_state
    lazy = _lazy_t5(path)
    placed = P.place(lazy, "cpu", "offload", degrade_on_cpu=False)
    blocks = lazy.encoder.block
    assert sum(_live_block_bytes(lazy, blocks)) == 0
    with placed.use() as m, torch.no_grad():
        assert all(b > 0 for b in _live_block_bytes(lazy, blocks))
        assert torch.equal(m(ids).last_hidden_state, want)
    assert sum(_live_block_bytes(lazy, blocks)) == 0
    streamed = P.place(lazy, "cpu", "stream", degrade_on_cpu=False)   # re-placing releases the old one
    assert placed.released
    with streamed.use() as m, torch.no_grad():
        assert torch.equal(m(ids).last_hidden_state, want)
    streamed.release()


def test_staging_sized_for_the_largest_block(tiny_ckpts):
    lazy = _lazy_transformer(tiny_ckpts[V15]["single"]["transformer"])
    placed = P.place(lazy, "cpu", "stream", degrade_on_cpu=False)
    largest = max(lay.nbytes for lay in placed._files.layouts)
    assert largest <= placed._files.staging_bytes() // 2 < 2 * largest
    placed.release()


# ------------------------------------------------------------------------------- errors a user can act on
def test_truncated_file_is_reported(tiny_ckpts, tmp_path):
    src = tiny_ckpts[V15]["single"]["transformer"]
    cut = tmp_path / "cut.safetensors"
    shutil.copyfile(src, cut)
    lazy = _lazy_transformer(cut)                              # header intact: indexing succeeds
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size - 1024)
    with pytest.raises(CheckpointError, match="truncated"):
        P.place(lazy, "cpu", "resident")


def test_loaders_default_to_file_backed(tiny_ckpts):
    single = tiny_ckpts[V15]["single"]
    t5, _ = L.load_text_encoder(single["text_encoder"], dtype=torch.float32, tokenizer=single["tokenizer"])
    assert FI.index_of(t5) is not None and all(t.is_meta for t in t5.parameters())
    P.unplace(t5)                                              # never placed: nothing to move, no error
    eager, _ = L.load_text_encoder(single["text_encoder"], dtype=torch.float32, tokenizer=single["tokenizer"],
                                   file_backed=False)
    assert FI.index_of(eager) is None and not any(t.is_meta for t in eager.parameters())
    P.place(t5, "cpu", "resident")
    _same_bits(eager, t5)
    P.unplace(t5)                                              # released: back to placeholders, index kept
    assert FI.index_of(t5) is not None and all(t.is_meta for t in t5.parameters())


def test_cut_file_refused_at_load(tiny_ckpts, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_ckpts[V15]["single"]["transformer"].read_bytes()[:-1024])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*download it again"):
        L.load_transformer(cut)


def test_short_ram_is_reported(tiny_ckpts, monkeypatch, caplog):
    from cogvid_core.device import devmem

    monkeypatch.setattr(devmem, "host_available_bytes", lambda: 1024)
    with caplog.at_level("WARNING", logger="cogvid_core.model.loading"):
        L.load_transformer(tiny_ckpts[V15]["single"]["transformer"], dtype=torch.float32)
    assert "reads it from disk again" in caplog.text
    caplog.clear()
    monkeypatch.setattr(devmem, "host_available_bytes", lambda: 2 ** 40)
    with caplog.at_level("WARNING", logger="cogvid_core.model.loading"):
        L.load_transformer(tiny_ckpts[V15]["single"]["transformer"], dtype=torch.float32)
    assert "from disk" not in caplog.text


def test_unknown_tensor_is_refused(tiny_ckpts):
    from transformers import T5Config, T5EncoderModel

    path = tiny_ckpts[V15]["single"]["transformer"]
    config = T5Config(**t5_config_from_shapes(plain_shapes(read_shapes(tiny_ckpts[V15]["single"]["text_encoder"]))))
    with torch.device("meta"):
        t5 = T5EncoderModel(config)
    with pytest.raises(CheckpointError, match="do not belong"):
        FI.lazy_load(t5, [path], torch.float32)


# ------------------------------------------------------------------------------- a failed placement undoes itself
@pytest.mark.parametrize("mode", ["resident", "offload"])
def test_out_of_memory_half_way_through_a_read_leaves_nothing(deep, monkeypatch, mode):
    """The 24gb workflow on an 8 GB card (H100 fault run, session 15): the resident read of the
    transformer ran out of memory after 7.2 GiB, nothing owned what it had read, and the next queue (the
    12gb workflow) found 0.47 GiB free. A read that fails half-way now puts every tensor back to its meta
    placeholder (offload: the blocks of that use), and the next placement reads and computes as before."""
    from cogvid_core.memory import filestream as FS
    lazy = _lazy_transformer(deep["transformer"])
    kw = _inputs(lazy, M.V15)
    real, reads = FS._assign, []

    def failing(model, name, t):
        reads.append(name)
        if len(reads) == 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, name, t)
    monkeypatch.setattr(FS, "_assign", failing)
    with pytest.raises(torch.OutOfMemoryError):
        placed = P.place(lazy, "cpu", mode, degrade_on_cpu=False)
        placed.acquire()
    assert len(reads) >= 40
    if mode == "resident":       # no placement: every tensor back to its placeholder
        assert P.placed_of(lazy) is None and all(t.is_meta for t in lazy.parameters())
    else:                        # the placement stays (its embeddings, as between uses), no block is left
        assert sum(_live_block_bytes(lazy, lazy.transformer_blocks)) == 0
        P.placed_of(lazy).release()
    monkeypatch.setattr(FS, "_assign", real)
    ref, _ = L.load_transformer(deep["transformer"], dtype=torch.float32, file_backed=False)
    again = P.place(lazy, "cpu", mode, degrade_on_cpu=False)
    with again.use() as m:
        assert torch.equal(_run(m, kw), _run(ref, kw))
    again.release()
