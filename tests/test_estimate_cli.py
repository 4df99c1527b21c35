"""`estimate` takes i2v's memory-changing options (--speed, --lora, --lora-mib, --devices) and counts them
as the planner does: the CLI's numbers equal plan.estimate / plan.planner called with the same arguments."""
import json

import pytest
import torch
from safetensors.torch import save_file

from cogvid_core.cli import main
from cogvid_core.model import lora
from cogvid_core.model.variants import VARIANTS
from cogvid_core.plan import planner
from cogvid_core.plan.estimate import estimate

V = VARIANTS["cogvideox1.5-5b-i2v"]
SHAPE = (V.default_frames, V.default_height, V.default_width)
BASE = ["estimate", "--budget-gib", "24", "--json"]
BF16 = {"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"}


def _cli(capsys, *argv) -> dict:
    assert main([*BASE, "--precision", "bf16", "--text-encoder-precision", "bf16", "--vae-precision", "bf16",
                 *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _step(d: dict) -> int:
    return d["stages"]["denoise_step"]["peak_reserved"]


def _direct(profile="balanced", **kw):
    return estimate(V, *SHAPE, profile, BF16, None, 24 * 2 ** 30, **kw).to_dict()


@pytest.fixture
def lora_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "orbit.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.randn(16, 3072, generator=g),
               "transformer.proj_out.lora_B.weight": torch.randn(64, 16, generator=g)}, str(path))
    return path


@pytest.mark.parametrize("speed", ["fp8", "sage", "fa3fp8"])
def test_speed_counts_as_the_planner_does(capsys, speed):
    got = _cli(capsys, "--profile", "balanced", "--speed", speed)
    assert _step(got) == _step(_direct(speed=speed))
    assert got["counted"]["speed"] == speed


def test_some_speed_changes_the_denoise_step(capsys):
    exact = _step(_cli(capsys, "--profile", "balanced"))
    assert any(_step(_cli(capsys, "--profile", "balanced", "--speed", s)) != exact for s in ("fp8", "sage", "fa3fp8"))


def test_auto_speed_equals_plan(capsys):
    got = _cli(capsys, "--speed", "fp8")
    _prof, est = planner.plan(V, *SHAPE, 24 * 2 ** 30, BF16, speed="fp8")
    assert got["profile"] == est.profile_name and _step(got) == _step(est.to_dict())


def test_lora_file_counts_its_device_bytes(capsys, lora_file):
    want = lora.lora_bytes([(lora.load_lora(lora_file), 0.8)], torch.bfloat16)
    assert want == (16 * 3072 + 64 * 16) * 2
    got = _cli(capsys, "--profile", "balanced", "--lora", f"{lora_file}:0.8")
    assert _step(got) == _step(_direct(lora_bytes=want)) > _step(_direct())
    assert got["counted"]["lora_mib"] == round(want / 2 ** 20, 1)
    # strength 0 is inactive in the pipeline: nothing counted
    assert _step(_cli(capsys, "--profile", "balanced", "--lora", f"{lora_file}:0")) == _step(_direct())


def test_lora_bytes_follow_the_transformer_precision(capsys, lora_file):
    want = lora.lora_bytes([(lora.load_lora(lora_file), 1.0)], torch.float32)
    prec = {**BF16, "transformer": "fp32"}
    # exit 1: 1.5 in fp32 does not fit 24 GiB balanced; the numbers are printed all the same
    assert main([*BASE, "--profile", "balanced", "--precision", "fp32", "--text-encoder-precision", "bf16",
                 "--vae-precision", "bf16", "--lora", str(lora_file)]) == 1
    got = json.loads(capsys.readouterr().out)
    assert _step(got) == _step(estimate(V, *SHAPE, "balanced", prec, None, 24 * 2 ** 30, lora_bytes=want).to_dict())


def test_lora_mib_adds_to_the_files(capsys, lora_file):
    file_bytes = lora.lora_bytes([(lora.load_lora(lora_file), 1.0)], torch.bfloat16)
    got = _cli(capsys, "--profile", "balanced", "--lora-mib", "512", "--lora", str(lora_file))
    assert _step(got) == _step(_direct(lora_bytes=512 * 2 ** 20 + file_bytes))
    text = main(["estimate", "--budget-gib", "24", "--profile", "balanced", "--lora-mib", "512"])
    assert text == 0 and "counted: speed exact, LoRA 512 MiB" in capsys.readouterr().out


def test_devices_pair_estimates_one_branch_per_gpu(capsys):
    got = _cli(capsys, "--profile", "balanced", "--devices", "cpu,cpu")
    want = estimate(V, *SHAPE, planner.one_branch([planner.get_profile("balanced")])[0], BF16, None,
                    24 * 2 ** 30).to_dict()
    assert got["cfg_mode"] == "sequential" and _step(got) == _step(want)
    assert got["counted"]["cfg_pair"] is True
    auto = _cli(capsys, "--devices", "cpu,cpu")
    _prof, est = planner.plan(V, *SHAPE, 24 * 2 ** 30, BF16, cfg_pair=True)
    assert auto["profile"] == est.profile_name and _step(auto) == _step(est.to_dict())
    one = _cli(capsys, "--profile", "balanced", "--devices", "transformer=cpu,t5=cpu")
    assert one["counted"]["cfg_pair"] is False and _step(one) == _step(_direct())


@pytest.mark.parametrize("argv, says", [
    (["--speed", "bogus"], "unknown or repeated speed part"),
    (["--speed", "sage+flash"], "two attention kernels"),
    (["--lora-mib", "-1"], "--lora-mib -1"),
    (["--lora-mib", "nan"], "--lora-mib nan"),
    (["--lora", "missing.safetensors"], "LoRA file not found"),
    (["--devices", "cpu,cpu,cpu"], "one device or two"),
])
def test_bad_values_are_one_error_line(capsys, argv, says):
    assert main(["estimate", "--budget-gib", "24", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0]
