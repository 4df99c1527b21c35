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
    assert main(["estimate", "--budget-gib", "6", "--cache", "pab"]) == 2
    err = capsys.readouterr().err
    assert "step cache pab holds ~21.7 GiB" in err and "what fits: cache none, fbc" in err
    assert main(["estimate", "--budget-gib", "6", "--cache", "fbc"]) == 0


def test_unknown_cache_is_one_line(capsys):
    assert main(["estimate", "--budget-gib", "80", "--cache", "teacache"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown step cache 'teacache'")
