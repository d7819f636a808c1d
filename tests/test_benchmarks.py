"""Smoke tests of the benchmark scripts: each runs end to end at toy size on CPU and writes the JSON
its README table is made from. No timing assertions: only keys, counts and positive numbers."""

import json

import pytest
import torch

from benchmarks import attention_kernels, common, data_loading, eval_speed, throughput, vision_chunks


@pytest.fixture(autouse=True)
def isolated_state():
    """One CPU thread (tiny ops stall on busy machines with more), and accelerate's state reset after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    common.reset_accelerate_state()


TINY = ["--size", "tiny", "--image_size", "32", "--seq_len", "8", "--batch_size", "4", "--steps", "1", "--warmup", "1",
        "--in_process"]


def _check_row(row):
    assert "error" not in row, row.get("error")
    for key in ("samples_per_s", "step_time_median_s", "flops_per_step", "flops_per_sample", "achieved_tflops",
                "host_rss_peak_mib", "params_total", "params_trainable"):
        assert row[key] > 0, key
    if torch.cuda.is_available():  # the benchmarks pick the GPU when there is one
        assert row["mfu"] is not None and row["gpu_peak_mib"] > 0  # tiny rows round to MFU 0.0
    else:
        assert row["mfu"] is None and row["gpu_peak_mib"] is None  # CPU: FLOP/s only, no MFU
    assert len(row["step_times_s"]) == row["steps"]


def test_throughput_modes(tmp_path):
    out = tmp_path / "throughput.json"
    result = throughput.main(TINY + ["--pair", "vit-distilbert", "--mode", "all", "--precision", "fp32", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("date", "device", "device_name", "torch", "command", "rows", "ratios", "peak_flops_used"):
        assert key in result
    rows = {row["mode"]: row for row in result["rows"]}
    assert set(rows) == set(throughput.MODES)
    for row in rows.values():
        _check_row(row)
    full, lora, cache = rows["full"], rows["lora"], rows["frozen-vision-cache"]
    assert lora["params_trainable"] < full["params_trainable"]
    assert cache["flops_per_sample"] < full["flops_per_sample"]  # no vision tower in the step


def test_throughput_baseline_ratio(tmp_path):
    out = tmp_path / "baseline.json"
    result = throughput.main(TINY + ["--pair", "vit-bert", "--mode", "full", "--precision", "bf16", "--baseline",
                                     "--out", str(out)])
    impls = [row["impl"] for row in result["rows"]]
    assert impls == ["ours", "hf-trainer"]
    for row in result["rows"]:
        _check_row(row)
    assert result["rows"][1]["trainer_reported_samples_per_s"] > 0
    (ratio,) = result["ratios"]
    assert ratio["precision"] == "bf16" and ratio["ratio"] > 0


def test_throughput_plan_adds_our_matching_rows():
    args = throughput.parse_args(["--pair", "offline", "--mode", "lora", "--precision", "all", "--baseline"])
    specs = throughput.plan(args)
    assert [(s["impl"], s["pair"], s["mode"], s["precision"]) for s in specs] == [
        ("ours", "offline", "lora", "fp32"), ("ours", "offline", "lora", "bf16"),
        ("ours", "vit-bert", "full", "fp32"), ("hf-trainer", "vit-bert", "full", "fp32"),
        ("ours", "vit-bert", "full", "bf16"), ("hf-trainer", "vit-bert", "full", "bf16")]
    with pytest.raises(SystemExit):
        common.parse_choices("fp16", throughput.PRECISIONS)


def test_data_loading(tmp_path):
    out = tmp_path / "data.json"
    result = data_loading.main(["--data", "synthetic", "--num_images", "8", "--batch_size", "4", "--workers", "0,1",
                                "--image_size", "32", "--synthetic_image_size", "32", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [row["workers"] for row in result["rows"]] == [0, 1]
    for row in result["rows"]:
        assert row["images"] == 8 and row["batches"] == 2
        assert row["images_per_s"] > 0 and row["steady_images_per_s"] > 0 and row["seconds"] > 0


def test_data_loading_times_decoding_the_files_and_reading_the_pixel_store(tmp_path):
    from tests.test_data_flickr8k import make_official

    root = make_official(tmp_path / "flickr")
    result = data_loading.main(["--data", str(root), "--num_images", "8", "--batch_size", "4", "--workers", "0",
                                "--image_size", "16", "--pixel_store", "0,32", "--store_dir", str(tmp_path / "store"),
                                "--out", str(tmp_path / "data.json")])
    assert [(row["pixel_store"], row["workers"]) for row in result["rows"]] == [(0, 0), (32, 0)]
    assert all(row["images"] == 8 and row["images_per_s"] > 0 for row in result["rows"])
    assert list(result["pixel_store_build_seconds"]) == [32] and len(list((tmp_path / "store").glob("*.arrow"))) == 1


def test_eval_speed_can_read_the_images_from_a_pixel_store_built_first(tmp_path):
    from tests.test_data_flickr8k import make_official

    root = make_official(tmp_path / "flickr")
    args = ["--data", str(root), "--model", "tiny", "--batch_size", "4", "--index_images", "0", "--dim", "16"]
    plain = eval_speed.main([*args, "--out", str(tmp_path / "plain.json")])["flickr"]
    stored = eval_speed.main([*args, "--pixel_store_size", "64", "--out", str(tmp_path / "stored.json")])["flickr"]
    assert stored["seconds"]["pixel store build"] > 0 and "pixel store build" not in plain["seconds"]
    assert stored["rsum"] == plain["rsum"]  # images smaller than 64 px are stored as decoded


def test_eval_speed(tmp_path):
    out = tmp_path / "eval.json"
    result = eval_speed.main(["--data", "synthetic", "--model", "tiny", "--max_images", "6", "--batch_size", "4",
                              "--index_images", "300", "--captions_per_image", "2", "--dim", "16", "--chunk_size", "64",
                              "--out", str(out)])
    assert json.loads(out.read_text()) == result
    flickr, index = result["flickr"], result["index"]
    assert flickr["images"] == 6 and flickr["captions"] == 30
    for stage in ("load", "build model", "embed", "rank", *eval_speed.TIMED_METHODS):
        assert flickr["seconds"][stage] > 0, stage
    towers_and_heads = sum(flickr["seconds"][method] for method in eval_speed.TIMED_METHODS)
    assert towers_and_heads < flickr["seconds"]["embed"]  # each is timed once, inside the embedding
    assert index["images"] == 300 and index["captions"] == 600
    assert index["seconds"]["generate"] > 0 and index["seconds"]["rank"] > 0


def test_throughput_channels_last_row_runs_the_conv_tower(tmp_path):
    result = throughput.main(["--pair", "offline", "--mode", "full", "--precision", "fp32", "--channels_last", "all",
                              "--image_size", "32", "--seq_len", "8", "--batch_size", "2", "--steps", "1",
                              "--warmup", "1", "--in_process", "--profile", "--out", str(tmp_path / "cl.json")])
    assert [row["channels_last"] for row in result["rows"]] == ["off", "on"]
    for row in result["rows"]:
        _check_row(row)
    assert result["rows"][0]["flops_per_sample"] == result["rows"][1]["flops_per_sample"]  # same work, other layout
    assert "Self CPU" in result["rows"][0]["profile"]  # --profile: the top kernels of 3 more steps


def test_step_clock_keeps_only_the_steps_asked_for():
    clock = common.StepClock(torch.device("cpu"))
    for keep in (False, True, True):
        clock.start()
        clock.stop(keep=keep)
    seconds = clock.seconds()
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)
    assert clock.wall_seconds() >= sum(seconds)


def test_train_check_resplits_a_test_only_copy_and_trains_a_random_model_end_to_end(tmp_path):
    from benchmarks import train_check
    from tests.test_data_flickr8k import make_official

    source = make_official(tmp_path / "subset", n=24, splits=(0, 0, 24))  # like make_flickr_subset.sh's copy
    out = tmp_path / "check.json"
    result = train_check.main(["--data", str(source), "--splits", "16,4,4", "--architecture", "tiny",
                               "--workdir", str(tmp_path / "work"), "--out", str(out), "--",
                               "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
                               "--per_device_eval_batch_size", "8", "--image_size", "32", "--logging_steps", "1",
                               "--vision_train", "full", "--text_train", "full"])
    assert json.loads(out.read_text()) == result
    lists = tmp_path / "work" / "flickr8k" / "Flickr8k_text"
    assert [len((lists / f"Flickr_8k.{s}Images.txt").read_text().split()) for s in ("train", "dev", "test")] == [16, 4, 4]
    assert result["global_step"] == 20  # 16 images x 5 captions / 8 per step x 2 epochs
    assert set(result["test"]) >= {"i2t_r1", "t2i_r1", "rsum"}
    assert (tmp_path / "work" / "run" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="24 test images"):
        train_check.resplit_flickr(str(source), [20, 4, 4], str(tmp_path / "other"))


def test_vision_chunks_times_each_chunk_size_against_the_whole_batch(tmp_path):
    out = tmp_path / "chunks.json"
    result = vision_chunks.main(["--model", "tiny", "--batch_size", "4", "--image_size", "32", "--depth", "1",
                                 "--chunks", "2,3", "--warmup", "0", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [row["chunk"] for row in result["rows"]] == [0, 2, 3]  # the whole batch first: the reference
    for row in result["rows"]:
        assert len(row["prefix_s"]) == len(row["suffix_train_s"]) == 2
        assert row["prefix_median_s"] > 0 and row["suffix_train_median_s"] > 0


def test_attention_kernels_times_each_backend_and_records_the_ones_this_device_lacks(tmp_path):
    out = tmp_path / "attention.json"
    result = attention_kernels.main(["--backend", "auto,math,cudnn", "--shape", "distilbert-32", "--batch_size", "2",
                                     "--warmup", "0", "--repeats", "2", "--check", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {row["backend"]: row for row in result["rows"]}
    for name in ("auto", "math"):
        row = rows[name]
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0 and row["forward_backward_tflops"] > 0
        assert row["rel_error"] < 1e-2  # bf16 against a float64 reference
    if not torch.cuda.is_available():
        assert "error" in rows["cudnn"] and "forward_ms" not in rows["cudnn"]  # cuDNN attention needs CUDA


def test_attention_flops_count_the_backward_as_two_and_a_half_forwards():
    forward = attention_kernels.attention_flops(2, 12, 197, 64, backward=False)
    assert forward == 4 * 2 * 12 * 197 * 197 * 64
    assert attention_kernels.attention_flops(2, 12, 197, 64, backward=True) == 3.5 * forward


def test_throughput_rows_carry_the_attention_kernel_and_compile_mode_asked_for(tmp_path):
    args = throughput.parse_args(["--compile", "blocks-autotune-graphs,off", "--attention", "auto,math", "--baseline"])
    specs = throughput.plan(args)
    ours = [(s["compile"], s["attention"]) for s in specs if s["impl"] == "ours" and s["pair"] == "vit-distilbert"]
    assert ours == [("blocks-autotune-graphs", "auto"), ("blocks-autotune-graphs", "math"), ("off", "auto"),
                    ("off", "math")]
    assert [s["attention"] for s in specs if s["impl"] == "hf-trainer"] == ["auto"]  # the Trainer as users run it
    assert throughput.COMPILE_MODES["graphs"] == "reduce-overhead"
    result = throughput.main(TINY + ["--pair", "vit-distilbert", "--attention", "math", "--out", str(tmp_path / "a.json")])
    (row,) = result["rows"]
    _check_row(row)
    assert row["attention"] == "math"


def test_throughput_levers_plan_a_row_without_each_lever_with_it_and_with_all():
    args = throughput.parse_args(["--levers", "fused-triton,step-graph", "--compile", "off,blocks-graphs"])
    rows = [(s["levers"], s["compile"]) for s in throughput.plan(args)]
    assert rows == [("none", "off"), ("fused-triton", "off"), ("step-graph", "off"), ("fused-triton+step-graph", "off"),
                    ("none", "blocks-graphs"), ("fused-triton", "blocks-graphs"),
                    ("step-graph", "blocks"), ("fused-triton+step-graph", "blocks")]  # one graph: the whole step's
    assert throughput.lever_options("fused-triton+fp8") == {"fused_kernels": "triton", "fp8": True}
    # on and on-graphs give the same whole-step-graph row: it is planned (and timed) once
    args = throughput.parse_args(["--levers", "step-graph", "--compile", "on,on-graphs"])
    rows = [(s["levers"], s["compile"]) for s in throughput.plan(args)]
    assert rows == [("none", "on"), ("step-graph", "on"), ("none", "on-graphs")]


def test_throughput_lever_rows_run_on_a_cpu(tmp_path):
    """fp8 (torchao's emulation here) and the whole-step graph (its eager stand-in here); the fused Triton kernels
    run in the interpreter only when TRITON_INTERPRET is set before triton is first imported, which a pytest
    process cannot promise, and take seconds per step there: `bash benchmarks/gpu_session.sh --cpu-smoke levers`
    runs that row (tests/test_fused_kernels.py tests the kernels)."""
    pytest.importorskip("torchao", reason="the fp8 lever needs torchao")
    args = TINY[:-5] + ["--steps", "1", "--warmup", "2", "--in_process"]  # 2: one eager step, then the graphed path
    result = throughput.main(args + ["--pair", "vit-bert", "--precision", "fp32", "--levers", "fp8,step-graph",
                                     "--out", str(tmp_path / "levers.json")])
    rows = {row["levers"]: row for row in result["rows"]}
    assert list(rows) == ["none", "fp8", "step-graph", "fp8+step-graph"]
    for row in rows.values():
        _check_row(row)
    assert rows["none"]["levers_applied"] == rows["step-graph"]["levers_applied"] == {}
    # the tiny towers' layers are 32 and 64 wide, under fp8's 256 (tests/test_fp8.py converts them with a lower bar)
    assert rows["fp8"]["levers_applied"]["fp8"] == {"vision": 0, "text": 0}
    assert rows["fp8"]["flops_per_step"] == rows["none"]["flops_per_step"]  # counted before the levers
