"""Specification of the dual-encoder model: shapes, saving, LoRA, gradients, remote code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dualencoder.trainable import (frozen_prefix_depth, parameter_report, set_tower_trainable, tower_is_frozen,
                                   train_mode)
from dualencoder.evaluation.embed import pooled_from_prefix
from backbones_dualencoder import load_timm_state_dict, lora_targets, tower_blocks
from modeling_dualencoder import DualEncoderConfig, DualEncoderModel, clip_loss
from tests.tiny import tiny_batch, tiny_bert_config, tiny_text_config, tiny_timm_config, tiny_vit_distilbert_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["vit+distilbert", "timm+distilbert"])
def tiny_model(request):
    torch.manual_seed(0)
    config = tiny_vit_distilbert_config() if request.param == "vit+distilbert" else tiny_timm_config()
    return DualEncoderModel(config).eval()


def test_forward_returns_normalised_embeddings_and_square_logits(tiny_model):
    batch = tiny_batch(tiny_model.config, batch_size=3)
    out = tiny_model(**batch, return_loss=True)
    assert out.image_embeds.shape == (3, tiny_model.config.projection_dim)
    assert out.text_embeds.shape == (3, tiny_model.config.projection_dim)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    expected = out.logit_scale * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, expected)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_loss_only_when_asked(tiny_model):
    out = tiny_model(**tiny_batch(tiny_model.config, batch_size=2))
    assert out.loss is None


def test_cached_pooled_features_give_the_same_embeddings(tiny_model):
    batch = tiny_batch(tiny_model.config, batch_size=2)
    with torch.no_grad():
        direct = tiny_model(**batch)
        pooled = dict(vision_pooled=tiny_model.encode_vision(batch["pixel_values"]),
                      text_pooled=tiny_model.encode_text(batch["input_ids"], batch["attention_mask"]))
        cached = tiny_model(**pooled)
    torch.testing.assert_close(cached.image_embeds, direct.image_embeds)
    torch.testing.assert_close(cached.text_embeds, direct.text_embeds)


def test_logit_scale_is_clamped_at_the_configured_maximum(tiny_model):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(10.0)
    assert tiny_model.get_logit_scale().item() == pytest.approx(100.0)


def test_logit_bias_is_learned_when_configured():
    model = DualEncoderModel(tiny_vit_distilbert_config(logit_bias_init_value=-10.0, logit_scale_init_value=2.3))
    out = model(**tiny_batch(model.config, 2))
    expected = out.logit_scale * out.image_embeds @ out.text_embeds.t() - 10.0
    torch.testing.assert_close(out.logits_per_image, expected)


def test_save_and_load_round_trip_gives_identical_embeddings(tiny_model, tmp_path):
    batch = tiny_batch(tiny_model.config, 2)
    tiny_model.save_pretrained(tmp_path)
    loaded = DualEncoderModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before, after = tiny_model(**batch), loaded(**batch)
    torch.testing.assert_close(after.image_embeds, before.image_embeds)
    torch.testing.assert_close(after.text_embeds, before.text_embeds)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_dualencoder.DualEncoderModel"
    assert (tmp_path / "modeling_dualencoder.py").exists()


@pytest.mark.parametrize("make_config", [tiny_timm_config, tiny_vit_distilbert_config], ids=["timm", "vit-distilbert"])
def test_trust_remote_code_loads_the_directory_in_a_fresh_process(tmp_path, make_config):
    """Without the repository a saved model embeds as it did and gives the plain CLIP loss, whatever loss it was
    trained with (the shipped Flickr8k config trains with clip+triplet: its export must load for inference)."""
    model = DualEncoderModel(make_config(loss_type="clip+triplet", loss_kwargs={"margin": 0.2})).eval()
    model.save_pretrained(tmp_path / "model")
    assert {"modeling_dualencoder.py", "configuration_dualencoder.py", "backbones_dualencoder.py"} <= {
        path.name for path in (tmp_path / "model").iterdir()}
    batch = tiny_batch(model.config, 2)
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).image_embeds, tmp_path / "expected.pt")
        out = model(**batch)
        expected_loss = float(clip_loss(out.image_embeds, out.text_embeds, out.logit_scale))
    # Run outside the repository so neither modeling_dualencoder nor dualencoder is importable.
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModel
        assert not any(p.rstrip('/') == {REPO!r} for p in sys.path)
        model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
        batch = torch.load({str(tmp_path / 'batch.pt')!r})
        with torch.no_grad():
            out = model(**batch)
            torch.testing.assert_close(out.image_embeds, torch.load({str(tmp_path / 'expected.pt')!r}))
            print('loss', float(model(**batch, return_loss=True).loss))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("loss ")[1]) == pytest.approx(expected_loss, rel=1e-5)


def test_pooler_pooling_on_a_tower_without_a_pooler_is_refused_at_construction_naming_the_field():
    with pytest.raises(ValueError, match="text_pooling='pooler', but DistilBertModel has no pooler"):
        DualEncoderModel(tiny_vit_distilbert_config(text_pooling="pooler"))


def test_the_fallback_clip_loss_refuses_a_batch_with_two_captions_of_one_image():
    from modeling_dualencoder import clip_loss

    embeds = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert clip_loss(embeds, embeds, torch.tensor(10.0), image_ids=torch.tensor([0, 1, 2, 3])) > 0
    with pytest.raises(ValueError, match="several captions of one image"):
        clip_loss(embeds, embeds, torch.tensor(10.0), image_ids=torch.tensor([0, 0, 1, 1]))


def test_lora_on_both_towers_trains_only_adapters_heads_and_scale():
    model = DualEncoderModel(tiny_vit_distilbert_config(lora_rank=4, lora_towers=["vision", "text"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    for name in trainable:
        assert "lora_" in name or name.startswith(("visual_projection", "text_projection", "logit_scale")), name
    assert any("vision_model" in n and "lora_" in n for n in trainable)
    assert any("text_model" in n and "lora_" in n for n in trainable)
    report = parameter_report(model)
    assert 0 < report["all"]["trainable"] < report["all"]["total"]
    assert report["vision"]["trainable"] == sum(p.numel() for n, p in model.vision_model.named_parameters() if "lora_" in n)


def test_default_lora_targets_follow_the_backbone_family():
    vit = DualEncoderModel(tiny_vit_distilbert_config(lora_rank=2, lora_towers=["vision", "text"]))
    assert lora_targets(vit.config, vit.vision_model, "vision") in (["query", "value"], ["q_proj", "v_proj"])
    assert lora_targets(vit.config, vit.text_model, "text") == ["q_lin", "v_lin"]
    timm_model = DualEncoderModel(tiny_timm_config(lora_rank=2, lora_towers=["vision"]))
    assert any("conv_pwl.lora_A" in n for n, _ in timm_model.named_parameters())


def test_unknown_backbone_family_without_targets_is_a_clear_error():
    config = tiny_vit_distilbert_config(lora_rank=2, lora_towers=["vision"])
    config.vision_config.model_type = "unheard-of"
    with pytest.raises(ValueError, match="lora_vision_targets"):
        DualEncoderModel(config)


def _nonzero_adapters(model, std: float = 0.5) -> None:
    """LoRA B starts at zero, so a fresh adapter changes nothing: give the adapters something to do."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)


