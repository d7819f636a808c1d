"""Baselines on frozen features: each must learn a toy problem; features cache; the compare command."""

import json
import shutil

import pytest
import torch

from dualencoder.baselines import (
    BASELINES,
    ContrastiveHeads,
    CorrAE,
    DeepCCA,
    LinearCCA,
    SplitFeatures,
    TrainOptions,
    build_baseline,
    evaluate,
    fit_cca,
    load_features,
    total_correlation,
)
from dualencoder.baselines.features import feature_key, split_file

torch.set_num_threads(1)

CHANCE_RSUM = 2 * 100 * (1 + 5 + 10) / 60  # R@1+5+10 both ways at random among 60 test images: about 53


def toy_split(num_images: int, seed: int) -> SplitFeatures:
    """Paired features driven by a hidden 6-d factor: image 24-d, 5 noisy 12-d captions per image."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(1234)  # the same modality maps for every split
    to_image, to_text = torch.randn(6, 24, generator=fixed), torch.randn(6, 12, generator=fixed)
    z = torch.randn(num_images, 6, generator=gen)
    images = torch.tanh(z @ to_image / 2) + 0.3 * torch.randn(num_images, 24, generator=gen)
    captions_z = z.repeat_interleave(5, 0)
    texts = torch.tanh(captions_z @ to_text / 2) + 0.3 * torch.randn(5 * num_images, 12, generator=gen)
    return SplitFeatures(images, texts, torch.arange(num_images).repeat_interleave(5))


@pytest.fixture(scope="module")
def toy():
    return toy_split(240, 0), toy_split(60, 1), toy_split(60, 2)


FAST = {"epochs": 12, "batch_size": 32, "lr": 3e-3}
TOY_BASELINES = {
    "linear-cca": lambda: LinearCCA(ridges=(1e-2, 1e-1), dims=(6, 12)),
    "infonce-mlp-heads": lambda: ContrastiveHeads(projection_dim=16, hidden_dim=32, options=TrainOptions(**FAST)),
    "corr-ae-mse": lambda: CorrAE("corr", "mse", 32, 32, 16, dropout=0.0, options=TrainOptions(**FAST)),
    "corr-ae-contrastive": lambda: CorrAE("corr", "contrastive", 32, 32, 16, options=TrainOptions(**FAST)),
    "cross-ae-mse": lambda: CorrAE("cross", "mse", 32, 32, 16, dropout=0.0, options=TrainOptions(**FAST)),
    "deep-cca": lambda: DeepCCA(6, 32, 32, options=TrainOptions(epochs=12, batch_size=120, lr=3e-3)),
}


@pytest.mark.parametrize("name", list(TOY_BASELINES))
def test_each_baseline_learns_the_hidden_factor(toy, name):
    train, val, test = toy
    baseline = TOY_BASELINES[name]().fit(train.images, train.texts, train.text_to_image, val=val)
    metrics = evaluate(baseline, test)
    # far above chance (measured: RSUM 450-545, R@1 40-80 %; chance: RSUM 53, R@1 1.7 %)
    assert metrics["rsum"] > 6 * CHANCE_RSUM, metrics
    assert metrics["i2t_r1"] > 20 and metrics["t2i_r1"] > 20, metrics
    assert baseline.selected.get("val_rsum", 0) > 0 and baseline.train_seconds > 0
    embeds = baseline.embed_images(test.images)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(len(embeds)))


def test_epoch_selection_restores_the_best_dev_epoch(toy):
    train, val, _ = toy
    baseline = ContrastiveHeads(projection_dim=8, hidden_dim=16, options=TrainOptions(epochs=4, batch_size=64,
                                                                                       patience=0))
    baseline.fit(train.images, train.texts, train.text_to_image, val=val)
    best = max(baseline.history, key=lambda row: row["val_rsum"])
    assert baseline.selected == {"epoch": best["epoch"], "val_rsum": best["val_rsum"]}
    assert evaluate(baseline, val)["rsum"] == pytest.approx(best["val_rsum"])


def test_cca_recovers_a_known_correlation():
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(2000, 1, generator=gen)
    x = torch.cat([shared, torch.randn(2000, 3, generator=gen)], 1) @ torch.randn(4, 4, generator=gen)
    y = torch.cat([shared + 0.5 * torch.randn(2000, 1, generator=gen), torch.randn(2000, 2, generator=gen)], 1)
    fit = fit_cca(x, y, ridge_x=1e-6)
    assert fit.corrs[0] == pytest.approx(1 / 1.25 ** 0.5, abs=0.03)  # corr(s, s + 0.5 n) = 1/sqrt(1.25)
    assert fit.corrs[1] < 0.1
    projected = (x.double() - fit.mean_x) @ fit.proj_x
    torch.testing.assert_close(projected.T @ projected / 1999, torch.eye(3, dtype=torch.float64), atol=1e-3, rtol=0)


def test_total_correlation_is_the_sum_of_canonical_correlations_and_differentiable():
    gen = torch.Generator().manual_seed(0)
    h1 = torch.randn(500, 3, generator=gen, requires_grad=True)
    h2 = torch.cat([h1.detach()[:, :1] + 0.1 * torch.randn(500, 1, generator=gen), torch.randn(500, 2, generator=gen)], 1)
    corr = total_correlation(h1, h2, ridge=1e-6)
    assert corr.item() == pytest.approx(fit_cca(h1.detach(), h2, 1e-6).corrs.sum().item(), abs=1e-3)
    corr.backward()
    assert h1.grad.abs().sum() > 0


def test_every_registered_baseline_builds():
    for name in BASELINES:
        assert build_baseline(name).name == name
    with pytest.raises(ValueError):
        build_baseline("nope")


def store_toy_features(toy, cache_root, data_dir) -> None:
    """The toy splits where load_features finds the features of `data_dir` (the project's one cache format)."""
    for name, split in zip(("train", "validation", "test"), toy):
        path = split_file(cache_root, feature_key(data_dir), name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(split.to_dict(), path)


def test_features_cache_round_trip_and_no_extraction_when_cached(tmp_path, toy):
    train, _, test = toy
    data_dir = tmp_path / "flickr-toy"
    store_toy_features(toy, tmp_path / "cache", data_dir)
    loaded = load_features(data_dir, cache_root=tmp_path / "cache")  # the data dir does not even exist
    torch.testing.assert_close(loaded["test"].texts, test.texts)
    assert loaded["train"].text_to_image.tolist() == train.text_to_image.tolist()
    assert feature_key(data_dir) != feature_key(data_dir, image_size=128)


def test_compare_command_writes_table_and_json_with_main_runs(tmp_path, toy):
    data_dir = tmp_path / "flickr-toy"
    store_toy_features(toy, tmp_path / "cache", data_dir)
    run = tmp_path / "outputs" / "main-run"
    run.mkdir(parents=True)
    main_metrics = {k: 50.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
    main_metrics.update(i2t_medr=2.0, i2t_meanr=3.0, t2i_medr=2.0, t2i_meanr=3.0, rsum=300.0)
    (run / "metrics.json").write_text(json.dumps({"test": main_metrics, "train_seconds": 12.0, "best_epoch": 3}))
    from dualencoder.baselines.compare import main

    out = tmp_path / "BASELINES.md"
    results = main(["--data", str(data_dir), "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
                    "--baselines", "linear-cca", "infonce-mlp-heads", "--epochs", "2", "--main_runs", str(run)])
    assert list(results) == ["linear-cca", "infonce-mlp-heads", "main-run"]
    page = out.read_text()
    assert "| linear-cca |" in page and "| main-run |" in page and "RSUM" in page
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"]["main-run"]["test"]["rsum"] == 300.0
    assert saved["results"]["linear-cca"]["test"]["rsum"] > 3 * CHANCE_RSUM
    # --reuse: the baselines come from the JSON, nothing is refitted, and the features are not even
    # loaded (the cache is gone and the data dir never existed)
    saved["results"]["linear-cca"]["test"]["rsum"] = 123.0
    out.with_suffix(".json").write_text(json.dumps(saved))
    shutil.rmtree(tmp_path / "cache")
    again = main(["--data", str(data_dir), "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
                  "--baselines", "linear-cca", "--reuse"])
    assert again["linear-cca"]["test"]["rsum"] == 123.0 and "--reuse" not in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["image_dim"] == \
        saved["meta"]["image_dim"]


@pytest.mark.parametrize("pairs", [2, 6])
def test_deep_cca_with_fewer_training_pairs_than_its_dimensions_is_refused_naming_the_minimum(pairs):
    """Two pairs ended in a linalg.eigh traceback; six fitted canonical correlations of 1 that mean nothing."""
    from dualencoder.baselines import TooFewPairs

    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(pairs, 8, generator=generator), torch.randn(pairs, 8, generator=generator)
    with pytest.raises(TooFewPairs, match=f"deep-cca needs at least 7 training images with a caption, got {pairs}"):
        DeepCCA(6, 32, 32, options=TrainOptions(epochs=1, batch_size=512)).fit(images, texts)
