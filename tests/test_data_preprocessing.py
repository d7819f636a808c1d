"""Image transforms, the collator, the unique-image batch sampler and the view conversions."""

import pytest
import numpy as np
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast, ViTImageProcessor

from data_scripts import (
    ContrastiveCollator,
    ImageSpec,
    ImageTransform,
    ImageGroupBatchSampler,
    RandomFeatureCrop,
    RandomMirror,
    TransformedRows,
    UniqueImageBatchSampler,
    build_synthetic_dataset,
    images_with_sided_captions,
    to_image_view,
    to_pair_view,
)
from dualencoder.training.feature_cache import CachedFeatureTransform

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]


def vit_processor(size=16, resample=3):
    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=MEAN, image_std=STD, resample=resample)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = "a an the red blue green circle square left right of to small big one two three".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    return build_synthetic_dataset(num_images=20, image_size=32, seed=1, cache_dir=tmp_path_factory.mktemp("synth"))


# ---- image transforms ------------------------------------------------------------------


def test_spec_is_read_from_the_processor():
    spec = ImageSpec.from_processor(vit_processor(24, resample=0))
    assert spec.output_size == (24, 24) and spec.interpolation == InterpolationMode.NEAREST
    assert spec.mean == tuple(MEAN) and spec.std == tuple(STD)
    clip = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16})
    spec = ImageSpec.from_processor(clip)
    assert spec.resize == (20,) and spec.crop == (16, 16) and spec.interpolation == InterpolationMode.BICUBIC

    class Wrapper:  # e.g. VisionTextDualEncoderProcessor
        image_processor = vit_processor(12)

    assert ImageSpec.from_processor(Wrapper()).output_size == (12, 12)


def test_eval_transform_normalises_with_processor_stats():
    transform = ImageTransform(vit_processor(16), train=False)
    out = transform({"image": [Image.new("RGB", (40, 30), (255, 255, 255))], "image_id": ["x"]})
    assert set(out) == {"pixel_values", "image_id"}
    pixels = out["pixel_values"][0]
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    expected = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])
    assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=1e-5)


def test_clip_style_resize_then_crop():
    clip = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16})
    pixels = ImageTransform(clip).pixels(Image.new("RGB", (60, 30)))
    assert pixels.shape == (3, 16, 16)


@pytest.mark.parametrize("mode, colour", [("RGBA", (255, 0, 0, 0)), ("L", 128), ("CMYK", (0, 255, 255, 0)),
                                          ("P", 3), ("LA", (10, 0)), ("I;16", 40000)])
def test_any_mode_becomes_three_channels(mode, colour):
    transform = ImageTransform(vit_processor(8))
    pixels = transform.pixels(Image.new(mode, (10, 10), colour))
    assert pixels.shape == (3, 8, 8)
    if mode == "RGBA":  # fully transparent: composited on white, not black
        assert torch.allclose(pixels[:, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]), atol=1e-5)


def test_training_augmentation_crops_but_never_flips():
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 32))  # left red, right blue
    transform = ImageTransform(vit_processor(16), train=True)
    assert transform.augment
    torch.manual_seed(0)
    outputs = [transform.pixels(image) for _ in range(30)]
    assert all(p.shape == (3, 16, 16) for p in outputs)
    assert all(p[0, :, 0].mean() > p[2, :, 0].mean() for p in outputs)  # left edge stays red
    assert len({round(float(p.sum()), 3) for p in outputs}) > 1  # crops vary
    assert not ImageTransform(vit_processor(16), train=True, augment=False).augment


def test_lazy_transform_on_a_dataset(tiny_synthetic):
    row = tiny_synthetic["validation"].with_transform(ImageTransform(vit_processor(16)))[0]
    assert row["pixel_values"].shape == (3, 16, 16) and "image" not in row
    assert row["caption"] == tiny_synthetic["validation"][0]["caption"]
    assert ImageTransform(vit_processor(16))({"caption": ["x"]}) == {"caption": ["x"]}  # no image: passthrough