def test_merged_adapters_give_the_same_embeddings_and_load_without_peft(tmp_path):
    torch.manual_seed(0)
    model = DualEncoderModel(tiny_vit_distilbert_config(lora_rank=4, lora_towers=["vision", "text"])).eval()
    _nonzero_adapters(model)
    batch = tiny_batch(model.config, 3)
    with torch.no_grad():
        unmerged = model(**batch)
        merged_model = model.merge_adapters()
        merged = merged_model(**batch)
    torch.testing.assert_close(merged.image_embeds, unmerged.image_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged.text_embeds, unmerged.text_embeds, atol=1e-5, rtol=1e-4)
    merged_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["lora_rank"] == 0
    loaded = DualEncoderModel.from_pretrained(tmp_path).eval()
    assert not any("lora" in name for name, _ in loaded.named_modules())
    assert type(loaded.text_model).__name__ == "DistilBertModel"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).text_embeds, unmerged.text_embeds, atol=1e-5, rtol=1e-4)


def test_unmerged_lora_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = DualEncoderModel(tiny_vit_distilbert_config(lora_rank=4, lora_towers=["text"])).eval()
    _nonzero_adapters(model, std=1.0)
    batch = tiny_batch(model.config, 2)
    model.save_pretrained(tmp_path)
    loaded = DualEncoderModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).text_embeds, model(**batch).text_embeds)


