"""What a run under several processes does with its last short step, its caches and a failed checkpoint write
(issue 30's cases for several processes; doc/RELIABILITY.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset

from data_scripts import ContrastiveCollator
from dualencoder.training.checkpoints import damage, list_checkpoints
from dualencoder.training.data import make_train_loader
from tests.tiny import save_tiny_model_dir

PROCESSES = 2
REPO = Path(__file__).resolve().parents[1]


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


def launch(args: list, env: dict, port: int, logs: Path) -> list:
    """The processes of one run, started as a launcher would (one per rank), each with its exit code and its stderr
    in `logs/stderr-<rank>.txt` (a file: a full pipe would block a process)."""
    return [subprocess.Popen([sys.executable, str(REPO / "tests" / "several_processes_driver.py"), *args], cwd=REPO,
                             env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(PROCESSES),
                                      LOCAL_WORLD_SIZE=str(PROCESSES), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                             stdout=subprocess.DEVNULL, stderr=open(logs / f"stderr-{rank}.txt", "w"))
            for rank in range(PROCESSES)]


def ended(processes: list, logs: Path, deadline_s: float, after_first_s: float) -> list:
    """(exit code, stderr) of each process; None as the code of one still running `after_first_s` after the first
    ended (or at the deadline), which is then stopped."""
    start, first = time.monotonic(), None
    while any(p.poll() is None for p in processes):
        now = time.monotonic()
        first = first or (now if any(p.poll() is not None for p in processes) else None)
        if now - start > deadline_s or (first and now - first > after_first_s):
            break
        time.sleep(0.2)
    codes = [p.poll() for p in processes]
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
    return [(code, (logs / f"stderr-{rank}.txt").read_text()) for rank, code in enumerate(codes)]


@pytest.fixture(scope="module")
def run_failing_its_second_checkpoint(tmp_path_factory):
    """2 gloo processes, frozen vision tower with a disk cache, a checkpoint each step; process 0's second
    checkpoint write fails as a full disk does."""
    from tests.test_distributed import _free_port
    from tests.test_training import tiny_run_args

    tmp = tmp_path_factory.mktemp("several")
    report, out = tmp / "report", tmp / "out"
    report.mkdir()
    args = tiny_run_args(save_tiny_model_dir(tmp / "model"), out, "--vision_train", "frozen", "--feature_cache_dir",
                         str(tmp / "cache"), "--checkpointing_steps", "1", "--num_train_epochs", "1")
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               REPORT_DIR=str(report), FAIL_SAVE_AT="2")
    results = ended(launch(args, env, _free_port(), report), report, deadline_s=400, after_first_s=30)
    return SimpleNamespace(results=results, out=out, report=report)


def test_a_disk_cache_is_computed_by_the_main_process_only_and_every_process_gets_the_same(
        run_failing_its_second_checkpoint):
    report = run_failing_its_second_checkpoint.report
    computed = [(report / f"computed-{rank}.txt") for rank in range(PROCESSES)]
    held = [(report / f"features-{rank}.txt").read_text().splitlines() for rank in range(PROCESSES)]
    assert computed[0].read_text().splitlines() == [line.split()[0] for line in held[0]]  # e.g. ["vision-<key>.pt"]
    assert not computed[1].exists()  # process 1 read what process 0 wrote
    assert held[0] == held[1]  # file by file, the same tensors (hashes)


def test_a_checkpoint_write_failing_on_one_process_ends_every_process_with_its_line(
        run_failing_its_second_checkpoint):
    """The process whose write fails and the others all exit promptly (not waiting at the next barrier until the
    launcher stops them), non-zero, with the same one line; the checkpoint before is intact."""
    run = run_failing_its_second_checkpoint
    folder = run.out / "checkpoints"
    for code, stderr in run.results:
        assert code not in (None, 0), stderr[-2000:]  # None: still running 30 s after the first had exited
        # (process 0's progress bar, closed at exit, may share the line)
        assert stderr.count(f"error: writing {folder / 'checkpoint-2'} failed (No space left on device)") == 1
        assert "Traceback" not in stderr
    assert [os.path.basename(path) for path in list_checkpoints(str(run.out))] == ["checkpoint-1"]
    assert damage(str(folder / "checkpoint-1")) is None and not (folder / "checkpoint-2.tmp").exists()