# ---- collator --------------------------------------------------------------------------


def test_collator_pads_dynamically_and_numbers_images(tokenizer):
    rows = [
        {"pixel_values": torch.zeros(3, 8, 8), "caption": "a red circle", "image_id": "img1.jpg"},
        {"pixel_values": torch.ones(3, 8, 8), "caption": "a big blue square left of a small green circle",
         "image_id": "img2.jpg"},
        {"pixel_values": torch.ones(3, 8, 8), "caption": "the red circle", "image_id": "img1.jpg"},
    ]
    batch = ContrastiveCollator(tokenizer, max_length=6)(rows)
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["input_ids"].shape == (3, 6)  # truncated to max_length
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    ids = batch["image_ids"].tolist()
    assert ids[0] == ids[2] != ids[1] and batch["image_ids"].dtype == torch.long  # img1.jpg's two captions
    # an image's number is the same in every batch (and every process): the loss matches it across processes
    assert ContrastiveCollator(tokenizer, max_length=6)([rows[2]])["image_ids"].tolist() == [ids[0]]
    short = ContrastiveCollator(tokenizer, max_length=32)([rows[0], rows[2]])
    assert short["input_ids"].shape == (2, 3)  # padded to the longest in the batch only
    assert set(short) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}


def test_collator_passes_cached_features_and_explains_mistakes(tokenizer):
    collate = ContrastiveCollator(tokenizer)
    rows = [{"vision_pooled": [0.0, 1.0], "text_pooled": torch.ones(2), "caption": "a", "image_id": str(i)}
            for i in range(2)]
    batch = collate(rows)
    assert batch["vision_pooled"].shape == (2, 2) and batch["text_pooled"].dtype == torch.float32
    assert "pixel_values" not in batch
    with pytest.raises(ValueError, match="apply the image transform"):
        collate([{"image": Image.new("RGB", (4, 4)), "caption": "a"}])
    with pytest.raises(ValueError, match="'pixel_values' is in some rows"):
        collate([{"pixel_values": torch.zeros(3, 2, 2)}, {"caption": "a"}])


def test_collator_pads_cached_text_states_of_different_lengths_with_their_mask(tokenizer):
    rows = [{"text_hidden": torch.ones(length, 3, dtype=torch.float16), "image_id": str(length)} for length in (2, 4)]
    batch = ContrastiveCollator(tokenizer)(rows)
    assert batch["text_hidden"].shape == (2, 4, 3) and batch["text_hidden"].dtype == torch.float32
    assert batch["text_hidden_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["text_hidden"][0, 2:].abs().sum() == 0
    assert "input_ids" not in batch


# ---- sampler ---------------------------------------------------------------------------


def _ids(n_images=12, per_image=5):
    return [f"img{i}" for i in range(n_images) for _ in range(per_image)]


def test_sampler_batches_hold_distinct_images_and_cover_everything():
    ids = _ids()
    sampler = UniqueImageBatchSampler(ids, batch_size=8, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ids)))
    assert all(len({ids[i] for i in b}) == len(b) for b in batches)
    assert all(len(b) == 8 for b in batches[:-1])


