"""The embedded synthetic shapes data set: determinism, cache, captions that match the pictures."""

import io
import random

import pytest
from PIL import Image

from data_scripts import PAIR_FEATURES, build_synthetic_dataset, load_image_caption_dataset
from data_scripts import shapes, synthetic
from data_scripts.shapes import COLOURS, SHAPES, Scene, Shape, make_example, write_captions

TINY = dict(num_images=20, image_size=32)


def _raw_images(split):
    """Stored PNG bytes of a split, without decoding."""
    from datasets import Image as ImageFeature

    return [v["bytes"] for v in split.cast_column("image", ImageFeature(decode=False))["image"]]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = build_synthetic_dataset(**TINY, seed=3, view="images", cache_dir=tmp_path / "a")
    b = build_synthetic_dataset(**TINY, seed=3, view="images", use_cache=False)
    c = build_synthetic_dataset(**TINY, seed=4, view="images", use_cache=False)
    for split in ("train", "validation", "test"):
        assert _raw_images(a[split]) == _raw_images(b[split])
        assert a[split]["captions"] == b[split]["captions"]
        assert a[split]["image_id"] == b[split]["image_id"]
    assert _raw_images(a["train"]) != _raw_images(c["train"])
    # an image does not depend on how many images are made
    assert make_example(5, 3, 32)[0] == _raw_images(a["train"])[5]


def test_splits_columns_and_sizes(tmp_path):
    pairs = load_image_caption_dataset("synthetic", seed=0, cache_dir=str(tmp_path), **TINY)
    assert {s: len(d) for s, d in pairs.items()} == {"train": 80, "validation": 10, "test": 10}
    assert pairs["train"].features == PAIR_FEATURES
    row = pairs["validation"][0]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    assert row["image_id"] == "shapes-0-000016" and row["caption_index"] == 0
    assert pairs.load_report.layout == "synthetic"
    images = build_synthetic_dataset(**TINY, seed=0, view="images", cache_dir=tmp_path)
    assert all(len(set(caps)) == 5 for caps in images["train"]["captions"])


def test_cache_is_reused_and_keyed_by_parameters(tmp_path, monkeypatch):
    first = build_synthetic_dataset(**TINY, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(synthetic, "make_example", fail)
    again = build_synthetic_dataset(**TINY, cache_dir=tmp_path)
    assert again["test"]["caption"] == first["test"]["caption"]
    monkeypatch.undo()
    build_synthetic_dataset(num_images=20, image_size=40, cache_dir=tmp_path)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2 and all(name.startswith(f"shapes-v{synthetic.GENERATOR_VERSION}-") for name in folders)


def test_scenes_and_captions_agree():
    counts = set()
    for index in range(150):
        png, captions, scene = make_example(index, 7, 64)
        image = Image.open(io.BytesIO(png))
        assert image.size == (64, 64)
        assert len(captions) == 5 == len(set(captions))
        counts.add(len(scene.shapes))
        for s in scene.shapes:
            assert all(s.colour in c and s.shape in c for c in captions if c.count(" ") > 3)
            assert s.radius <= s.x <= 64 - s.radius and s.radius <= s.y <= 64 - s.radius
            assert image.getpixel((int(s.x), int(s.y))) != scene.background  # the shape is drawn there
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            assert (a.colour, a.shape, a.size) != (b.colour, b.shape, b.size)
            expected = {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}
            assert expected[scene.relation]
    assert counts == {1, 2}


def _captions_of(scene, tries=200):
    return {c for seed in range(tries) for c in write_captions(scene, random.Random(seed))}


def test_swapped_colours_or_positions_change_every_caption():
    """No caption is true of both a scene and its swapped-colour or swapped-side twin."""
    red_circle = Shape("red", "circle", "small", 10, 30, 5)
    blue_square = Shape("blue", "square", "large", 50, 30, 10)
    scene = Scene((red_circle, blue_square), relation="left")
    swapped_colours = Scene((Shape("blue", "circle", "small", 10, 30, 5), Shape("red", "square", "large", 50, 30, 10)),
                            relation="left")
    swapped_sides = Scene((red_circle, blue_square), relation="right")
    captions = _captions_of(scene)
    assert "a small red circle to the left of a blue square" in captions
    assert "a blue square to the right of a little red circle" in captions
    assert not captions & _captions_of(swapped_colours)
    assert not captions & _captions_of(swapped_sides)
    one = Scene((red_circle,), cell=(0, 0))
    assert all("two" not in c for c in _captions_of(one, 20))
    assert not _captions_of(one, 20) & _captions_of(Scene((red_circle,), cell=(0, 2)), 20)


def test_vocabulary_is_small():
    words = set()
    for index in range(200):
        for caption in make_example(index, 1, 16)[1]:
            words |= set(caption.replace(",", " ").replace(":", " ").split())
    assert set(COLOURS) | set(SHAPES) <= words
    assert len(words) < 60


def test_bad_parameters():
    with pytest.raises(ValueError, match="num_images"):
        build_synthetic_dataset(num_images=2, use_cache=False)
    with pytest.raises(ValueError, match="image_size"):
        build_synthetic_dataset(num_images=10, image_size=8, use_cache=False)
    with pytest.raises(ValueError, match="view"):
        build_synthetic_dataset(num_images=10, view="captions", use_cache=False)
    assert shapes.PROBABILITY_TWO_SHAPES > 0.5
