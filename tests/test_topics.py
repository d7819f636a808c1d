"""Topics of the training images: k-means of their captions' text embeddings (topic-aware batches)."""

import pytest
import torch

from dualencoder.training.topics import image_topics


def _rows(n_images=12):
    """Images 0-5 have captions about dogs, 6-11 about bikes; the features say so by direction only."""
    dog, bike = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    image_ids, captions, features = [], [], {}
    generator = torch.Generator().manual_seed(0)
    for i in range(n_images):
        for k in range(5):
            caption = f"caption {k} of image {i}"
            direction = dog if i < n_images // 2 else bike
            scale = 1.0 + 9.0 * torch.rand((), generator=generator)  # lengths differ: only directions count
            features[caption] = scale * (direction + 0.1 * torch.randn(3, generator=generator))
            image_ids.append(f"img{i}")
            captions.append(caption)
    return image_ids, captions, features


def test_images_whose_captions_read_alike_share_a_topic():
    image_ids, captions, features = _rows()
    topics = image_topics(image_ids, captions, features, 2, seed=0)
    assert sorted(topics) == sorted(set(image_ids))
    assert len({topics[f"img{i}"] for i in range(6)}) == 1
    assert len({topics[f"img{i}"] for i in range(6, 12)}) == 1
    assert topics["img0"] != topics["img6"]
    assert image_topics(image_ids, captions, features, 2, seed=0) == topics  # deterministic per seed


def test_topic_errors_say_what_to_change():
    image_ids, captions, features = _rows(4)
    with pytest.raises(ValueError, match="at least 2"):
        image_topics(image_ids, captions, features, 1)
    with pytest.raises(ValueError, match="use fewer topics"):
        image_topics(image_ids, captions, features, 5)
    with pytest.raises(ValueError, match="rows of the training pairs"):
        image_topics(image_ids[:-1], captions, features, 2)
