"""Specification of publishing to the Hub: every pre-check fails before training with one line, and the upload is
the export folder as saved, without checkpoints. The Hub API is replaced at its boundary (HfApi's methods)."""

import json
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects

import run_contrastive
from dualencoder.training.publish import HUB_IGNORE_PATTERNS, main as push_main
from modeling_dualencoder import DualEncoderModel
from tests.tiny import save_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


class FakeHub:
    """Stands in for the Hub behind HfApi: records each call; `errors` names the call that raises what."""

    def __init__(self, user="me", role="write", **errors):
        self.user, self.role, self.errors, self.calls = user, role, errors, []

    def install(self, patch):
        for name in ("whoami", "create_repo", "upload_folder"):
            patch.setattr(HfApi, name, self._method(name))
        return self

    def _method(self, name):
        def call(api, *args, **kwargs):
            self.calls.append((name, api.token, args, kwargs))
            if name in self.errors:
                raise self.errors[name]
            if name == "whoami":
                return {"name": self.user, "auth": {"accessToken": {"role": self.role}}}
            if name == "upload_folder":
                return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")
            return SimpleNamespace(repo_id=args[0])
        return call

    def called(self, name):
        return [(token, args, kwargs) for call, token, args, kwargs in self.calls if call == name]


def http_error(status: int) -> HfHubHTTPError:
    return HfHubHTTPError(f"{status} Client Error", response=SimpleNamespace(status_code=status, headers={},
                                                                               request=None))


def run_args(model_dir, out, *extra):
    return ["--config", str(REPO / "configs" / "tiny_test.yaml"), "--model_name_or_path", model_dir,
            "--output_dir", str(out), "--num_images", "20", "--feature_cache_dir", "", *extra]


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory):
    """A tiny saved model whose text tower has LoRA (rank 2), so the export has an adapters-only copy."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("lora_model"), lora_rank=2, lora_towers=["text"],
                               vision_model_name_or_path="timm:test_efficientnet")


@pytest.fixture(scope="module")
def published_run(lora_model_dir, tmp_path_factory):
    """A tiny training run with --push_to_hub against a fake Hub: (output_dir, metrics, hub)."""
    out = tmp_path_factory.mktemp("published") / "out"
    with pytest.MonkeyPatch.context() as patch:
        hub = FakeHub().install(patch)
        metrics = run_contrastive.main(run_args(
            lora_model_dir, out, "--vision_train", "frozen", "--text_train", "frozen", "--lora_learning_rate", "1e-2",
            "--push_to_hub", "true", "--hub_model_id", "shapes-clip", "--hub_token", "hf_secret_token",
            "--hub_private_repo", "true", "--checkpointing_steps", "1"))
    return out, metrics, hub


def uploaded_files(folder, ignore_patterns) -> list[str]:
    """What upload_folder sends of `folder` with these patterns (huggingface_hub's own filter)."""
    every = sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*") if path.is_file())
    return list(filter_repo_objects(every, ignore_patterns=ignore_patterns))


@pytest.mark.parametrize("hub_errors, says", [
    ({"whoami": LocalTokenNotFoundError("Token is required")}, "no Hugging Face token found: set HF_TOKEN, run `hf "
                                                               "auth login`, or pass one (--hub_token"),
    ({"whoami": http_error(401)}, "the Hub refused the token (401 Unauthorized)"),
    ({"whoami": requests.exceptions.ConnectionError("Failed to resolve 'huggingface.co'")},
     "cannot reach the Hub (ConnectionError: Failed to resolve 'huggingface.co'): check the network connection"),
    ({"whoami": TimeoutError("timed out")}, "cannot reach the Hub (TimeoutError: timed out)"),
    ({"whoami": OfflineModeIsEnabled("offline")}, "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it"),
    ({"create_repo": http_error(403)}, "creating or finding the repository other/shapes-clip as me (is the "
                                      "namespace yours?) failed (403"),
], ids=["no-token", "bad-token", "no-network", "timeout", "hub-offline", "not-your-namespace"])
def test_a_failing_hub_check_stops_the_run_before_training_with_one_line(tmp_path, monkeypatch, hub_errors, says):
    hub = FakeHub(**hub_errors).install(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run_contrastive.main(run_args("unused", tmp_path / "out", "--push_to_hub", "true",
                                      "--hub_model_id", "other/shapes-clip"))
    message = str(stop.value.code)
    assert message.startswith("error: push to the Hub: ") and says in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing was built, loaded or trained
    assert hub.called("whoami")


def test_a_read_only_token_is_refused_before_the_repository_is_touched(tmp_path, monkeypatch):
    hub = FakeHub(role="read").install(monkeypatch)
    with pytest.raises(SystemExit, match=r"the token of me is read-only: create a write token"):
        run_contrastive.main(run_args("unused", tmp_path / "out", "--push_to_hub", "true"))
    assert hub.called("create_repo") == []


@pytest.mark.parametrize("repo_id", ["me/shapes clip", "me/a/b", "me/x..y"])
def test_an_invalid_repository_id_is_refused_without_asking_the_hub(tmp_path, monkeypatch, repo_id):
    hub = FakeHub().install(monkeypatch)
    with pytest.raises(SystemExit, match=rf"error: push to the Hub: '{repo_id}' is not a valid Hub repository id"):
        run_contrastive.main(run_args("unused", tmp_path / "out", "--push_to_hub", "true", "--hub_model_id", repo_id))
    assert hub.calls == []


def test_the_run_checks_with_its_token_creates_the_repository_and_uploads_the_export_folder(published_run):
    out, _, hub = published_run
    assert [token for token, _, _ in hub.called("whoami")] == ["hf_secret_token"]
    [(_, args, kwargs)] = hub.called("create_repo")
    assert args == ("me/shapes-clip",) and kwargs["private"] is True and kwargs["exist_ok"] is True
    [(token, _, upload)] = hub.called("upload_folder")
    assert token == "hf_secret_token"
    assert (upload["repo_id"], upload["folder_path"], upload["repo_type"]) == ("me/shapes-clip", str(out), "model")
    assert upload["ignore_patterns"] == HUB_IGNORE_PATTERNS


TRAINING_LEFTOVERS = ["checkpoint-12/model.safetensors", "checkpoints/checkpoint-9/optimizer.bin",
                      "best/model.safetensors", "model.safetensors.tmp", ".export.tmp/config.json",
                      "adapters/text/adapter_model.safetensors.tmp", "pixels-224px-0123abcd.arrow"]


def test_the_upload_holds_a_complete_repository_and_no_checkpoints_or_secrets(published_run, tmp_path):
    run_dir, _, hub = published_run
    [(_, _, upload)] = hub.called("upload_folder")
    out = tmp_path / "run"  # the run's folder, plus what a run may leave there wherever it keeps its checkpoints
    shutil.copytree(run_dir, out)
    for name in TRAINING_LEFTOVERS:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("training only")
    sent = uploaded_files(out, upload["ignore_patterns"])
    assert {"README.md", "metrics.json", "training_args.json", "config.json", "model.safetensors",
            "configuration_dualencoder.py", "modeling_dualencoder.py", "backbones_dualencoder.py",
            "tokenizer_config.json", "adapters/config.json", "adapters/heads.safetensors",
            "adapters/text/adapter_config.json", "adapters/text/adapter_model.safetensors"} <= set(sent)
    assert {"processor_config.json", "preprocessor_config.json"} & set(sent)  # (transformers 5 / 4 name it)
    left_out = set(uploaded_files(out, None)) - set(sent)
    assert left_out >= set(TRAINING_LEFTOVERS)
    training_only = ("best", "checkpoint-*", "checkpoints", "*.tmp", "pixels-*.arrow")
    assert all(any(fnmatch(part, name) for part in path.split("/") for name in training_only)
               for path in left_out), left_out
    for name in sent:  # the token given on the command line is in no uploaded file
        assert b"hf_secret_token" not in (out / name).read_bytes(), name
    assert json.loads((out / "training_args.json").read_text())["hub_token"] == "<hidden>"
    # what is sent loads as a user loads it from the Hub
    from transformers import AutoModel, AutoProcessor

    repo = tmp_path / "repo"
    for name in sent:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / name, repo / name)
    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo)
    inputs = processor(text=["a red circle"], images=[torch.zeros(3, 40, 40)], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]),
                                   DualEncoderModel.from_pretrained(out).eval().get_text_features(
                                       inputs["input_ids"], inputs["attention_mask"]))


