"""Nothing lost on the command line: what was sampled survives a failed or interrupted decode or write,
`--from-latents` decodes it to the frames the uninterrupted run writes, and a bad --out fails first."""
from __future__ import annotations

import errno

import numpy as np
import pytest
from PIL import Image

from cogvid_core.cli import main
from cogvid_core.run import guard, keep, video

K15 = "cogvideox1.5-5b-i2v"


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "start.png"
    yy, xx = np.mgrid[0:64, 0:96]
    Image.fromarray(np.stack([xx * 2.6, yy * 4, 128 + 0 * xx], -1).astype(np.uint8)).save(path)
    return path


def _args(tiny_ckpts, start, out, *extra):
    return ["i2v", "--model", str(tiny_ckpts[K15]["hf"]), "--image", str(start), "--prompt", "a fox",
            "--steps", "2", "--device", "cpu", "--precision", "fp32", "--out", str(out), *extra]


def _frames(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def _one_error_line(err):
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_bad_out_fails_before_any_model_loads(tmp_path, start, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    def no_load(*a, **k):
        raise AssertionError("a model was read before --out was checked")

    from cogvid_core.model import loading
    monkeypatch.setattr(loading, "peek_transformer", no_load)
    for out, says in ((blocker / "out.mp4", "exists and is not a folder"), (blocker / "sub" / "out.mp4", "cannot write in")):
        code = main(["i2v", "--model", "nowhere", "--image", str(start), "--prompt", "p", "--out", str(out)])
        assert code == 2
        assert says in _one_error_line(capsys.readouterr().err)


def test_full_disk_keeps_latents_and_from_latents_gives_the_same_frames(tiny_ckpts, start, tmp_path, capsys,
                                                                        monkeypatch):
    assert main(_args(tiny_ckpts, start, tmp_path / "ref")) == 0
    reference = _frames(tmp_path / "ref")
    capsys.readouterr()

    def full_disk(frames, out):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(video, "write_pngs", full_disk)
        code = main(_args(tiny_ckpts, start, tmp_path / "failed"))
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in _one_error_line(err)
    kept = keep.latents_path(tmp_path / "failed")
    assert kept.is_file() and str(kept) in err and "--from-latents" in err

    assert main(["i2v", "--model", str(tiny_ckpts[K15]["hf"]), "--device", "cpu", "--precision", "fp32",
                 "--from-latents", str(kept), "--out", str(tmp_path / "again")]) == 0
    np.testing.assert_array_equal(_frames(tmp_path / "again"), reference)


def test_interrupted_decode_keeps_latents(tiny_ckpts, start, tmp_path, capsys, monkeypatch):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(guard, "decode", ctrl_c)
    assert main(_args(tiny_ckpts, start, tmp_path / "out.mp4")) == 130
    kept = keep.latents_path(tmp_path / "out.mp4")
    assert kept.is_file() and str(kept) in capsys.readouterr().err
    lat, tile, settings = keep.load(kept)
    assert lat.variant_key == K15 and lat.samples.ndim == 5 and settings["model"] == str(tiny_ckpts[K15]["hf"])


def test_from_latents_refuses_other_files(tiny_ckpts, tmp_path, capsys):
    code = main(["i2v", "--model", str(tiny_ckpts[K15]["hf"]), "--device", "cpu",
                 "--from-latents", str(tiny_ckpts[K15]["single"]["vae"]), "--out", str(tmp_path / "o.mp4")])
    assert code == 2 and "not a latents file" in _one_error_line(capsys.readouterr().err)


def test_i2v_without_image_names_what_is_missing(tiny_ckpts, tmp_path, capsys):
    code = main(["i2v", "--model", str(tiny_ckpts[K15]["hf"]), "--out", str(tmp_path / "o.mp4")])
    assert code == 2 and "--image and --prompt" in _one_error_line(capsys.readouterr().err)