def test_sampler_is_deterministic_per_seed_and_epoch():
    ids = _ids()
    a, b = UniqueImageBatchSampler(ids, 8, seed=3), UniqueImageBatchSampler(ids, 8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(UniqueImageBatchSampler(ids, 8, seed=4)) != first


def test_sampler_drop_last_and_small_image_count():
    ids = _ids(12, 5)
    sampler = UniqueImageBatchSampler(ids, 7, drop_last=True)
    assert all(len(b) == 7 for b in sampler) and len(sampler) == 60 // 7
    few = list(UniqueImageBatchSampler(_ids(3, 5), batch_size=8))  # more rows per batch than images
    assert all(len(b) <= 3 and len({i // 5 for i in b}) == len(b) for b in few)
    assert sum(len(b) for b in few) == 15


def test_image_group_batches_hold_whole_images_each_once_per_epoch():
    ids = _ids(12, 5)
    sampler = ImageGroupBatchSampler(ids, images_per_batch=5, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    assert sorted(i for b in batches for i in b) == list(range(len(ids)))
    for batch in batches:
        images = {ids[i] for i in batch}
        assert len(batch) == 5 * len(images)  # every caption of each image in the batch
    assert [len({ids[i] for i in b}) for b in batches] == [5, 5, 2]
    again = ImageGroupBatchSampler(ids, 5, seed=3)
    assert list(again) == batches
    again.set_epoch(1)
    assert list(again) != batches


def _same_topic_pair_rate(batches, ids, topics):
    """Share of image pairs within a batch that have one topic."""
    same = pairs = 0
    for batch in batches:
        images = sorted({ids[i] for i in batch})
        for a in range(len(images)):
            for b in range(a + 1, len(images)):
                pairs += 1
                same += topics[images[a]] == topics[images[b]]
    return same / pairs


def test_topic_batches_draw_look_alike_images_together_and_keep_every_image_once():
    ids = _ids(120, 5)
    topics = {f"img{i}": i % 8 for i in range(120)}  # 8 topics of 15 images
    plain = ImageGroupBatchSampler(ids, images_per_batch=20, seed=3)
    by_topic = ImageGroupBatchSampler(ids, images_per_batch=20, seed=3, topics=topics, topic_share=0.5)
    for epoch in range(3):
        plain.set_epoch(epoch)
        by_topic.set_epoch(epoch)
        batches = list(by_topic)
        assert sorted(i for b in batches for i in b) == list(range(len(ids)))  # every caption once an epoch
        assert [len(b) for b in batches] == [len(b) for b in plain] and len(batches) == len(by_topic)
        for batch in batches:
            assert len(batch) == 5 * len({ids[i] for i in batch})  # whole images
        # random batches of 8 equal topics pair alike about 1 time in 8; half a batch by topic, twice as often
        assert _same_topic_pair_rate(batches, ids, topics) > 1.5 * _same_topic_pair_rate(list(plain), ids, topics)
    whole = ImageGroupBatchSampler(ids, images_per_batch=20, seed=3, topics=topics, topic_share=1.0)
    for batch in whole:  # all by topic: 20 images from consecutive topics of 15 span at most 3 of them
        assert len({topics[ids[i]] for i in batch}) <= 3
    again = ImageGroupBatchSampler(ids, 20, seed=3, topics=topics, topic_share=0.5)
    again.set_epoch(2)
    assert list(again) == batches


def test_topic_share_zero_is_the_plain_sampler_and_bad_topics_are_named():
    ids = _ids(30, 5)
    topics = {f"img{i}": i % 3 for i in range(30)}
    plain = list(ImageGroupBatchSampler(ids, 7, seed=1))
    assert list(ImageGroupBatchSampler(ids, 7, seed=1, topics=topics, topic_share=0.0)) == plain
    assert list(ImageGroupBatchSampler(ids, 7, seed=1, topics=topics, topic_share=1.0)) != plain
    with pytest.raises(ValueError, match="no topic for 1 image.*img29"):
        ImageGroupBatchSampler(ids, 7, topics={f"img{i}": 0 for i in range(29)})
    with pytest.raises(ValueError, match="between 0 and 1"):
        ImageGroupBatchSampler(ids, 7, topics=topics, topic_share=1.5)


def test_sampler_collator_dataloader_end_to_end(tiny_synthetic, tokenizer):
    train = tiny_synthetic["train"]
    sampler = UniqueImageBatchSampler(train, batch_size=6, seed=0)
    loader = DataLoader(train.with_transform(ImageTransform(vit_processor(16), train=True)),
                        batch_sampler=sampler, collate_fn=ContrastiveCollator(tokenizer, max_length=16))
    batches = list(loader)
    assert sum(len(b["image_ids"]) for b in batches) == len(train)
    for batch in batches:
        assert batch["pixel_values"].shape[1:] == (3, 16, 16)
        assert len(set(batch["image_ids"].tolist())) == len(batch["image_ids"])  # all distinct


# ---- views -----------------------------------------------------------------------------


def test_view_round_trip_keeps_order_and_captions():
    image = Image.new("RGB", (4, 4))
    features = Features({"image": ImageFeature(), "image_id": Value("string"), "caption": Value("string"),
                         "caption_index": Value("int32")})
    pairs = Dataset.from_dict({
        "image": [image] * 5, "image_id": ["b", "a", "b", "a", "b"],
        "caption": ["b1", "a1", "b0", "a0", "b2"], "caption_index": [1, 1, 0, 0, 2],
    }, features=features)
    images = to_image_view(pairs)
    assert images.column_names == ["image", "image_id", "captions"]
    assert images["image_id"] == ["b", "a"] and images["captions"] == [["b0", "b1", "b2"], ["a0", "a1"]]
    back = to_pair_view(images)
    assert back["caption"] == ["b0", "b1", "b2", "a0", "a1"] and back["caption_index"] == [0, 1, 2, 0, 1]
    assert back.features["image"] == ImageFeature()
    with pytest.raises(ValueError, match="missing"):
        to_pair_view(pairs)


def test_images_whose_captions_name_a_side_are_found_by_whole_word():
    ids = ["a", "a", "b", "c", "d"]
    captions = ["a dog", "a dog on the Left", "a bright room", "leftover pizza", "turning right"]
    assert images_with_sided_captions(ids, captions) == {"a", "d"}


def test_random_mirror_flips_about_half_never_a_sided_image_and_is_reproducible():
    ids = [f"img{i}" for i in range(2000)]
    mirror = RandomMirror(seed=1, never={"img0", "img1"})
    flipped = {i for i in ids if mirror(i)}
    assert "img0" not in flipped and "img1" not in flipped
    assert 900 < len(flipped) < 1100
    assert flipped == {i for i in ids if RandomMirror(seed=1, never={"img0", "img1"})(i)}  # no RNG state
    mirror.set_epoch(1)
    assert flipped != {i for i in ids if mirror(i)}  # a new draw each epoch
    assert not any(RandomMirror(seed=1, probability=0.0)(i) for i in ids)
    with pytest.raises(ValueError, match="probability"):
        RandomMirror(seed=1, probability=2.0)


def test_mirrored_rows_read_the_mirrored_cache_or_get_flipped_pixels():
    mirror = RandomMirror(seed=0, probability=1.0, never={"b"})
    batch = {"image_id": ["a", "b"], "caption": ["x", "y"]}
    cache, mirrored = {"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.ones(2)}
    out = CachedFeatureTransform(None, vision_hidden_cache=cache, mirror=mirror, mirrored_cache=mirrored)(batch)
    assert out["vision_hidden"][0].tolist() == [1, 1] and out["vision_hidden"][1].tolist() == [0, 0]

    class Pixels:
        def pixels(self, image, key=None):
            return torch.arange(3.0).expand(3, 1, 3)

    out = CachedFeatureTransform(Pixels(), mirror=mirror)({**batch, "image": [None, None]})
    assert out["pixel_values"][0][0, 0].tolist() == [2, 1, 0]  # "a" mirrored
    assert out["pixel_values"][1][0, 0].tolist() == [0, 1, 2]  # "b" says left/right: kept
    with pytest.raises(ValueError, match="mirrored_cache"):
        CachedFeatureTransform(None, vision_cache=cache, mirror=mirror)


def test_a_feature_crop_is_a_resized_window_of_the_map_drawn_per_image_and_epoch():
    crop = RandomFeatureCrop(seed=3)
    windows = {i: crop.window(14, 14, f"img{i}") for i in range(200)}
    for top, left, h, w in windows.values():
        assert 0 <= top <= 14 - h and 0 <= left <= 14 - w
        assert 0.6 * 196 - 14 <= h * w <= 196  # the area range, up to rounding to the grid
    assert len(set(windows.values())) > 20  # images get different windows
    assert windows == {i: RandomFeatureCrop(seed=3).window(14, 14, f"img{i}") for i in range(200)}  # no RNG state
    crop.set_epoch(1)
    assert windows != {i: crop.window(14, 14, f"img{i}") for i in range(200)}  # a new draw each epoch

    # The output keeps shape and dtype, and is the chosen window upsampled: a map that is linear in
    # its column index stays linear, now spanning only the window's columns.
    columns = torch.arange(14.0).expand(2, 14, 14).to(torch.float16)
    cropped_id = next(f"img{i}" for i, (_, _, h, w) in windows.items() if w < 12)
    crop.set_epoch(0)
    top, left, h, w = crop.window(14, 14, cropped_id)
    out = crop(columns, cropped_id)
    assert out.shape == columns.shape and out.dtype == torch.float16
    assert left <= out.min() and out.max() <= left + w - 1
    assert torch.equal(out[0], out[1]) and (out[:, :, 1:] >= out[:, :, :-1]).all()
    assert torch.equal(RandomFeatureCrop(seed=3, scale=(1.0, 1.0), ratio=(1.0, 1.0))(columns, "x"), columns)
    with pytest.raises(ValueError, match="scale"):
        RandomFeatureCrop(seed=0, scale=(0.0, 1.0))


def test_cached_prefix_rows_of_one_image_get_the_same_crop_after_the_mirror():
    mirror = RandomMirror(seed=0, probability=1.0)
    crop = RandomFeatureCrop(seed=0, scale=(0.3, 0.3))
    plain = {"a": torch.zeros(1, 8, 8)}
    mirrored = {"a": torch.arange(8.0).expand(1, 8, 8)}
    batch = {"image_id": ["a", "a"], "caption": ["x", "y"]}
    out = CachedFeatureTransform(None, vision_hidden_cache=plain, mirror=mirror, mirrored_cache=mirrored,
                                 prefix_crop=crop)(batch)
    first, second = out["vision_hidden"]
    assert torch.equal(first, second) and torch.equal(first, crop(mirrored["a"], "a"))
    assert not torch.equal(first, mirrored["a"])


def test_transformed_rows_apply_the_batch_transform_to_the_chosen_rows_only():
    data = Dataset.from_dict({"image_id": ["a", "b", "c", "d"], "caption": ["w", "x", "y", "z"]})
    calls = []

    def transform(batch):
        calls.append(list(batch["image_id"]))
        return {**batch, "upper": [c.upper() for c in batch["caption"]]}

    rows = TransformedRows(data, transform, indices=[3, 1])
    assert len(rows) == 2 and rows.column("image_id") == ["d", "b"]
    assert rows.__getitems__([1, 0]) == [{"image_id": "b", "caption": "x", "upper": "X"},
                                          {"image_id": "d", "caption": "z", "upper": "Z"}]
    assert calls == [["b", "d"]]  # one transform call per batch, on those rows only
    loader = DataLoader(rows, batch_size=2, collate_fn=lambda batch: [r["upper"] for r in batch])
    assert list(loader) == [["Z", "X"]]


def test_a_crop_drawn_per_image_and_epoch_ignores_the_global_rng_and_changes_each_epoch():
    from data_scripts import RandomFeatureCrop

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    draw = RandomFeatureCrop(seed=5)
    transform = ImageTransform(vit_processor(16), train=True, crop_draw=draw)
    torch.manual_seed(1)
    first = transform({"image": [image, image], "image_id": ["a", "b"]})["pixel_values"]
    torch.manual_seed(2)  # another global RNG state: the same crops
    again = transform({"image": [image, image], "image_id": ["a", "b"]})["pixel_values"]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], first[1])  # images get their own crops
    draw.set_epoch(1)
    assert not torch.equal(transform({"image": [image], "image_id": ["a"]})["pixel_values"][0], first[0])
    top, left, h, w = RandomFeatureCrop(seed=5).window(40, 60, "a")
    assert 0.6 * 2400 - 100 <= h * w <= 2400  # the crop keeps 60-100% of the area, as the pixel crop's range
