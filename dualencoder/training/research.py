"""Research options that act once, before the first step: topic-aware batches and CCA-initialised heads.

Both start from the training captions' pooled features under the text tower as loaded (computed once
for both). A resumed run keeps the topics its batches were drawn from (k-means need not repeat itself:
they are read from the checkpoint), and its heads come from its checkpoint, so neither runs again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Optional

import torch

from data_scripts import to_image_view
from dualencoder.head_init import cca_initialise_heads
from dualencoder.training.topics import image_topics

logger = logging.getLogger(__name__)


def apply_research_options(model, train_pairs, cache, *, topic_batches: int, topic_share: float,
                           cca_options: Optional[dict], seed: int, topics: Optional[dict] = None,
                           resumed: bool = False) -> Optional[dict]:
    """Initialise the heads at the CCA map when asked (`cca_options`, new runs only); return the training images'
    topics (image id -> topic) for `--topic_batches`, `topics` when the resumed checkpoint holds them."""
    need_topics = topic_batches and topics is None
    need_cca = cca_options is not None and not resumed
    if not (need_topics or need_cca):
        return topics
    text_features = cache.pooled_texts(model, list(train_pairs["caption"]))
    if need_topics:
        started = time.time()
        topics = image_topics(list(train_pairs["image_id"]), list(train_pairs["caption"]), text_features,
                              topic_batches, seed=seed)
        sizes = sorted(Counter(topics.values()).values())
        logger.info("topic batches: %d images in %d topics (%d to %d images each; median %d), %.0f%% of each batch "
                    "drawn by topic; k-means %.0f s", len(topics), topic_batches, sizes[0], sizes[-1],
                    sizes[len(sizes) // 2], 100 * topic_share, time.time() - started)
    if need_cca:  # every training (image, caption) pair's pooled features
        started = time.time()
        image_features = cache.pooled_images(model, to_image_view(train_pairs))
        images = torch.stack([image_features[i] for i in train_pairs["image_id"]]).float()
        texts = torch.stack([text_features[c] for c in train_pairs["caption"]]).float()
        fitted = cca_initialise_heads(model, images, texts, cca_options)
        logger.info("head_init cca: %s; %.0f s", ", ".join(f"{k} {v}" for k, v in fitted.items()),
                    time.time() - started)
    return topics
