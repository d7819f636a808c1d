"""Kernel CCA (Nyström RBF maps + linear CCA): what it finds that linear CCA cannot, and what it costs."""

import json

import torch

from dualencoder.baselines import BASELINES, KernelCCA, LinearCCA, SplitFeatures, build_baseline
from dualencoder.baselines.kernel_cca import NystroemRBF


def first_pair_correlation(model, x, y) -> float:
    """Correlation, on the rows given, of the first canonical variates of a fitted (kernel) CCA."""
    if isinstance(model, KernelCCA):
        x, y, fit = model.image_map(x), model.text_map(y), model.linear.fit_
    else:
        fit = model.fit_
    u = (x.double() - fit.mean_x) @ fit.proj_x[:, 0]
    v = (y.double() - fit.mean_y) @ fit.proj_y[:, 0]
    return torch.corrcoef(torch.stack([u, v]))[0, 1].abs().item()


def squared_pair(n, seed):
    """y's first coordinate is t^2, x's is t, t uniform on [-1, 1]: uncorrelated, yet fully dependent."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 - 1
    x = torch.stack([t, torch.randn(n, generator=g)], 1)
    y = torch.stack([t**2 + 0.05 * torch.randn(n, generator=g), torch.randn(n, generator=g)], 1)
    return x, y


def linear_pair(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.stack([x[:, 0] + 0.5 * x[:, 1], x[:, 2]], 1) + 0.7 * torch.randn(n, 2, generator=g)
    return x, y


def one_setting(width, rank=100, ridge=1e-1):
    return KernelCCA(widths=(width,), ranks=(rank,), ridges=(ridge,), dims=(8,), powers=(0.0,))


def test_kernel_cca_recovers_a_nonlinear_dependence_linear_cca_misses():
    x, y = squared_pair(600, seed=0)
    held_x, held_y = squared_pair(600, seed=1)
    linear = LinearCCA(ridges=(1e-3,), dims=(2,), powers=(0.0,)).fit(x, y)
    kernel = one_setting(width=1.0).fit(x, y)
    assert first_pair_correlation(linear, held_x, held_y) < 0.2
    assert first_pair_correlation(kernel, held_x, held_y) > 0.9


def test_a_nearly_linear_kernel_finds_linear_cca():
    x, y = linear_pair(600, seed=0)
    held_x, held_y = linear_pair(600, seed=1)
    linear = LinearCCA(ridges=(1e-3,), dims=(2,), powers=(0.0,)).fit(x, y)
    kernel = one_setting(width=30.0, ridge=1e-3).fit(x, y)
    assert abs(first_pair_correlation(kernel, held_x, held_y) - first_pair_correlation(linear, held_x, held_y)) < 0.01
    # and the same direction, not just the same strength: the two first variates agree on new rows
    fit = kernel.linear.fit_
    u_kernel = (kernel.image_map(held_x) - fit.mean_x) @ fit.proj_x[:, 0]
    u_linear = (held_x.double() - linear.fit_.mean_x) @ linear.fit_.proj_x[:, 0]
    assert torch.corrcoef(torch.stack([u_kernel, u_linear]))[0, 1].abs() > 0.99


def test_the_rank_bounds_the_map_and_its_state_whatever_the_number_of_rows():
    sizes = {}
    for n in (200, 2000):
        x = torch.randn(n, 16, generator=torch.Generator().manual_seed(n))
        feature_map = NystroemRBF(rank=32, width=1.0).fit(x)
        mapped = feature_map(x)
        assert mapped.shape[0] == n and mapped.shape[1] == feature_map.dim <= 32
        sizes[n] = feature_map.state_numel()
    assert sizes[200] == sizes[2000] <= 32 * 16 + 32 * 32 + 2 * 16


def test_the_map_approximates_the_rbf_kernel_on_its_landmarks():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    feature_map = NystroemRBF(rank=50, width=1.0).fit(x)  # every row a landmark: exact on the training rows
    mapped = feature_map(x)
    z = (x.double() - feature_map.mean) / feature_map.std
    kernel = torch.exp(-feature_map.gamma * torch.cdist(z, z) ** 2)
    torch.testing.assert_close(mapped @ mapped.T, kernel, atol=1e-6, rtol=0)


def test_dev_chooses_width_rank_and_ridge_and_the_contract_holds():
    g = torch.Generator().manual_seed(0)

    def split(n_images, seed):
        x, y = squared_pair(n_images * 2, seed)
        images = x[:n_images]
        texts = torch.cat([y[:n_images], y[:n_images] + 0.01 * torch.randn(n_images, 2, generator=g)])
        return SplitFeatures(images, texts, torch.arange(n_images).repeat(2))

    train, dev = split(200, 0), split(60, 1)
    model = build_baseline("kernel-cca")
    model.widths, model.ranks, model.ridges, model.dims, model.powers = (0.5, 4.0), (16, 64), (1e-2, 1.0), (2, 8), (0.0,)
    model.fit(train.images, train.texts, train.text_to_image, val=dev)
    assert "kernel-cca" in BASELINES
    assert {"width", "rank", "ridge", "k", "power", "val_rsum"} <= set(model.selected)
    assert len(model.history) == 2 * 2 * 2 * 2 * len(model.powers)
    assert model.selected["val_rsum"] == max(row["val_rsum"] for row in model.history)
    images, texts = model.embed_images(dev.images), model.embed_texts(dev.texts)
    assert images.shape[0] == 60 and texts.shape[0] == 120 and images.shape[1] == texts.shape[1]
    torch.testing.assert_close(images.norm(dim=1), torch.ones(60))
    assert model.train_seconds > 0


def toy_split(num_images: int, seed: int) -> SplitFeatures:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(6, 4, generator=torch.Generator().manual_seed(99))  # the same relation in every split
    images = torch.randn(num_images, 6, generator=g)
    text_to_image = torch.arange(num_images).repeat(2)
    texts = torch.tanh(images[text_to_image] @ mixing) + 0.1 * torch.randn(len(text_to_image), 4, generator=g)
    return SplitFeatures(images, texts, text_to_image)


def test_compare_adds_the_kernel_cca_row_to_a_saved_table_without_refitting_the_others(tmp_path):
    from dualencoder.baselines.compare import main
    from tests.test_baselines import store_toy_features

    data_dir, cache, out = tmp_path / "flickr-toy", tmp_path / "cache", tmp_path / "BASELINES.md"
    store_toy_features([toy_split(60 if name == "train" else 30, seed)
                        for name, seed in (("train", 0), ("validation", 1), ("test", 2))], cache, data_dir)
    common = ["--data", str(data_dir), "--out", str(out), "--cache_dir", str(cache)]
    main(common + ["--baselines", "linear-cca"])
    saved = json.loads(out.with_suffix(".json").read_text())
    saved["results"]["linear-cca"]["test"]["rsum"] = 123.0  # a refit would not give this
    saved["results"]["gone-run"] = {"test": dict(saved["results"]["linear-cca"]["test"], rsum=456.0),
                                    "kind": "main model", "selected": {}, "train_seconds": 1.0}
    out.with_suffix(".json").write_text(json.dumps(saved))
    results = main(common + ["--baselines", "linear-cca", "kernel-cca", "--reuse",
                             "--main_runs", str(tmp_path / "outputs" / "gone-run")])
    assert list(results) == ["linear-cca", "kernel-cca", "gone-run"]
    assert results["linear-cca"]["test"]["rsum"] == 123.0 and results["gone-run"]["test"]["rsum"] == 456.0
    assert {"width", "rank", "ridge"} <= set(results["kernel-cca"]["selected"])
    assert results["kernel-cca"]["train_seconds"] > 0
    page = out.read_text()
    assert "| kernel-cca |" in page and "| gone-run |" in page
