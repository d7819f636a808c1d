"""What a run under several processes does with its last short step, its caches and a failed checkpoint write
(issue 30's cases for several processes; doc/RELIABILITY.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset

from data_scripts import ContrastiveCollator
from dualencoder.training.data import make_train_loader

PROCESSES = 2


def pairs_of(images: int, captions: int) -> Dataset:
    """`images` images with `captions` rows each; a row's `row` is its index, so a batch names the pairs it holds."""
    image_ids = [f"img{i}" for i in range(images) for _ in range(captions)]
    return Dataset.from_dict({"image_id": image_ids, "caption": ["a caption"] * len(image_ids),
                              "row": list(range(len(image_ids)))})


def rows_without_images(batch: dict) -> dict:
    """The row index as the (cached) text feature, so every collated batch says which pairs it holds."""
    return {"image_id": batch["image_id"], "text_pooled": [[float(row)] for row in batch["row"]]}


def steps_on_each_process(pairs: Dataset, sampler: str, batch_size: int):
    """Each optimiser step's batches, one per process, as `accelerator.prepare` shards run_contrastive's loader
    (Accelerate's defaults: `even_batches`, no `split_batches`), for process 0 and 1 driven in this one."""
    options = SimpleNamespace(captions_per_image=0, batch_by_image=sampler == "batch_by_image",
                              unique_image_batches=sampler == "unique_image_batches", topic_share=0.5,
                              dataloader_num_workers=0)
    per_process = []
    for rank in range(PROCESSES):
        loader = make_train_loader(pairs, rows_without_images, ContrastiveCollator(None), options, batch_size,
                                   seed=0, epoch=0)
        prepared = prepare_data_loader(loader, num_processes=PROCESSES, process_index=rank, put_on_device=False,
                                       even_batches=True, rng_types=None)
        per_process.append(list(prepared))
    assert len({len(batches) for batches in per_process}) == 1  # every process takes the same number of steps
    return list(zip(*per_process))


CASES = {  # (sampler, images, captions per image, batch size): rows never a multiple of batch size x processes
    "random batches": ("seeded", 7, 3, 4),  # 21 rows: 6 batches, the last of 1
    "random batches, one step": ("seeded", 2, 3, 4),  # 6 rows: a padded copy meets its original in one step
    "unique images": ("unique_image_batches", 5, 3, 4),
    "whole images": ("batch_by_image", 5, 3, 2),  # batch size counts images: 3 batches for 2 processes
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_short_last_step_is_padded_with_the_first_pairs_and_a_copy_is_a_positive_of_its_original(case):
    """Accelerate's `even_batches` fills a short last step with the epoch's first pairs (measured: none dropped,
    some seen twice). A copy can share the step with its original, on another process; the loss then matches
    them by image id across processes (gathered ids are concatenated), so the collator's ids must name an image
    the same way on every process, or the copy would be a negative of itself."""
    sampler, images, captions, batch_size = CASES[case]
    pairs = pairs_of(images, captions)
    image_of = pairs["image_id"]
    seen, copies_beside_their_original = [], 0
    for step in steps_on_each_process(pairs, sampler, batch_size):
        rows = [int(row) for batch in step for row in batch["text_pooled"][:, 0]]
        ids = torch.cat([batch["image_ids"] for batch in step])  # what gather_features hands the loss
        same_image = torch.tensor([[image_of[a] == image_of[b] for b in rows] for a in rows])
        assert torch.equal(ids[:, None] == ids[None, :], same_image), f"step {len(seen)}: rows {rows}"
        seen.extend(rows)
        copies_beside_their_original += len(rows) - len(set(rows))
    assert sorted(set(seen)) == list(range(len(pairs)))  # every pair at least once: nothing dropped
    assert len(seen) > len(pairs)  # the padding repeats pairs (the count is a multiple of the processes' batches)
    if case == "random batches, one step":  # the padded pairs are those of this same step, on the other process
        assert copies_beside_their_original > 0
