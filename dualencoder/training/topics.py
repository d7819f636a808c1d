"""Topics of the training images, for topic-aware batches (`data_scripts.ImageGroupBatchSampler`).

An image's topic is its k-means cluster in the pretrained text tower's caption space: the mean of its
captions' unit-length pooled features (MiniLM's are sentence embeddings), clustered by direction.
Captions, not pixels, decide what retrieval confuses: two images whose captions read alike are the
negatives a Recall@1 ranking has to tell apart. The topics are computed once, before training, from
the towers as loaded, so they do not drift with the model, and are kept in the checkpoint state so a
resumed run draws the same batches.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans


def image_topics(image_ids: Sequence[str], captions: Sequence[str], caption_features: Mapping[str, torch.Tensor],
                 num_topics: int, *, seed: int = 0) -> dict[str, int]:
    """image id -> topic in `range(num_topics)`, from the (image id, caption) rows of the training pairs."""
    if num_topics < 2:
        raise ValueError(f"num_topics must be at least 2, got {num_topics}")
    if len(image_ids) != len(captions):
        raise ValueError(f"{len(image_ids)} image ids but {len(captions)} captions: pass the rows of the training pairs")
    sums: dict[str, torch.Tensor] = {}
    for image_id, caption in zip(image_ids, captions):
        feature = torch.nn.functional.normalize(caption_features[caption].float(), dim=-1)
        sums[image_id] = sums[image_id] + feature if image_id in sums else feature
    if len(sums) < num_topics:
        raise ValueError(f"{num_topics} topics for {len(sums)} images: use fewer topics (--topic_batches)")
    ids = list(sums)
    points = torch.nn.functional.normalize(torch.stack([sums[i] for i in ids]), dim=-1).double().numpy()
    labels = KMeans(n_clusters=num_topics, n_init=4, random_state=seed).fit_predict(points)
    return dict(zip(ids, (int(label) for label in np.asarray(labels))))
