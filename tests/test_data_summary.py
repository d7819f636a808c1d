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


@pytest.mark.parametrize("source", ["synthetic", "bad-folder"])
def test_summary_leaves_the_data_loggers_level_as_it_was(tmp_path, source, capsys):
    """The command quiets the data loader's log while it prints its own report; a training run, notebook or test
    later in the same process must still get the data loader's INFO lines (a streamed resume logs through it)."""
    import logging

    data_logger = logging.getLogger("data_scripts")
    data_logger.setLevel(logging.INFO)
    if source == "bad-folder":
        (tmp_path / "Images").mkdir()
        main(["summary", str(tmp_path)])
    else:
        main(["summary", "synthetic", "--num-images", "20", "--image-size", "32", "--cache-dir", str(tmp_path)])
    assert data_logger.level == logging.INFO
    data_logger.setLevel(logging.NOTSET)
