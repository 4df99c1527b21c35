"""The bench scripts (bench/): they run on the tree they ship with. The GPU numbers need the GPU;
what is checked here is the code path a device run takes before and around its measurements."""
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.common import checkpoints, provenance, reference
from cogvid_core.model import variants as M

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_estimate_grid_env_records_the_streaming_code_it_ran():
    """Every grid run starts with its env: the sha1 of the files a streamed block's allocations come
    from. They moved into cogvid_core/memory/; naming the old paths stopped the grid before its first cell."""
    from bench import estimate_grid as G
    args = SimpleNamespace(tiny=True, budget_s=None, part=None)
    env = G._env(torch.device("cpu"), torch.float32, args, time.perf_counter(), None)
    assert sorted(env["sha1"]) == sorted(G.STREAMING_CODE)
    assert all((ROOT / p).is_file() and len(h) == 12 for p, h in env["sha1"].items())
    assert {"command", "card", "date", "commit", "torch", "allocator"} <= set(env)


def test_comfyui_bench_short_names_lead_to_the_shipped_workflows():
    """The bench's records name workflows 12gb / 24gb; the files are named as Browse Templates titles."""
    mod = _script("bench_comfyui_gpu")
    for short in ("24gb", "12gb", "lora_24gb"):
        assert mod.workflow_path(short, ROOT).is_file(), short
    assert mod.workflow_path("/x/y.json", ROOT) == Path("/x/y.json")
    with pytest.raises(SystemExit, match="short names: 24gb, 12gb, lora_24gb"):
        mod.workflow_path("16gb", ROOT)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_and_answers_help(name, capsys, monkeypatch):
    """The scripts import their helpers (bench.common, the split modules) as the tests load them, and
    their command lines parse: what breaks first when a module moves."""
    mod = _script(name)
    monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", "--help"])     # main() or main(argv=None)
    with pytest.raises(SystemExit) as stop:
        mod.main()
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_provenance_names_command_card_date_and_commit(tmp_path):
    doc = dict(provenance.provenance("NVIDIA H200"), rows=[1])
    assert doc["card"] == "NVIDIA H200" and doc["command"].startswith(sys.executable)
    assert doc["date"].endswith("UTC") and doc["torch"] and doc["diffusers"]
    assert doc["commit"] is None or len(doc["commit"]) >= 7
    out = provenance.write_json(tmp_path / "deep" / "r.json", dict(doc, where=tmp_path))
    assert json.loads(out.read_text())["where"] == str(tmp_path)


def test_hf_checkpoints_written_once_by_the_engine_writer(tmp_path):
    folder = checkpoints.hf_checkpoints(tmp_path, M.V15.key, full=False)
    assert folder == tmp_path / M.V15.folder and (folder / "model_index.json").is_file()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert checkpoints.hf_checkpoints(tmp_path, M.V15.key, full=False) == folder     # reused, not rewritten
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_reference_pipeline_records_its_four_stages(tiny_ckpts):
    """The diffusers reference (bench_memory, bench_hostrun) through run_staged: the engine's stage rows,
    a step callback per step, the pipeline's own methods back after the call."""
    from diffusers import CogVideoXImageToVideoPipeline

    from cogvid_core.run.report import StageRecorder
    v = M.V15
    frames, height, width = M.default_size(v, M.transformer_config(v, tiny=True))
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(tiny_ckpts[v.key]["hf"]), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    reference.apply_recipe(pipe, "diffusers-model-offload", torch.device("cpu"))     # on the CPU: resident
    rec, steps = StageRecorder("cpu"), []
    video = reference.run_staged(pipe, rec, reference.start_image(height, width), frames=frames, height=height,
                                 width=width, steps=2, cfg=6.0, seed=42, on_step=lambda: steps.append(1))
    assert [r["stage"] for r in rec.rows()] == ["text encode", "image encode", "denoise", "decode"]
    assert len(steps) == 2 and rec.rows()[2]["steps"] == 2
    assert video.shape[1] == frames and torch.isfinite(video).all()
    assert "encode_prompt" not in vars(pipe) and "decode_latents" not in vars(pipe)
    with pytest.raises(ValueError, match="known: diffusers-resident"):
        reference.apply_recipe(pipe, "diffusers-fast", torch.device("cpu"))
