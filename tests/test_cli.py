"""The command line: a user's mistake is one `error:` line (exit 2), a bug shows its traceback."""
import pytest

from cogvid_core.plan import estimate as E
from cogvid_core.cli import BUG_EXIT, main


def test_estimate_subcommand_prints_the_report(capsys):
    assert main(["estimate", "--profile", "lowvram", "--budget-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "profile lowvram" in out and "FITS" in out


def test_user_error_is_one_line(capsys):
    assert main(["estimate", "--profile", "turbo", "--budget-gib", "80"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown placement profile 'turbo'") and "Traceback" not in err


def test_bug_shows_its_traceback(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("estimate() got an unexpected keyword argument 'x'")

    monkeypatch.setattr(E, "estimate", broken)
    code = main(["estimate", "--profile", "lowvram", "--budget-gib", "80"])
    err = capsys.readouterr().err
    assert code == BUG_EXIT and code not in (0, 1, 2)
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "TypeError: estimate() got an unexpected keyword argument 'x'" in err
    assert "error: " not in err


def _tagged_photo(path, orientation: int):
    """A 16x8 picture, red left half, blue right half, stored with an EXIF orientation tag."""
    from PIL import Image
    im = Image.new("RGB", (16, 8), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)


def test_i2v_applies_the_photo_orientation(tiny_ckpts, tmp_path, monkeypatch, capsys):
    """A phone photo stores its pixels sideways plus an orientation tag: the video starts from the photo
    as seen (ComfyUI's LoadImage applies the tag too), not from the raw sideways pixels."""
    from cogvid_core.run import pipeline

    seen = []

    def capture(run, vc, image):
        seen.append(image)
        raise KeyboardInterrupt      # stop here: the image as the encode receives it is all this test needs
    monkeypatch.setattr(pipeline, "_encode_prompts", lambda run: (None, None))
    monkeypatch.setattr(pipeline, "_encode_image", capture)
    model = str(tiny_ckpts["cogvideox1.5-5b-i2v"]["hf"])
    for name in ("photo.jpg", "photo.png"):
        path = tmp_path / name
        _tagged_photo(path, 6)                 # 6: turn 90 degrees clockwise to view
        main(["i2v", "--model", model, "--image", str(path), "--prompt", "x", "--frames", "17", "--height", "64",
              "--width", "96", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "out.mp4")])
        im = seen[-1]
        assert im.size == (8, 16), name                          # upright: portrait
        top, bottom = im.getpixel((4, 1)), im.getpixel((4, 14))
        assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], name   # the left half went up
    capsys.readouterr()


def test_no_abbreviations_cache_is_not_cache_dir():
    """argparse read `--cache pab` as `--cache-dir pab` while abbreviations were allowed."""
    from cogvid_core.cli import build_parser
    args = build_parser().parse_args(["i2v", "--model", "m", "--image", "i", "--prompt", "p", "--out", "o",
                                      "--cache", "pab"])
    assert args.cache == "pab" and args.cache_dir is None
    with pytest.raises(SystemExit):   # an abbreviation is an error now, not a silent other flag
        build_parser().parse_args(["i2v", "--model", "m", "--image", "i", "--prompt", "p", "--out", "o",
                                   "--cache-d", "x"])


def test_estimate_with_a_cache_that_does_not_fit_names_what_fits(capsys):
    # 6.5 GiB: fbc's 1.5 GiB of block outputs fit beside the lowvram step with the nearest file's margins
    # (h100.json + the transfer margin on this CPU; at 6 GiB they do not since session 18's refit)
    assert main(["estimate", "--budget-gib", "6.5", "--cache", "pab"]) == 2
    err = capsys.readouterr().err
    assert "step cache pab holds ~21.7 GiB" in err and "what fits: cache none, fbc, teacache" in err
    assert main(["estimate", "--budget-gib", "6.5", "--cache", "fbc"]) == 0


def test_unknown_cache_is_one_line(capsys):
    assert main(["estimate", "--budget-gib", "80", "--cache", "magcache"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown step cache 'magcache'")