def test_gradients_reach_every_trainable_parameter(tiny_model):
    tiny_model.train()
    out = tiny_model(**tiny_batch(tiny_model.config, 4), return_loss=True)
    out.loss.backward()
    missing = [n for n, p in tiny_model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_freezing_a_tower_and_unfreezing_its_top_blocks():
    model = DualEncoderModel(tiny_vit_distilbert_config())
    set_tower_trainable(model, "vision", "frozen")
    assert tower_is_frozen(model, "vision") and not tower_is_frozen(model, "text")
    set_tower_trainable(model, "text", "top:1")
    trainable = {n for n, p in model.text_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.layer.1.") for n in trainable)
    with pytest.raises(ValueError, match="blocks"):
        set_tower_trainable(model, "text", "top:9")


@pytest.mark.parametrize("field,value", [("projection_head", "deep"), ("text_pooling", "max"), ("lora_towers", ["audio"])])
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_vit_distilbert_config(**{field: value})


def test_config_needs_exactly_one_vision_backbone():
    config = tiny_vit_distilbert_config()
    with pytest.raises(ValueError, match="exactly one"):
        DualEncoderConfig(vision_config=config.vision_config, text_config=config.text_config, timm_model_name="resnet18")


def test_timm_state_dict_with_other_names_is_renamed_positionally(tmp_path):
    import timm

    source = timm.create_model("test_efficientnet", num_classes=10)
    renamed = {f"port.{i}": v for i, v in enumerate(source.state_dict().values())}
    torch.save(renamed, tmp_path / "w.pth")
    target = timm.create_model("test_efficientnet", num_classes=0)
    load_timm_state_dict(target, str(tmp_path / "w.pth"))
    torch.testing.assert_close(target.conv_stem.weight, source.conv_stem.weight)
    bad = dict(renamed)
    first = next(iter(bad))
    bad[first] = torch.zeros(1, 2, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_timm_state_dict(target, str(tmp_path / "bad.pth"))


def test_a_frozen_tower_stays_in_eval_mode_so_batchnorm_statistics_do_not_drift():
    model = DualEncoderModel(tiny_timm_config())
    set_tower_trainable(model, "vision", "frozen")
    train_mode(model)
    assert not model.vision_model.training and model.text_model.training and model.visual_projection.training
    running_mean = model.vision_model.bn1.running_mean.clone()
    model(**tiny_batch(model.config, 4), return_loss=True).loss.backward()
    torch.testing.assert_close(model.vision_model.bn1.running_mean, running_mean)


def test_the_frozen_lower_blocks_of_a_top_n_tower_keep_their_batchnorm_statistics():
    model = DualEncoderModel(tiny_timm_config())
    set_tower_trainable(model, "vision", "top:1")
    train_mode(model)
    assert model.vision_model.training and not model.vision_model.bn1.training
    assert model.vision_model.bn2.training  # after the unfrozen block: trains, statistics included
    running_mean = model.vision_model.bn1.running_mean.clone()
    model(**tiny_batch(model.config, 4), return_loss=True).loss.backward()
    torch.testing.assert_close(model.vision_model.bn1.running_mean, running_mean)


@pytest.mark.parametrize("mode,depth", [("top:1", -1), ("top:2", -2), ("full", 0), ("frozen", 0)])
def test_frozen_prefix_depth_counts_the_leading_blocks_with_nothing_to_train(mode, depth):
    model = DualEncoderModel(tiny_timm_config())
    set_tower_trainable(model, "vision", mode)
    blocks = len(tower_blocks(model.vision_model))
    assert frozen_prefix_depth(model, "vision") == (blocks + depth if depth else 0)


@pytest.mark.parametrize("make_config", [tiny_vit_distilbert_config, tiny_timm_config,
                                         lambda: tiny_vit_distilbert_config(vision_pooling="pooler")],
                         ids=["hf_vit", "timm_cnn", "hf_vit_pooler"])
def test_vision_prefix_then_suffix_equals_the_whole_tower_at_every_depth(make_config):
    model = DualEncoderModel(make_config()).eval()
    pixels = tiny_batch(model.config, 3)["pixel_values"]
    with torch.no_grad():
        whole = model.encode_vision(pixels)
        depths = len(tower_blocks(model.vision_model)) + 1
        for depth in range(depths):
            split = model.vision_suffix(model.vision_prefix(pixels, depth), depth)
            torch.testing.assert_close(split, whole, msg=f"depth {depth}")


@pytest.mark.parametrize("make_config", [tiny_vit_distilbert_config, tiny_timm_config], ids=["hf_vit", "timm_cnn"])
def test_vision_chunks_give_the_whole_batch_result_and_gradients(make_config):
    whole_model = DualEncoderModel(make_config())
    chunked_model = DualEncoderModel(make_config(vision_chunk_size=2))
    chunked_model.load_state_dict(whole_model.state_dict())
    pixels = tiny_batch(whole_model.config, 5)["pixel_values"]  # chunks of 2, 2 and 1
    depth = 1
    grads = []
    for model in (whole_model, chunked_model):
        train_mode(model, freeze_batchnorm=True)
        pooled = model.encode_vision(pixels)
        from_prefix = model.vision_suffix(model.vision_prefix(pixels, depth), depth)
        (pooled.square().sum() + from_prefix.sum()).backward()
        grads.append((pooled.detach(), from_prefix.detach(),
                      {n: p.grad.clone() for n, p in model.vision_model.named_parameters() if p.grad is not None}))
    (pooled_a, prefix_a, grads_a), (pooled_b, prefix_b, grads_b) = grads
    torch.testing.assert_close(pooled_b, pooled_a)
    torch.testing.assert_close(prefix_b, prefix_a)
    assert grads_a and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_vision_chunks_are_skipped_while_batchnorm_statistics_update(caplog):
    whole_model = DualEncoderModel(tiny_timm_config())
    chunked_model = DualEncoderModel(tiny_timm_config(vision_chunk_size=2))
    chunked_model.load_state_dict(whole_model.state_dict())
    pixels = tiny_batch(whole_model.config, 6)["pixel_values"]
    whole_model.train(), chunked_model.train()  # BatchNorm normalises with the statistics of the batch
    with caplog.at_level("WARNING"):
        chunked = chunked_model.encode_vision(pixels)
    torch.testing.assert_close(chunked, whole_model.encode_vision(pixels))
    assert "vision_chunk_size is ignored" in caplog.text
    # In eval mode the running statistics are used, so the chunks apply and still agree.
    with torch.no_grad():
        torch.testing.assert_close(chunked_model.eval().encode_vision(pixels), whole_model.eval().encode_vision(pixels))


def test_vision_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="vision_chunk_size"):
        tiny_timm_config(vision_chunk_size=0)


@pytest.mark.parametrize("text_config", [tiny_text_config, tiny_bert_config], ids=["distilbert", "bert"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_prefix_then_suffix_equals_the_whole_tower_at_every_depth(text_config, pooling):
    model = DualEncoderModel(tiny_timm_config(text_config=text_config().to_dict(), text_pooling=pooling)).eval()
    batch = tiny_batch(model.config, 3)  # row 0 is padded, so the mask must reach the cached layers' attention
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        whole = model.encode_text(ids, mask)
        for depth in range(len(tower_blocks(model.text_model)) + 1):
            split = model.text_suffix(model.text_prefix(ids, mask, depth), mask, depth)
            torch.testing.assert_close(split, whole, msg=f"depth {depth}")


def test_a_cached_text_prefix_trimmed_to_its_caption_gives_the_padded_result():
    """The cache stores each caption's states without padding; re-padded to any length they give the same."""
    model = DualEncoderModel(tiny_timm_config()).eval()
    batch = tiny_batch(model.config, 2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = int(mask[0].sum())
    with torch.no_grad():
        hidden = model.text_prefix(ids, mask, 1)
        trimmed = model.text_suffix(hidden[:1, :length], mask[:1, :length], 1)
        torch.testing.assert_close(trimmed, model.encode_text(ids, mask)[:1])


def test_text_prefix_of_an_out_of_range_depth_is_a_clear_error():
    model = DualEncoderModel(tiny_timm_config())
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="outside the text tower's 0..2 layers"):
        model.text_prefix(ids, None, 3)


def _adapted_modules(tower) -> list:
    return [module for module in tower.modules() if hasattr(module, "lora_A") and len(module.lora_A)]


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_lora_in_the_top_blocks_only_leaves_the_blocks_below_pretrained_and_cacheable(tower):
    model = DualEncoderModel(tiny_timm_config(lora_rank=2, lora_towers=[tower], **{f"lora_{tower}_blocks": 1}))
    set_tower_trainable(model, tower, "frozen")
    blocks = tower_blocks(getattr(model, f"{tower}_model"))
    adapted = _adapted_modules(getattr(model, f"{tower}_model"))
    in_top_block = {id(module) for module in blocks[-1].modules()}
    assert adapted and all(id(module) in in_top_block for module in adapted)
    assert frozen_prefix_depth(model, tower) == len(blocks) - 1
    # Adapters wherever a target module is: the prefix ends at the first block that has one (test_efficientnet's
    # block 0 is a plain conv with no LoRA target; the text tower's layer 0 has one).
    every_block = DualEncoderModel(tiny_timm_config(lora_rank=2, lora_towers=[tower]))
    set_tower_trainable(every_block, tower, "frozen")
    blocks = tower_blocks(getattr(every_block, f"{tower}_model"))
    adapted = {id(module) for module in _adapted_modules(getattr(every_block, f"{tower}_model"))}
    first = next(i for i, block in enumerate(blocks) if adapted & {id(module) for module in block.modules()})
    assert frozen_prefix_depth(every_block, tower) == first == (1 if tower == "vision" else 0)


def test_prefix_then_suffix_runs_the_adapters_of_the_top_blocks_like_the_whole_tower():
    config = tiny_timm_config(lora_rank=2, lora_towers=["vision", "text"], lora_vision_blocks=2, lora_text_blocks=1)
    model = DualEncoderModel(config).eval()
    _nonzero_adapters(model)
    batch = tiny_batch(model.config, 3)
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    vision_depth = len(tower_blocks(model.vision_model)) - 2
    with torch.no_grad():
        whole_vision, whole_text = model.encode_vision(pixels), model.encode_text(ids, mask)
        torch.testing.assert_close(model.vision_suffix(model.vision_prefix(pixels, vision_depth), vision_depth), whole_vision)
        torch.testing.assert_close(model.text_suffix(model.text_prefix(ids, mask, 1), mask, 1), whole_text)
        with model.vision_model.disable_adapter(), model.text_model.disable_adapter():  # the adapters do count
            assert not torch.allclose(model.encode_vision(pixels), whole_vision)
            assert not torch.allclose(model.encode_text(ids, mask), whole_text)


def test_top_block_adapters_round_trip_through_save_and_merge(tmp_path):
    model = DualEncoderModel(tiny_timm_config(lora_rank=2, lora_towers=["text"], lora_text_blocks=1)).eval()
    _nonzero_adapters(model)
    batch = tiny_batch(model.config, 2)
    with torch.no_grad():
        expected = model(**batch).text_embeds
    model.save_pretrained(tmp_path / "unmerged")
    loaded = DualEncoderModel.from_pretrained(tmp_path / "unmerged").eval()
    assert loaded.config.lora_text_blocks == 1 and len(_adapted_modules(loaded.text_model)) == len(_adapted_modules(model.text_model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).text_embeds, expected)
        torch.testing.assert_close(model.merge_adapters()(**batch).text_embeds, expected)


@pytest.mark.parametrize("field,value,message", [("lora_text_blocks", 0, "lora_text_blocks=0"),
                                                 ("lora_text_blocks", 3, "cannot adapt the last 3")])
def test_lora_blocks_outside_the_tower_name_the_problem(field, value, message):
    with pytest.raises(ValueError, match=message):
        DualEncoderModel(tiny_timm_config(lora_rank=2, lora_towers=["text"], **{field: value}))


def test_image_flip_average_embeds_the_mean_of_both_views_in_eval_mode_only():
    model = DualEncoderModel(tiny_timm_config(image_flip_average=True))
    pixels = tiny_batch(model.config, 2)["pixel_values"]
    model.eval()
    with torch.no_grad():
        once, mirrored = model._encode_vision_once(pixels), model._encode_vision_once(pixels.flip(-1))
        torch.testing.assert_close(model.encode_vision(pixels), (once + mirrored) / 2)
        torch.testing.assert_close(model.encode_vision(pixels), model.encode_vision(pixels.flip(-1)))  # flip-invariant
        model.train()
        train_mode(model, freeze_batchnorm=True)  # BatchNorm statistics fixed, so only the flag differs
        torch.testing.assert_close(model.encode_vision(pixels), once)  # training sees one view: mirroring can augment


def test_pooled_from_prefix_averages_the_mirrored_prefix_like_encode_vision():
    model = DualEncoderModel(tiny_timm_config(image_flip_average=True)).eval()
    pixels = tiny_batch(model.config, 3)["pixel_values"]
    depth = 2
    ids = ["a", "b", "c"]
    with torch.no_grad():
        plain = dict(zip(ids, model.vision_prefix(pixels, depth)))
        mirrored = dict(zip(ids, model.vision_prefix(pixels.flip(-1), depth)))
        pooled = pooled_from_prefix(model, plain, ids, depth, batch_size=2, device="cpu", mirrored=mirrored)
        torch.testing.assert_close(torch.stack([pooled[i] for i in ids]), model.encode_vision(pixels))
    with pytest.raises(ValueError, match="mirrored"):
        pooled_from_prefix(model, plain, ids, depth, batch_size=2, device="cpu")


def test_pooled_from_prefix_shows_a_progress_bar_per_view_when_asked(capsys):
    model = DualEncoderModel(tiny_timm_config(image_flip_average=True)).eval()
    pixels = tiny_batch(model.config, 3)["pixel_values"]
    ids, depth = ["a", "b", "c"], 2
    with torch.no_grad():
        plain = dict(zip(ids, model.vision_prefix(pixels, depth)))
        mirrored = dict(zip(ids, model.vision_prefix(pixels.flip(-1), depth)))
        pooled_from_prefix(model, plain, ids, depth, batch_size=2, device="cpu", mirrored=mirrored)
        assert "cached prefix" not in capsys.readouterr().err  # quiet by default (tests, notebooks' inner loops)
        pooled_from_prefix(model, plain, ids, depth, batch_size=2, device="cpu", mirrored=mirrored,
                           desc="validation images", show_progress=True)
    err = capsys.readouterr().err
    assert "validation images:" in err and "validation images (mirrored):" in err and "0/2" in err  # 3 images, batches of 2


def test_forward_from_a_cached_vision_prefix_matches_pixels_and_trains_only_the_suffix():
    model = DualEncoderModel(tiny_timm_config()).eval()
    batch = tiny_batch(model.config, 4)
    depth = len(tower_blocks(model.vision_model)) - 1
    with torch.no_grad():
        hidden = model.vision_prefix(batch["pixel_values"], depth)
        from_pixels = model(**batch).image_embeds
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    out = model(**cached, vision_hidden=hidden, vision_hidden_depth=depth, return_loss=True)
    torch.testing.assert_close(out.image_embeds, from_pixels)
    out.loss.backward()
    assert model.vision_model.conv_stem.weight.grad is None  # the cached prefix got no gradient
    assert tower_blocks(model.vision_model)[-1].conv_pw.weight.grad is not None
    with pytest.raises(ValueError, match="vision_hidden_depth"):
        model(**cached, vision_hidden=hidden)


def test_prefix_split_of_an_unsupported_tower_says_what_is_supported():
    model = DualEncoderModel(tiny_vit_distilbert_config())
    model.vision_model.layernorm = None
    del model.vision_model.layernorm
    with pytest.raises(ValueError, match="EfficientNet.*ViT"):
        model.vision_prefix(torch.zeros(1, 3, 32, 32), 1)


def test_rows_of_one_image_run_the_cached_tower_top_once_and_get_the_same_embeddings():
    model = DualEncoderModel(tiny_timm_config()).eval()
    batch = tiny_batch(model.config, 6)
    depth = len(tower_blocks(model.vision_model)) - 1
    image_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    with torch.no_grad():
        hidden = model.vision_prefix(batch["pixel_values"], depth)[image_ids]  # rows of one image: equal inputs
    text = {k: v for k, v in batch.items() if k != "pixel_values"}
    seen_rows = []
    model.vision_suffix = lambda h, d, _suffix=model.vision_suffix: seen_rows.append(h.shape[0]) or _suffix(h, d)
    deduped = model(**text, vision_hidden=hidden, vision_hidden_depth=depth, image_ids=image_ids)
    every_row = model(**text, vision_hidden=hidden, vision_hidden_depth=depth)
    assert seen_rows == [3, 6]
    torch.testing.assert_close(deduped.image_embeds, every_row.image_embeds)
    torch.testing.assert_close(deduped.image_embeds[0], deduped.image_embeds[1])


def test_freeze_batchnorm_keeps_running_statistics_while_their_weights_train():
    model = DualEncoderModel(tiny_timm_config())
    train_mode(model, freeze_batchnorm=True)
    assert model.vision_model.training and not model.vision_model.bn2.training
    running_mean = model.vision_model.bn2.running_mean.clone()
    model(**tiny_batch(model.config, 4), return_loss=True).loss.backward()
    torch.testing.assert_close(model.vision_model.bn2.running_mean, running_mean)
    assert model.vision_model.bn2.weight.grad is not None


def test_the_config_saves_without_a_default_config_to_diff_against(tmp_path, tiny_model, monkeypatch):
    """A dual encoder config has no defaults (it needs its towers). Some transformers versions
    (5.17, found on the GPU machine) build `type(config)()` to diff against when saving, unless the
    class says `has_no_defaults_at_init`, so saving must never construct an empty config."""
    config = tiny_model.config
    assert type(config).has_no_defaults_at_init
    with pytest.raises(ValueError, match="text_config"):
        type(config)()
    config.save_pretrained(tmp_path)
    assert type(config).from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_an_export_loads_and_embeds_with_the_oldest_transformers_the_requirements_allow(tmp_path):
    """requirements.txt allows transformers 4.57: a saved model's own files (trust_remote_code) must import and embed
    there too, not only on the newest (an import that only transformers 5 has once broke this). `.ci/run` installs
    4.57 into the folder DUALENCODER_OLDEST_TRANSFORMERS names; the test runs it in a fresh process."""
    oldest = os.environ.get("DUALENCODER_OLDEST_TRANSFORMERS")
    if not oldest:
        pytest.skip("DUALENCODER_OLDEST_TRANSFORMERS is unset (.ci/run sets it and installs transformers 4.57 there)")
    model = DualEncoderModel(tiny_vit_distilbert_config()).eval()
    model.save_pretrained(tmp_path / "model")
    batch = tiny_batch(model.config, 2)
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).image_embeds, tmp_path / "expected.pt")
    # -S and the packages' folder by hand: no .pth file (an editable install of this project) runs
    script = textwrap.dedent(f"""
        import sys, sysconfig
        sys.path.append(sysconfig.get_paths()["purelib"])
        import torch, transformers
        from transformers import AutoModel
        print("transformers", transformers.__version__)
        model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            out = model(**torch.load({str(tmp_path / 'batch.pt')!r}))
        torch.testing.assert_close(out.image_embeds, torch.load({str(tmp_path / 'expected.pt')!r}))
    """)
    env = dict(os.environ, PYTHONPATH=oldest, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers 4.57." in result.stdout
