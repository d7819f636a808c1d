"""``python -m data_scripts summary``: output, help and error reporting."""

import pytest

from data_scripts.summary import main


def test_summary_of_synthetic(tmp_path, capsys):
    code = main(["summary", "synthetic", "--num-images", "20", "--image-size", "32", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "layout: synthetic" in out
    for split, images, captions in (("train", 16, 80), ("validation", 2, 10), ("test", 2, 10)):
        line = next(line for line in out.splitlines() if line.startswith(split))
        assert line.split()[:4] == [split, str(images), str(captions), "5"]
    assert "words/caption" in out and "example captions" in out


def test_summary_help_lists_sources(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["summary", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "captions.txt" in out and "--on-bad-image" in out and "--no-verify" in out


def test_summary_reports_bad_directory(tmp_path, capsys):
    (tmp_path / "Images").mkdir()
    assert main(["summary", str(tmp_path)]) == 2
    assert "not a Flickr8k layout" in capsys.readouterr().err
