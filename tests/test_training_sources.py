"""Specification of training on your own data from the command line (doc/OWN_DATA.md): webdataset shards and a
load_dataset streaming folder through `--streaming true` (one process and two), a save_to_disk folder and a Hub
repository-layout folder map-style. Each run is a few 16x16 images and a tiny saved model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Image as ImageFeature
from safetensors.torch import load_file

import run_contrastive
from data_scripts.streaming import WebDatasetStream
from dualencoder.training.checkpoints import best_model_dir, checkpoints_dir, list_checkpoints
from tests.test_data_sources import _hub_rows, captions
from tests.test_data_streaming import make_shards, png, sample_members, write_tar
from tests.test_training import REPO, tiny_model_dir, tiny_run_args  # noqa: F401 (a fixture)

BATCH = 4


def streamed_args(model_dir, out, shards, *extra):
    return tiny_run_args(model_dir, out, "--dataset", str(shards), "--streaming", "true",
                         "--per_device_train_batch_size", str(BATCH), *extra)


def validation_shard(folder: Path) -> Path:
    """Four images of one or two captions, in a shard of their own (the stream's format, loaded whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for i in range(4):
        members += [(f"val{i}.png", png(100 + i)),
                    (f"val{i}.json", json.dumps({"captions": captions(i, 1 + i % 2)}).encode())]
    return write_tar(folder / "val.tar", members)


def rows_per_rank(shards: list, world_size: int, seed: int = 42, epoch: int = 0) -> list[int]:
    """How many pair rows each rank's stream holds in an epoch (its shards, as the stream deals them)."""
    return [sum(1 for _ in WebDatasetStream(shards, rank=rank, world_size=world_size, seed=seed, epoch=epoch))
            for rank in range(world_size)]


def test_webdataset_shards_stream_into_training_with_validation_from_a_shard(tiny_model_dir, tmp_path):
    shards = make_shards(tmp_path / "shards")  # 6 shards of 3 images, 1 to 3 captions each
    rows = rows_per_rank(shards, 1)[0]
    out = tmp_path / "out"
    metrics = run_contrastive.main(streamed_args(
        tiny_model_dir, out, tmp_path / "shards", "--max_steps", "100", "--num_train_epochs", "2",
        "--validation_file", str(validation_shard(tmp_path / "eval"))))
    # one pass over the stream per epoch, the last batch of each epoch smaller (one process keeps it)
    assert metrics["global_step"] == 2 * -(-rows // BATCH)
    assert metrics["validation"]["rsum"] > 0 and metrics["best_epoch"] in (1, 2)
    state = json.loads((Path(list_checkpoints(str(out))[-1]) / "trainer_state.json").read_text())
    assert [s["rank"] for s in state["stream"]] == [0]  # the position of each rank's stream is in the checkpoint
    assert (out / "model.safetensors").exists() and os.path.isdir(best_model_dir(str(out), state))


def test_a_streamed_run_resumed_from_a_mid_epoch_checkpoint_trains_to_the_same_weights(tiny_model_dir, tmp_path,
                                                                                      caplog):
    """The checkpoint holds the stream's position (shards done, rows into the current one): the resumed run
    continues there, neither replaying nor skipping rows. A replayed or skipped batch moves weights by ~1e-2."""
    make_shards(tmp_path / "shards")
    extra = ("--max_steps", "12", "--num_train_epochs", "2", "--checkpointing_steps", "2", "--save_total_limit", "20")
    reference = run_contrastive.main(streamed_args(tiny_model_dir, tmp_path / "reference", tmp_path / "shards", *extra))
    assert reference["global_step"] == 12
    for step, epoch in ((4, 0), (10, 1)):  # mid epoch 0 (of 9 batches); in epoch 1, after the stream began again
        state = json.loads((Path(checkpoints_dir(str(tmp_path / "reference"))) / f"checkpoint-{step}" / "trainer_state.json").read_text())
        position = state["stream"][0]
        assert (state["epoch"], position["epoch"]) == (epoch, epoch) and position["positions"]["0"] != [0, 0]

    caplog.set_level("INFO")
    resumed = run_contrastive.main(streamed_args(
        tiny_model_dir, tmp_path / "resumed", tmp_path / "shards", *extra,
        "--resume_from_checkpoint", os.path.join(checkpoints_dir(str(tmp_path / "reference")), "checkpoint-4")))
    assert resumed["global_step"] == 12
    assert "stream resumed at epoch 0" in caplog.text and "read again from its start" in caplog.text
    final_reference = load_file(tmp_path / "reference" / "model.safetensors")
    final_resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in final_reference:
        torch.testing.assert_close(final_resumed[key], final_reference[key], atol=1e-4, rtol=1e-3)


def _parquet_repo(tmp_path: Path) -> Path:
    """A folder in the Hub's repository layout: data/train-*.parquet of images (bytes) with two captions each."""
    ds = Dataset.from_dict(_hub_rows(tmp_path, n=12)).cast_column("image", ImageFeature())
    (tmp_path / "repo" / "data").mkdir(parents=True)
    for part in range(2):
        ds.shard(2, part, contiguous=True).to_parquet(str(tmp_path / "repo" / "data" / f"train-0000{part}-of-00002.parquet"))
    return tmp_path / "repo"


def _save_to_disk(tmp_path: Path) -> Path:
    ds = Dataset.from_dict(_hub_rows(tmp_path, n=12)).cast_column("image", ImageFeature())
    ds.train_test_split(test_size=3, shuffle=False).save_to_disk(tmp_path / "saved")
    return tmp_path / "saved"


@pytest.mark.parametrize("source, options", [
    ("save_to_disk", ()), ("repository layout", ()),
    ("repository layout", ("--streaming", "true", "--max_steps", "5", "--train_file", "data/train-00000-of-00002.parquet",
                           "--validation_file", "data/train-00001-of-00002.parquet")),
], ids=["save_to_disk", "repository-layout", "repository-layout-streamed"])
def test_hub_style_folders_train_end_to_end_from_the_command_line(tiny_model_dir, tmp_path, source, options):
    """save_to_disk and repository-layout folders (what the Hub holds, offline), map-style; the repository folder
    also as a load_dataset(streaming=True) stream, validated on one of its parquet files loaded whole."""
    folder = _save_to_disk(tmp_path) if source == "save_to_disk" else _parquet_repo(tmp_path)
    metrics = run_contrastive.main(tiny_run_args(
        tiny_model_dir, tmp_path / "out", "--dataset", str(folder), "--caption_column", "description",
        "--num_train_epochs", "1", "--eval_before_training", "false", *options))
    # streamed: one epoch is one pass over the stream (6 images x 2 captions, batches of 8), before --max_steps 5
    assert metrics["global_step"] == 2 if options else metrics["global_step"] > 0
    assert metrics["validation"]["rsum"] > 0
    assert ("test" in metrics) != bool(options)  # a streamed run without --test_file has no test split


def test_two_gloo_processes_stream_disjoint_shards_and_end_each_epoch_together(tiny_model_dir, tmp_path):
    """torchrun, 2 CPU processes on shards of unequal length: each rank reads its own shards (not split a second
    time by Accelerate), and an epoch ends for both when the first runs out, so neither waits for the other's
    extra step: the run takes as many steps as the shorter rank has full batches."""
    folder = tmp_path / "shards"
    shards = make_shards(folder, n_shards=4, per_shard=3)
    # and one shard three times as long
    shards.append(str(write_tar(folder / "000009.tar", [m for i in range(9) for m in sample_members(f"009{i:03d}", 90 + i)])))
    per_rank = rows_per_rank(shards, 2)
    assert per_rank[0] // BATCH != per_rank[1] // BATCH  # the ranks hold different numbers of batches
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "run_contrastive.py", *streamed_args(tiny_model_dir, out, folder, "--max_steps", "50",
                                                    "--num_train_epochs", "1")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == min(per_rank) // BATCH  # each rank drops its last, smaller batch
    state = json.loads((Path(list_checkpoints(str(out))[-1]) / "trainer_state.json").read_text())
    assert [(s["rank"], s["world_size"]) for s in state["stream"]] == [(0, 2), (1, 2)]
