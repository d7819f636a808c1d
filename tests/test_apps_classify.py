"""Zero-shot classification: transformers' pipeline on an exported model dir, and the classify command."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualencoder.apps import classify as classify_app
from dualencoder.apps.classify import DEFAULT_TEMPLATES, class_embeddings, imagefolder_items, load_templates
from modeling_dualencoder import DualEncoderModel
from tests.apps_helpers import COLOURS, photo, save_tiny_app_model, write_photos


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_app_model(tmp_path_factory.mktemp("model"))


def test_the_zero_shot_pipeline_loads_an_exported_model_dir(model_dir):
    from transformers import pipeline

    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_dualencoder.DualEncoderModel"
    classifier = pipeline("zero-shot-image-classification", model=model_dir, trust_remote_code=True)
    labels = ["red", "blue", "green"]
    out = classifier(photo("red"), candidate_labels=labels, hypothesis_template="a photo of a {}.")
    assert sorted(o["label"] for o in out) == sorted(labels)
    assert sum(o["score"] for o in out) == pytest.approx(1.0, abs=1e-5)
    # Its scores are the model's: softmax over scale * cosine similarity of the image and each prompt.
    model = DualEncoderModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        pixels = classifier.image_processor(images=[photo("red")], return_tensors="pt")["pixel_values"]
        texts = classifier.tokenizer([f"a photo of a {label}." for label in labels], padding=True, return_tensors="pt")
        logits = model(pixel_values=pixels, input_ids=texts["input_ids"],
                       attention_mask=texts["attention_mask"]).logits_per_image[0]
    expected = dict(zip(labels, logits.softmax(-1).tolist()))
    for o in out:
        assert o["score"] == pytest.approx(expected[o["label"]], abs=1e-5)


class ColourEncoder:
    """A stand-in model that knows colours: an image is its mean RGB, a text the RGB of the colour it names."""

    backend = "fake"

    def __init__(self):
        self.texts = []

    def embed_images(self, images):
        vectors = np.array([np.asarray(im, np.float32).mean((0, 1)) for im in images])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def embed_texts(self, texts):
        self.texts += list(texts)
        vectors = np.array([next(np.array(rgb, np.float32) for name, rgb in COLOURS.items() if name in text)
                            for text in texts])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_class_embeddings_average_the_normalised_prompt_embeddings():
    class Fixed:
        def embed_texts(self, texts):  # prompts from template "a {}" -> e1, from "the {}" -> e2
            return np.array([[1.0, 0.0] if text.startswith("a ") else [0.0, 1.0] for text in texts], np.float32)

    out = class_embeddings(Fixed(), ["x", "y"], ["a {}", "the {}"])
    np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5]] * 2, atol=1e-6)


def test_classify_an_imagefolder_prints_predictions_and_accuracy(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "colours"
    write_photos(folder, {"red/1.png": "red", "red/2.jpg": "red", "blue/3.png": "blue", "green/4.webp": "green",
                          "green/5.png": "green"})
    (folder / "blue" / "broken.png").write_bytes(b"no")
    encoder = ColourEncoder()
    monkeypatch.setattr(classify_app, "load_encoder", lambda *args: encoder)
    out = classify_app.main(["--model_dir", "unused", "--imagefolder", str(folder), "--output_json",
                             str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    assert out["labels"] == ["blue", "green", "red"]
    assert out["accuracy"]["accuracy"] == 1.0 and out["accuracy"]["images"] == 5
    assert out["accuracy"]["chance"] == pytest.approx(1 / 3)
    assert "accuracy 100.0% (5/5 images, 3 labels); chance 33.3%" in printed
    assert "broken.png" in printed  # named and skipped
    assert set(encoder.texts) == {t.format(c) for t in DEFAULT_TEMPLATES for c in ("blue", "green", "red")}
    assert json.loads((tmp_path / "out.json").read_text())["accuracy"]["correct"] == 5


def test_accuracy_counts_wrong_predictions(tmp_path, monkeypatch):
    folder = tmp_path / "colours"
    write_photos(folder, {"red/1.png": "red", "blue/2.png": "red", "blue/3.png": "blue", "blue/4.png": "blue"})
    monkeypatch.setattr(classify_app, "load_encoder", lambda *args: ColourEncoder())
    out = classify_app.main(["--model_dir", "unused", "--imagefolder", str(folder), "--quiet"])
    assert (out["accuracy"]["correct"], out["accuracy"]["images"]) == (3, 4)
    assert out["accuracy"]["majority"] == 0.75  # always answering "blue"


def test_a_flat_folder_with_labels_and_a_templates_file(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", {"a.png": "yellow", "b.png": "blue"})
    (tmp_path / "templates.txt").write_text("# mine\na snapshot of {}\n\nsomething {}, drawn\n")
    encoder = ColourEncoder()
    monkeypatch.setattr(classify_app, "load_encoder", lambda *args: encoder)
    out = classify_app.main(["--model_dir", "unused", "--images", str(tmp_path / "photos"), "--labels", "blue, yellow",
                             "--templates", str(tmp_path / "templates.txt"), "--quiet"])
    assert {p["path"].rsplit("/", 1)[1]: p["label"] for p in out["predictions"]} == {"a.png": "yellow", "b.png": "blue"}
    assert "accuracy" not in out
    assert sorted(encoder.texts) == ["a snapshot of blue", "a snapshot of yellow", "something blue, drawn",
                                     "something yellow, drawn"]


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a cat\n")
    with pytest.raises(SystemExit, match="exactly one {}"):
        load_templates(tmp_path / "t.txt")
    with pytest.raises(SystemExit, match="one sub-folder of images per label"):
        imagefolder_items(tmp_path)
    with pytest.raises(SystemExit, match="at least two"):
        classify_app.main(["--model_dir", "x", "--images", str(tmp_path), "--labels", "cat"])


def test_the_command_runs_the_saved_model(model_dir, tmp_path):
    write_photos(tmp_path / "if", {"red/a.png": "red", "blue/b.png": "blue", "blue/c.png": "blue"})
    out = classify_app.main(["--model_dir", model_dir, "--imagefolder", str(tmp_path / "if"), "--quiet"])
    from dualencoder.apps.encoders import TorchEncoder

    encoder = TorchEncoder(model_dir, "cpu")
    scores = encoder.embed_images([Image.open(p["path"]).convert("RGB") for p in out["predictions"]]) @ \
        class_embeddings(encoder, ["blue", "red"], DEFAULT_TEMPLATES).T
    assert [p["label"] for p in out["predictions"]] == [["blue", "red"][i] for i in scores.argmax(1)]
    assert out["accuracy"]["images"] == 3 and out["accuracy"]["chance"] == 0.5
