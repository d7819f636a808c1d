"""Tests for dualencoder/metrics.py and the metrics/retrieval_recall evaluate module."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dualencoder.metrics import (
    format_metrics_table,
    metrics_from_ranks,
    ranks_from_similarity,
    retrieval_metrics,
    retrieval_ranks,
)

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "metrics" / "retrieval_recall"
KEYS = [
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum",
]


def brute_force_ranks(sim, text_to_image):
    """The protocol written as plainly as possible, to check the vectorised code against."""
    sim = np.asarray(sim, dtype=np.float64)
    t2i = np.asarray(text_to_image)
    ni, nt = sim.shape
    i2t_ranks = []
    for i in range(ni):
        correct = [j for j in range(nt) if t2i[j] == i]
        best = max(sim[i, j] for j in correct)
        i2t_ranks.append(1 + sum(1 for j in range(nt) if t2i[j] != i and sim[i, j] >= best))
    t2i_ranks = []
    for j in range(nt):
        target = sim[t2i[j], j]
        t2i_ranks.append(1 + sum(1 for i in range(ni) if i != t2i[j] and sim[i, j] >= target))
    return np.array(i2t_ranks), np.array(t2i_ranks)


def integer_embeddings(n, d, seed):
    # small integers: dot products are exact in float32 whatever the chunking, and ties are common
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).float()


# ------------------------------------------------------------------------------------------
# ranks on hand-built matrices
# ------------------------------------------------------------------------------------------


def test_hand_built_ranks_two_captions_per_image():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2],  # image 0: captions 0, 1 -> caption 0 is top -> rank 1
            [0.8, 0.7, 0.6, 0.3],  # image 1: captions 2, 3 -> best 0.6 beaten by 0.8, 0.7 -> rank 3
        ]
    )
    i2t, t2i = ranks_from_similarity(sim, [0, 0, 1, 1])
    assert i2t.tolist() == [1, 3]
    # columns: [0.9,0.8]->img0 r1; [0.1,0.7]->img0 r2; [0.5,0.6]->img1 r1; [0.2,0.3]->img1 r1
    assert t2i.tolist() == [1, 2, 1, 1]
    assert i2t.dtype == torch.long and t2i.dtype == torch.long


def test_image_to_text_uses_best_of_its_captions():
    # image 0 has captions 0 (poorly ranked) and 2 (ranked first): rank is 1
    sim = torch.tensor([[0.0, 0.5, 0.9, 0.4], [0.3, 0.2, 0.1, 0.8]])
    i2t, _ = ranks_from_similarity(sim, [0, 1, 0, 1])
    assert i2t.tolist() == [1, 1]


def test_ties_count_against_the_model():
    # a wrong candidate with exactly the correct score pushes the rank down
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.3, 0.9]])
    i2t, t2i = ranks_from_similarity(sim, [0, 1, 1])
    assert i2t.tolist() == [2, 1]  # image 0: caption 1 (wrong) ties caption 0
    assert t2i.tolist() == [1, 2, 1]  # text 1: image 0 (0.5) beats image 1 (0.3)

    # several correct captions tied with each other do not hurt
    i2t, _ = ranks_from_similarity(torch.tensor([[0.7, 0.7, 0.1], [0.0, 0.0, 0.5]]), [0, 0, 1])
    assert i2t.tolist() == [1, 1]


def test_constant_similarity_gets_zero_recall():
    ni, per = 20, 5
    t2i = torch.arange(ni).repeat_interleave(per)
    i2t, t2i_ranks = ranks_from_similarity(torch.zeros(ni, ni * per), t2i)
    assert (i2t == 1 + (ni - 1) * per).all()  # every wrong caption ties
    assert (t2i_ranks == ni).all()
    m = metrics_from_ranks(i2t, t2i_ranks)
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0 and m["rsum"] == 0.0

    # same through embeddings: every image and text identical
    emb = torch.ones(ni, 4) / 2
    m = retrieval_metrics(emb, torch.ones(ni * per, 4) / 2, t2i, device="cpu")
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0


def test_matches_brute_force_with_many_ties():
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 4, size=(7, 23)).astype(np.float32)  # heavy ties
    t2i = np.concatenate([np.arange(7), rng.integers(0, 7, size=16)])
    i2t, t2i_r = ranks_from_similarity(sim, t2i)
    ref_i2t, ref_t2i = brute_force_ranks(sim, t2i)
    assert i2t.tolist() == ref_i2t.tolist()
    assert t2i_r.tolist() == ref_t2i.tolist()
    # one direction alone (a re-ranker scores each direction in its own matrix): the same ranks, the other None
    only_i2t, none = ranks_from_similarity(sim, t2i, which="i2t")
    none_too, only_t2i = ranks_from_similarity(sim, t2i, which="t2i")
    assert only_i2t.tolist() == ref_i2t.tolist() and only_t2i.tolist() == ref_t2i.tolist()
    assert none is None and none_too is None
    with pytest.raises(ValueError, match="which"):
        ranks_from_similarity(sim, t2i, which="i2i")


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunking_does_not_change_ranks(chunk_size):
    images = integer_embeddings(13, 6, seed=1)
    t2i = torch.arange(13).repeat_interleave(5)[:61]  # image 12 gets 1 caption: uneven groups
    texts = integer_embeddings(61, 6, seed=2)
    full = ranks_from_similarity(images @ texts.T, t2i, chunk_size=10_000)
    ref = brute_force_ranks((images @ texts.T).numpy(), t2i.numpy())
    assert full[0].tolist() == ref[0].tolist() and full[1].tolist() == ref[1].tolist()

    chunked_sim = ranks_from_similarity(images @ texts.T, t2i, chunk_size=chunk_size)
    chunked_emb = retrieval_ranks(images, texts, t2i, chunk_size=chunk_size, device="cpu")
    for got in (chunked_sim, chunked_emb):
        assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])


def test_perfect_retrieval():
    images = torch.eye(6)
    texts = torch.eye(6).repeat_interleave(2, dim=0)
    m = retrieval_metrics(images, texts, torch.arange(6).repeat_interleave(2), device="cpu")
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0


# ------------------------------------------------------------------------------------------
# metrics dict
# ------------------------------------------------------------------------------------------


def test_metrics_keys_and_values():
    i2t = torch.tensor([1, 2, 6, 11])
    t2i = torch.tensor([1, 1, 1, 3, 20])
    m = metrics_from_ranks(i2t, t2i)
    assert list(m) == KEYS
    assert all(isinstance(v, float) for v in m.values())
    assert m["i2t_r1"] == 25.0 and m["i2t_r5"] == 50.0 and m["i2t_r10"] == 75.0
    assert m["i2t_medr"] == 4.0  # plain median of an even count: (2 + 6) / 2, no flooring
    assert m["i2t_meanr"] == 5.0
    assert m["t2i_r1"] == 60.0 and m["t2i_r5"] == 80.0 and m["t2i_r10"] == 80.0
    assert m["t2i_medr"] == 1.0 and m["t2i_meanr"] == 5.2
    assert m["rsum"] == pytest.approx(25 + 50 + 75 + 60 + 80 + 80)


def test_extra_ks_add_keys_but_rsum_stays_standard():
    m = metrics_from_ranks(torch.tensor([1, 30]), torch.tensor([2, 60]), ks=(1, 50))
    assert set(KEYS) <= set(m) and {"i2t_r50", "t2i_r50"} <= set(m)
    assert m["i2t_r50"] == 100.0 and m["t2i_r50"] == 50.0
    assert m["rsum"] == m["i2t_r1"] + m["i2t_r5"] + m["i2t_r10"] + m["t2i_r1"] + m["t2i_r5"] + m["t2i_r10"]


def test_accepts_numpy_and_low_precision_dtypes():
    images = integer_embeddings(5, 4, seed=3)
    texts = integer_embeddings(10, 4, seed=4)
    t2i = np.arange(10) // 2
    ref = retrieval_metrics(images, texts, t2i, device="cpu")
    for img, txt in [
        (images.numpy().astype(np.float64), texts.numpy().astype(np.float64)),
        (images.half(), texts.half()),
        (images.bfloat16(), texts.bfloat16()),
        (images.int(), texts.int()),
    ]:
        assert retrieval_metrics(img, txt, torch.from_numpy(t2i), device="cpu") == ref


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text_to_image=[0, 1, 3]), r"text_to_image\[2\] = 3 is out of range.*3 images"),
        (dict(text_to_image=[0, -1, 2]), r"text_to_image\[1\] = -1 is out of range"),
        (dict(text_to_image=[0, 1]), r"one image index per text \(3 texts\)"),
        (dict(text_to_image=[0.0, 1.0, 2.0]), "integer image indices"),
        (dict(text_to_image=[0, 0, 1]), r"no text in text_to_image \(first: \[2\]\)"),
        (dict(texts=torch.ones(3, 5)), "same embedding size.*4.*5"),
        (dict(images=torch.ones(3)), r"image_embeds must be a 2-D array"),
        (dict(images=torch.full((3, 4), float("nan"))), "NaN"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
    ],
)
def test_validation_errors(kwargs, message):
    args = dict(images=torch.ones(3, 4), texts=torch.ones(3, 4), text_to_image=[0, 1, 2], chunk_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        retrieval_ranks(
            args["images"], args["texts"], args["text_to_image"], chunk_size=args["chunk_size"], device="cpu"
        )


def test_similarity_validation_errors():
    with pytest.raises(ValueError, match="out of range"):
        ranks_from_similarity(torch.zeros(2, 3), [0, 1, 2])
    with pytest.raises(ValueError, match=r"3 texts"):
        ranks_from_similarity(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="ks must be positive integers"):
        metrics_from_ranks([1], [1], ks=(0,))
    with pytest.raises(ValueError, match=r"whole numbers from 1.*\[1.5\]"):
        metrics_from_ranks(torch.tensor([1.0, 1.5]), [1])  # an averaged tie rank would be floored to a hit
    with pytest.raises(ValueError, match="whole numbers from 1"):
        metrics_from_ranks([0, 1], [1])


# ------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------


def test_format_metrics_table():
    m = metrics_from_ranks(torch.tensor([1, 2]), torch.tensor([1, 7]))
    single = format_metrics_table(m)
    lines = single.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| run |") and "RSUM" in lines[0]
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 13
    assert "| model | 50.0 | 100.0 | 100.0 | 1.5 | 1.5 |" in lines[2]

    many = format_metrics_table({"zero-shot": m, "fine-tuned": {**m, "i2t_r50": 100.0}}, precision=2)
    lines = many.splitlines()
    assert len(lines) == 4 and "I→T R@50" in lines[0]
    assert lines[2].startswith("| zero-shot |") and "| - |" in lines[2]  # missing value
    assert lines[3].startswith("| fine-tuned |") and "50.00" in lines[3]
    with pytest.raises(ValueError):
        format_metrics_table({})


# ------------------------------------------------------------------------------------------
# evaluate module
# ------------------------------------------------------------------------------------------


def test_evaluate_module_similarity_config_matches_library():
    evaluate = pytest.importorskip("evaluate")
    rng = np.random.default_rng(5)
    images = rng.normal(size=(9, 8)).astype(np.float32)
    texts = rng.normal(size=(27, 8)).astype(np.float32)
    t2i = np.repeat(np.arange(9), 3)
    rng.shuffle(t2i)
    expected = retrieval_metrics(images, texts, t2i, device="cpu")

    metric = evaluate.load(str(MODULE_DIR))
    sim = images @ texts.T
    refs = [np.flatnonzero(t2i == i).tolist() for i in range(9)]
    metric.add_batch(predictions=sim[:4], references=refs[:4])  # rows may come in batches
    got = metric.compute(predictions=sim[4:], references=refs[4:])
    assert list(got) == KEYS
    assert got == pytest.approx(expected)

    with pytest.raises(ValueError, match="exactly one image"):
        metric.compute(predictions=sim[:2], references=[[0, 1], [1]])


def test_evaluate_module_embeddings_config_matches_library():
    evaluate = pytest.importorskip("evaluate")
    images = integer_embeddings(6, 5, seed=7).numpy()
    texts = integer_embeddings(18, 5, seed=8).numpy()
    t2i = np.arange(18) % 6
    expected = retrieval_metrics(images, texts, t2i, ks=(1, 5, 10, 15), device="cpu")
    metric = evaluate.load(str(MODULE_DIR), "embeddings")
    got = metric.compute(predictions=texts, references=t2i, image_embeds=images, ks=(1, 5, 10, 15), device="cpu")
    assert got == expected


def test_evaluate_module_finds_repo_through_env_var(tmp_path):
    pytest.importorskip("evaluate")
    # Outside the repo, with the repo off sys.path: only DUALENCODER_ROOT can lead to it. `python -S` and the
    # packages' folder added by hand: no .pth file runs, so an editable install of this project is not seen either.
    # One subprocess (importing evaluate costs seconds): first a wrong root, then the right one.
    code = f"""
import sys, sysconfig
sys.path.append(sysconfig.get_paths()["purelib"])
import os, evaluate
os.environ["DUALENCODER_ROOT"] = {str(tmp_path)!r}
try:
    evaluate.load({str(MODULE_DIR)!r})
except ImportError as error:
    print("ERROR:", str(error).replace("\\n", " "))
os.environ["DUALENCODER_ROOT"] = {str(ROOT)!r}
m = evaluate.load({str(MODULE_DIR)!r})
print(m.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[[0], [1]])["rsum"])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DUALENCODER_ROOT")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("ERROR:") and "DUALENCODER_ROOT" in lines[0] and "could not be imported" in lines[0]
    assert lines[-1] == "600.0"


def test_pick_device_prefers_cuda_only_when_asked_to_choose(monkeypatch):
    from dualencoder.devices import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    assert pick_device("auto") == torch.device("cuda")
    # A device named by the caller is taken as it is, whatever is available.
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