def test_dualencoder_push_uploads_an_existing_export(published_run, monkeypatch, capsys):
    out, _, _ = published_run
    hub = FakeHub(user="someone").install(monkeypatch)
    url = push_main([str(out), "--repo_id", "flickr8k-clip"])
    [(_, _, upload)] = hub.called("upload_folder")
    assert (upload["repo_id"], upload["folder_path"]) == ("someone/flickr8k-clip", str(out))
    assert url == "https://huggingface.co/someone/flickr8k-clip/commit/abc" and url in capsys.readouterr().out


def test_an_upload_that_fails_after_training_says_the_model_is_saved_and_how_to_retry(published_run, monkeypatch):
    out, _, _ = published_run
    FakeHub(upload_folder=requests.exceptions.ConnectionError("Connection aborted.")).install(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        push_main([str(out), "--repo_id", "me/shapes-clip"])
    assert str(stop.value.code) == (
        "error: push to the Hub: cannot reach the Hub (ConnectionError: Connection aborted.): check the network "
        f"connection (and HF_ENDPOINT if set); the model stays saved in {out}: retry with dualencoder-push {out} "
        "--repo_id me/shapes-clip")
    assert (out / "metrics.json").is_file()


def test_dualencoder_push_refuses_a_folder_that_is_no_complete_export_in_one_line_without_a_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "dualencoder.training.publish", str(tmp_path), "--repo_id", "me/x"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_TOKEN": "hf_unused"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: push to the Hub: {tmp_path} is not a complete export (no README.md, metrics.json, "
        "configuration_dualencoder.py, modeling_dualencoder.py, backbones_dualencoder.py, model.safetensors, "
        "processor_config.json, tokenizer_config.json): run_contrastive.py writes one at the end of a run; pass that "
        "run's output_dir")
