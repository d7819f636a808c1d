"""Sharded training (FSDP2): configs/accelerate/fsdp.yaml run on 2 gloo CPU processes trains, checkpoints in
shards, and exports the whole weights; the pieces it needs (dualencoder/training/sharded.py) alone."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from dualencoder.training.checkpoints import list_checkpoints
from dualencoder.training.sharded import prepare_for_sharding, sharding_problem
from modeling_dualencoder import DualEncoderModel
from tests.tiny import save_tiny_model_dir, tiny_batch, tiny_bert_config, tiny_vit_distilbert_config

REPO = Path(__file__).resolve().parent.parent


def fsdp_launch_env(processes: int) -> dict:
    """The variables `accelerate launch --config_file configs/accelerate/fsdp.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
                                               "--num_processes", str(processes), "--mixed_precision", "no",
                                               "run_contrastive.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {key: value for key, value in env.items() if key.startswith(("FSDP_", "ACCELERATE_"))}


def test_fsdp_config_on_two_cpu_processes_trains_checkpoints_shards_and_exports_the_whole_weights(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "run"
    env = dict(os.environ, **fsdp_launch_env(2), ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tests/fsdp_on_cpu.py", "--config", "configs/tiny_test.yaml", "--model_name_or_path", model_dir,
               "--output_dir", str(out), "--num_images", "30", "--per_device_train_batch_size", "8",
               "--num_train_epochs", "1", "--logging_steps", "1", "--head_learning_rate", "1e-2",
               "--feature_cache_dir", "",
               # (3 validation images: the trained epoch can tie the untrained model, which is then exported)
               "--eval_before_training", "false"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Saving FSDP model" in result.stdout + result.stderr  # Accelerate's FSDP path, not plain DDP

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 8  # 24 images x 5 captions / batch 8 = 15 batches, over 2 processes
    # the checkpoint: each process wrote its own shard of the weights (SHARDED_STATE_DICT)
    last = Path(list_checkpoints(str(out))[-1])
    assert last.name == "checkpoint-8"
    shards_dir = last / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(shards_dir), str(tmp_path / "whole.pt"))
    from_shards = torch.load(tmp_path / "whole.pt")["model"]

    # the export (the best = only epoch) holds the whole trained weights, equal to the shards put together
    exported = DualEncoderModel.from_pretrained(str(out))
    initial = load_file(os.path.join(model_dir, "model.safetensors"))
    for name, param in exported.named_parameters():
        torch.testing.assert_close(param.detach(), from_shards[name].reshape(param.shape), rtol=0, atol=0, msg=name)
        assert not torch.equal(param.detach(), initial[name]), f"{name} did not train"
    assert exported.logit_scale.dim() == 0  # its own shape, though held as a vector while sharded
    features = exported.eval().get_image_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 16) and torch.isfinite(features).all()


def test_scalar_parameters_become_vectors_for_fsdp2_and_the_loss_is_unchanged():
    torch.manual_seed(0)
    model = DualEncoderModel(tiny_vit_distilbert_config(logit_bias_init_value=-10.0)).eval()
    batch = tiny_batch(model.config, 4)
    before = model(**batch, return_loss=True).loss
    assert sorted(prepare_for_sharding(model)) == ["logit_bias", "logit_scale"]
    assert model.logit_scale.shape == (1,) and model.logit_bias.shape == (1,)
    assert "logit_scale" in dict(model.named_parameters())  # a parameter still, so the optimiser trains it
    torch.testing.assert_close(model(**batch, return_loss=True).loss, before)


def test_a_sharding_that_hides_the_weights_from_evaluation_is_refused_saying_what_to_set():
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    assert "fsdp_version: 2" in sharding_problem(fsdp1)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    assert sharding_problem(fsdp2) is None
    zero3 = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    assert "ZeRO stage 2" in sharding_problem(zero3)


@pytest.mark.parametrize("text", ["distilbert", "bert"])
def test_the_model_names_its_blocks_for_fsdp_wrapping_and_none_holds_the_token_table(text):
    """Accelerate's transformer-layer policy wraps what `_no_split_modules` names: both towers' blocks. It then
    wraps `get_input_embeddings()` alone, which fails when a wrapped module holds it (BERT's list names
    BertEmbeddings)."""
    overrides = {"text_config": tiny_bert_config().to_dict()} if text == "bert" else {}
    model = DualEncoderModel(tiny_vit_distilbert_config(**overrides))
    assert model._no_split_modules == {"ViTLayer", "BertLayer" if text == "bert" else "TransformerBlock"}
    table = model.get_input_embeddings()
    assert table is model.text_model.embeddings.word_embeddings
    assert not [m for m in model.modules() if type(m).__name__ in model._no_split_modules and table in m.modules()]
