"""Specification of the checkpoint layout: lean checkpoints apart from the export, damaged ones named and passed over.

One tiny run with frozen towers (checkpoints every 2 steps, all kept) serves every test here; a test that changes
its files works on a copy.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import run_contrastive
from dualencoder.training import preflight
from dualencoder.training.arguments import parse_args
from dualencoder.training.checkpoints import (list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint,
                                              write_atomically)
from dualencoder.training.model_setup import build_model
from dualencoder.training.preflight import bytes_needed
from modeling_dualencoder import DualEncoderModel
from tests.test_training import REPO, tiny_run_args
from tests.tiny import save_tiny_model_dir

FROZEN = ("--vision_train", "frozen", "--text_train", "frozen", "--num_train_epochs", "1", "--checkpointing_steps", "2",
          "--save_total_limit", "20", "--eval_before_training", "false")
# what a Hub repository of a run holds: the model, its processor, modeling files, card and the run's records
EXPORT = {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
          "backbones_dualencoder.py", "configuration_dualencoder.py", "modeling_dualencoder.py", "README.md",
          "metrics.json", "training_args.json", "log_history.json"}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    model_dir = save_tiny_model_dir(root / "model")
    out = root / "out"
    return out, model_dir, run_contrastive.main(tiny_run_args(model_dir, out, *FROZEN))


def copy_run(frozen_run, tmp_path) -> Path:
    out, _, _ = frozen_run
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "out"


def test_output_dir_holds_the_export_and_the_checkpoints_live_apart_in_checkpoints(frozen_run):
    out, _, metrics = frozen_run
    assert set(os.listdir(out)) == EXPORT | {"checkpoints"}
    steps = metrics["global_step"]
    names = set(os.listdir(out / "checkpoints"))
    assert names == {f"best-{steps}"} | {f"checkpoint-{step}" for step in [*range(2, steps, 2), steps]}


def test_a_checkpoint_holds_only_the_trained_weights_when_the_backbones_are_frozen(frozen_run):
    out, _, _ = frozen_run
    last = Path(list_checkpoints(str(out))[-1])
    model = DualEncoderModel.from_pretrained(out)
    with safe_open(last / "model.safetensors", framework="pt") as handle:
        saved = set(handle.keys())
    assert not any(key.startswith("text_model.") and "embeddings" in key for key in saved)  # frozen: left out
    assert {"visual_projection.net.0.weight", "text_projection.net.0.weight"} <= saved
    checkpoint_bytes = sum(path.stat().st_size for path in last.iterdir())
    model_bytes = (out / "model.safetensors").stat().st_size
    assert checkpoint_bytes < 0.25 * model_bytes, (checkpoint_bytes, model_bytes)
    assert len(saved) < 0.5 * len(model.state_dict())


def damage(checkpoint: Path, name: str, how: str) -> None:
    file = checkpoint / name
    if how == "deleted":
        file.unlink()
    else:  # a write cut short: a full disk, a kill, a copy that stopped
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGES = [("model.safetensors", "deleted"), ("model.safetensors", "truncated"), ("optimizer.bin", "truncated"),
           ("scheduler.bin", "truncated"), ("trainer_state.json", "truncated"), ("random_states_0.pkl", "truncated")]


@pytest.mark.parametrize("name, how", DAMAGES, ids=[f"{name}-{how}" for name, how in DAMAGES])
def test_a_damaged_checkpoint_is_named_with_its_file_and_latest_takes_the_previous_intact_one(frozen_run, tmp_path,
                                                                                           caplog, name, how):
    out = copy_run(frozen_run, tmp_path)
    *_, previous, last = map(Path, list_checkpoints(str(out)))
    damage(last, name, how)
    caplog.set_level("WARNING")
    assert resolve_resume(str(out), "latest") == str(previous)
    assert f"{last}: {name}" in caplog.text and f"previous intact checkpoint, {previous}" in caplog.text
    with pytest.raises(SystemExit) as refused:
        resolve_resume(str(out), str(last))
    message = str(refused.value)
    assert f"checkpoint {last} is damaged ({last / name}" in message
    assert f"--resume_from_checkpoint {previous}" in message and "\n" not in message


def test_a_damaged_last_checkpoint_resumes_from_the_previous_one_to_the_uninterrupted_result(frozen_run, tmp_path):
    """The lean checkpoint (frozen towers left out, rebuilt from the options) continues the run exactly."""
    out = copy_run(frozen_run, tmp_path)
    for name in os.listdir(out):
        if name != "checkpoints":  # the export is written again by the resumed run
            (out / name).unlink()
    damage(Path(list_checkpoints(str(out))[-1]), "optimizer.bin", "truncated")
    reference_dir, model_dir, reference = frozen_run
    resumed = run_contrastive.main(tiny_run_args(model_dir, out, *FROZEN, "--resume_from_checkpoint", "latest"))
    assert resumed["resumed_from"] == list_checkpoints(str(out))[-2]
    assert resumed["global_step"] == reference["global_step"]
    assert resumed["test"] == pytest.approx(reference["test"])
    expected, got = load_file(reference_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


def test_checkpoints_of_the_old_layout_are_refused_with_the_command_that_moves_them(frozen_run, tmp_path):
    out = copy_run(frozen_run, tmp_path)
    for path in (out / "checkpoints").iterdir():  # output_dir/checkpoint-<step> and output_dir/best, as runs wrote them
        path.rename(out / ("best" if path.name.startswith("best") else path.name))
    (out / "checkpoints").rmdir()
    for resume in ("latest", str(out / "checkpoint-2")):
        with pytest.raises(SystemExit) as refused:
            resolve_resume(str(out), resume)
        message = str(refused.value)
        assert "old layout" in message and f"mkdir -p checkpoints && mv checkpoint-" in message and " best " in message


def test_the_disk_space_estimate_covers_what_a_checkpoint_holds_without_asking_for_much_more(frozen_run):
    out, model_dir, _ = frozen_run
    model_args, _, _ = parse_args(tiny_run_args(model_dir, out, *FROZEN))
    need = bytes_needed(build_model(model_args), checkpoints_kept=2)
    largest = max(sum(file.stat().st_size for file in Path(path).iterdir()) for path in list_checkpoints(str(out)))
    assert largest <= need["checkpoint"] <= 3 * largest
    assert need["model"] >= sum(file.stat().st_size for file in out.iterdir() if file.is_file())  # the export
    assert need["total"] == 3 * need["checkpoint"] + 3 * need["model"]


def test_an_output_dir_that_is_a_file_is_one_error_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(run_contrastive, "build_model", lambda *a: pytest.fail("the model was built first"))
    taken = tmp_path / "out"
    taken.write_text("not a folder")
    with pytest.raises(SystemExit) as refused:
        run_contrastive.main(tiny_run_args(str(tmp_path / "no-model"), taken))
    assert str(refused.value) == f"error: --output_dir {taken} is a file, not a folder; pass another --output_dir."


def test_a_disk_too_small_for_the_run_is_one_error_line_naming_the_path_and_the_numbers(frozen_run, tmp_path,
                                                                                      monkeypatch):
    _, model_dir, _ = frozen_run
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    monkeypatch.setattr(run_contrastive, "build_data", lambda *a, **k: pytest.fail("the data was loaded first"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        run_contrastive.main(tiny_run_args(model_dir, out, *FROZEN))
    message = str(refused.value)
    assert message.startswith(f"error: --output_dir {out} has 0.1 MB free, the run needs about ")
    assert "21 checkpoints of" in message and "--save_total_limit" in message and "\n" not in message


# A child process runs run_contrastive.main(argv) and SIGKILLs itself at one point: inside the save of the run's
# last checkpoint (its files written, before the rename that publishes it), or in the export after the last epoch
# (part of the files moved into output_dir). Mid-epoch kills and SIGINT/SIGTERM: tests/test_training.py.
_KILL_AT = """
import json, os, signal, sys
from dualencoder.training import checkpoints, export
argv, where, last_step = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
swap_in, move_into = checkpoints._swap_in, export.move_into
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def swap_in_or_die(tmp_dir, final_dir):
    if where == "last-checkpoint-save" and final_dir.endswith(f"checkpoint-{last_step}"):
        die()
    swap_in(tmp_dir, final_dir)
