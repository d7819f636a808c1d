"""The peer rows of the throughput benchmark (open_clip's own loop), its memory savers, and the end-to-end
run_clip.py-way harness, at toy size on CPU. No timing assertions: rows, counts and what must hold whatever
the speed (the same shapes give the same FLOPs; recomputation adds FLOPs; both ways take the same steps)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import run_clip_way, throughput
from tests.test_benchmarks import TINY, _check_row, isolated_state  # noqa: F401  (autouse: one thread, fresh accelerate)
from tests.test_data_flickr8k import make_official


def test_open_clip_row_beside_ours(tmp_path):
    pytest.importorskip("open_clip")
    out = tmp_path / "peers.json"
    result = throughput.main(TINY + ["--pair", "vit-bert", "--precision", "bf16", "--open_clip", "--out", str(out)])
    assert json.loads(out.read_text()) == result and "partial" not in result
    ours, theirs = result["rows"]
    assert (ours["impl"], theirs["impl"]) == ("ours", "open-clip")
    for row in (ours, theirs):
        _check_row(row)
    # the same towers: a ViT of one shape and a 6-layer BERT; only the heads and the loss's glue differ
    assert abs(theirs["flops_per_sample"] - ours["flops_per_sample"]) < 0.01 * ours["flops_per_sample"]
    (ratio,) = result["ratios"]
    assert ratio["peer"] == "open-clip" and ratio["ratio"] > 0


def test_open_clip_model_is_the_vit_bert_shape():
    pytest.importorskip("open_clip")
    from benchmarks.peers import build_open_clip

    spec = dict(size="tiny", image_size=32, seq_len=8)
    model, vocab_size = build_open_clip(spec)
    trunk = model.visual.trunk
    vit = throughput.vit_config("tiny", 32)
    assert (len(trunk.blocks), trunk.embed_dim, trunk.patch_embed.patch_size[0]) == (
        vit.num_hidden_layers, vit.hidden_size, vit.patch_size)
    bert = throughput.bert_like(throughput.distilbert_config("tiny"))
    assert model.text.transformer.config.num_hidden_layers == bert.num_hidden_layers
    assert vocab_size == bert.vocab_size
    out = model(torch.randn(2, 3, 32, 32), torch.randint(1, vocab_size, (2, 8)))
    assert out["image_features"].shape == out["text_features"].shape == (2, 512)


def test_plan_open_clip_compiles_whole_or_not():
    args = throughput.parse_args(["--pair", "vit-bert", "--compile", "off,blocks-graphs", "--open_clip", "--baseline"])
    assert [(s["impl"], s["compile"]) for s in throughput.plan(args)] == [
        ("ours", "off"), ("ours", "blocks-graphs"), ("hf-trainer", "off"), ("open-clip", "off"), ("open-clip", "on")]


def test_memory_saver_rows(tmp_path):
    result = throughput.main(TINY + ["--pair", "vit-distilbert", "--precision", "fp32", "--gradient_checkpointing",
                                     "off,on", "--grad_cache_chunk", "0,2", "--out", str(tmp_path / "memory.json")])
    rows = {(r["gradient_checkpointing"], r["grad_cache_chunk"]): r for r in result["rows"]}
    assert set(rows) == {("off", 0), ("off", 2), ("on", 0), ("on", 2)}
    for row in rows.values():
        _check_row(row)
        assert ("gpu_peak_mib_per_sample" in row) and (row["gpu_peak_mib_per_sample"] is None) != torch.cuda.is_available()
    plain = rows[("off", 0)]["flops_per_sample"]
    assert rows[("on", 0)]["flops_per_sample"] > plain  # the towers' layers run again in the backward
    assert rows[("off", 2)]["flops_per_sample"] > plain  # GradCache embeds every chunk twice
    assert result["ratios"] == []  # no peer rows; savers never enter a ratio


def test_run_clip_way_against_run_contrastive(tmp_path):
    flickr = make_official(tmp_path / "flickr", n=12, splits=(0, 0, 12))
    out = tmp_path / "e2e.json"
    result = run_clip_way.main(["--data", str(flickr), "--splits", "6,3,3", "--tiny",
                                "--batch_size", "4", "--precision", "fp32", "--max_steps", "2", "--target_rsum", "0",
                                "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == result and result["architecture"] == "vit-bert-tiny"
    ways = {way["way"]: way for way in result["ways"]}
    assert set(ways) == {"run_clip", "run_contrastive"}
    for way in ways.values():
        assert "error" not in way, way.get("error")
        assert way["global_step"] == 2 and way["wall_seconds"] > 0
        (epoch,) = way["epochs"]
        assert epoch["train_seconds"] > 0 and 0 <= epoch["validation"]["rsum"] <= 600
    assert ways["run_clip"]["train_pairs"] == 30  # six images, five captions each: one row per pair
    assert ways["run_clip"]["epochs"][0]["eval_loss"] > 0
    assert result["seconds_to_target"] == {name: way["epochs"][0]["train_seconds"] for name, way in ways.items()}


def test_run_clip_way_reads_pairs_and_pads_like_run_clip(tmp_path):
    flickr = make_official(tmp_path / "flickr", n=4, splits=(2, 1, 1))
    pairs = run_clip_way.flickr_pairs(str(flickr), "train")
    assert len(pairs) == 10 and all(Path(path).exists() for path, _ in pairs)
    transform = torch.jit.script(run_clip_way.Transform(16, [0.5] * 3, [0.5] * 3))
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    pixels = transform(image)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
    batch = run_clip_way.collate_fn([{"pixel_values": pixels, "input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}] * 2)
    assert batch["input_ids"].shape == (2, 3) and batch["return_loss"] is True


def test_gpu_session_script_parses():
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_session.sh"], check=False).returncode == 0