def move_into_or_die(staging, out, last):
    first = sorted(os.listdir(staging))[0]
    os.replace(os.path.join(staging, first), os.path.join(out, first))  # one file in, the rest not
    die()
checkpoints._swap_in = swap_in_or_die
if where == "export":
    export.move_into = move_into_or_die
import run_contrastive
run_contrastive.main(argv)
"""
KILLED = ("--vision_train", "frozen", "--save_total_limit", "20")  # 2 epochs; lean checkpoints resumed


@pytest.fixture(scope="module")
def uninterrupted(frozen_run, tmp_path_factory):
    _, model_dir, _ = frozen_run
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    return out, run_contrastive.main(tiny_run_args(model_dir, out, *KILLED))


@pytest.mark.parametrize("where", ["last-checkpoint-save", "export"])
def test_a_run_killed_in_its_last_checkpoint_save_or_its_export_resumes_to_the_uninterrupted_result(
        frozen_run, uninterrupted, tmp_path, where):
    _, model_dir, _ = frozen_run
    reference_dir, reference = uninterrupted
    out = tmp_path / "out"
    argv = tiny_run_args(model_dir, out, *KILLED)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = subprocess.run([sys.executable, "-c", _KILL_AT, json.dumps(argv), where, str(reference["global_step"])],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "metrics.json").exists()  # no export that looks complete
    resumed = run_contrastive.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed.keys() == reference.keys()
    for key in resumed.keys() - {"train_seconds", "cache_seconds", "resumed_from"}:
        assert resumed[key] == pytest.approx(reference[key]), key
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_epoch"] == reference["best_epoch"] and saved["test"] == pytest.approx(reference["test"])
    best_models = sorted(path.name for path in (reference_dir / "checkpoints").glob("best-*"))
    assert sorted(path.name for path in (out / "checkpoints").glob("best-*")) == best_models
    for name in [f"checkpoints/{best}/model.safetensors" for best in best_models] + ["model.safetensors"]:
        expected, got = load_file(reference_dir / name), load_file(out / name)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_the_earlier_checkpoints_as_they_were(tmp_path):
    def save_state(path):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state)
    earlier = tmp_path / "checkpoints" / "checkpoint-2"
    earlier.mkdir(parents=True)
    (earlier / "trainer_state.json").write_text("{}")
    with pytest.raises(SystemExit) as refused:
        save_checkpoint(accelerator, str(tmp_path), 4, {"global_step": 4}, keep=2)
    message = str(refused.value)
    assert message.startswith(f"error: writing {tmp_path / 'checkpoints' / 'checkpoint-4'} failed (No space left on "
                              "device); the checkpoints already in") and "--resume_from_checkpoint latest" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-2"]  # no half-written one left behind


def test_every_file_is_flushed_to_the_disk_before_the_rename_that_publishes_the_folder(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    write_atomically(str(tmp_path / "best"), lambda d: [(Path(d) / n).write_text(n) for n in ("a", "b", "c")])
    assert events[:4] == ["fsync", "fsync", "fsync", "rename"] and (tmp_path / "best" / "c").read_text() == "c"


def test_a_checkpoint_without_this_process_random_state_resumes_with_a_warning_naming_the_file(frozen_run, tmp_path,
                                                                                              caplog):
    out = copy_run(frozen_run, tmp_path)
    last = Path(list_checkpoints(str(out))[-1])
    (last / "random_states_0.pkl").unlink()
    loaded = []
    accelerator = SimpleNamespace(process_index=0, load_state=lambda path, **kwargs: loaded.append(path))
    caplog.set_level("WARNING")
    state = load_checkpoint(accelerator, str(last))
    assert loaded == [str(last)] and state["global_step"] > 0
    assert f"{last / 'random_states_0.pkl'} is missing: the resumed run will not repeat" in caplog.text
