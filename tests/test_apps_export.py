"""ONNX export of both towers: the graphs match PyTorch, take any batch and sequence length, and serve the apps."""

import json

import numpy as np
import onnxruntime
import pytest
import torch

from dualencoder.apps import classify as classify_app
from dualencoder.apps import export as export_app
from dualencoder.apps import index as index_app
from dualencoder.apps import query as query_app
from dualencoder.apps.encoders import EXPORT_RECORD, IMAGE_GRAPH, ONNX_SUBDIR, TEXT_GRAPH, OnnxEncoder, TorchEncoder
from modeling_dualencoder import DualEncoderModel
from tests.apps_helpers import photo, save_tiny_app_model, write_photos
from tests.tiny import tiny_vit_distilbert_config

ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model_dir = save_tiny_app_model(tmp_path_factory.mktemp("model"), image_flip_average=True, vision_chunk_size=2)
    record = export_app.main(["--model_dir", model_dir])
    return model_dir, record


def test_export_writes_two_graphs_and_records_the_check(exported):
    model_dir, record = exported
    folder = f"{model_dir}/{ONNX_SUBDIR}"
    assert json.loads(open(f"{folder}/{EXPORT_RECORD}").read()) == record
    assert max(record["max_abs_diff"].values()) <= ATOL
    image = onnxruntime.InferenceSession(f"{folder}/{IMAGE_GRAPH}")
    text = onnxruntime.InferenceSession(f"{folder}/{TEXT_GRAPH}")
    assert [i.name for i in image.get_inputs()] == ["pixel_values"]
    assert [o.name for o in image.get_outputs()] == ["image_embeds"]
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in text.get_outputs()] == ["text_embeds"]


def test_the_graphs_match_pytorch_at_other_batch_sizes_and_lengths(exported):
    """Checked here independently of the export's own check, at shapes it did not trace."""
    model_dir, _ = exported
    model = DualEncoderModel.from_pretrained(model_dir).eval()
    folder = f"{model_dir}/{ONNX_SUBDIR}"
    image = onnxruntime.InferenceSession(f"{folder}/{IMAGE_GRAPH}")
    text = onnxruntime.InferenceSession(f"{folder}/{TEXT_GRAPH}")
    generator = torch.Generator().manual_seed(3)
    for batch, length in ((1, 3), (5, 17)):
        pixels = torch.randn(batch, 3, 32, 32, generator=generator)
        ids = torch.randint(0, 1000, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        with torch.no_grad():
            image_ref = model.get_image_features(pixels).numpy()  # with flip averaging, in chunks of 2
            text_ref = model.get_text_features(ids, mask).numpy()
        image_out = image.run(None, {"pixel_values": pixels.numpy()})[0]
        text_out = text.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert image_out.shape == (batch, 16) and text_out.shape == (batch, 16)
        assert np.abs(image_out - image_ref).max() <= ATOL
        assert np.abs(text_out - text_ref).max() <= ATOL
        np.testing.assert_allclose(np.linalg.norm(image_out, axis=1), 1.0, atol=1e-5)  # normalised inside


def test_the_onnx_encoder_agrees_with_pytorch_and_indexes_photos(exported, tmp_path):
    model_dir, _ = exported
    onnx, torch_encoder = OnnxEncoder(model_dir), TorchEncoder(model_dir, "cpu")
    images, texts = [photo("red"), photo("blue", size=(20, 50))], ["a red square", "a much longer description of blue"]
    assert np.abs(onnx.embed_images(images) - torch_encoder.embed_images(images)).max() <= ATOL
    assert np.abs(onnx.embed_texts(texts) - torch_encoder.embed_texts(texts)).max() <= ATOL

    write_photos(tmp_path / "photos", {"r.png": "red", "g.png": "green", "b.png": "blue"})
    index_app.main(["--model_dir", model_dir, "--images", str(tmp_path / "photos"), "--index_dir",
                    str(tmp_path / "idx"), "--backend", "onnx", "--quiet"])
    by_onnx = query_app.main(["--index_dir", str(tmp_path / "idx"), "--text", "green", "--backend", "onnx"])
    by_torch = query_app.main(["--index_dir", str(tmp_path / "idx"), "--text", "green"])
    assert [hit[0] for hit in by_onnx] == [hit[0] for hit in by_torch]
    np.testing.assert_allclose([h[2] for h in by_onnx], [h[2] for h in by_torch], atol=ATOL)

    classified = {backend: classify_app.main(["--model_dir", model_dir, "--images", str(tmp_path / "photos"), "--labels",
                                              "red,green,blue", "--backend", backend, "--quiet"])["predictions"]
                  for backend in ("onnx", "torch")}
    assert [p["label"] for p in classified["onnx"]] == [p["label"] for p in classified["torch"]]
    np.testing.assert_allclose([p["score"] for p in classified["onnx"]], [p["score"] for p in classified["torch"]],
                               atol=ATOL)


def test_an_export_of_an_older_model_is_refused(tmp_path):
    model_dir = save_tiny_app_model(tmp_path / "model")
    with pytest.raises(SystemExit, match="no ONNX export"):
        OnnxEncoder(model_dir)
    export_app.main(["--model_dir", model_dir])
    torch.manual_seed(5)
    DualEncoderModel(DualEncoderModel.from_pretrained(model_dir).config).save_pretrained(model_dir)  # retrained
    with pytest.raises(SystemExit, match="export it again"):
        OnnxEncoder(model_dir)


def test_an_hf_vision_tower_exports_too(tmp_path):
    """ViT + DistilBERT (HF towers, CLS pooling) as well as timm + DistilBERT."""
    from dualencoder.processing import build_processor
    from dualencoder.processing import load_tokenizer

    torch.manual_seed(0)
    config = tiny_vit_distilbert_config(text_model_name_or_path="offline:all-minilm-l6-v2")
    config.text_config.vocab_size = 30522
    model = DualEncoderModel(config)
    model.save_pretrained(tmp_path)
    build_processor(config, tokenizer=load_tokenizer("offline:all-minilm-l6-v2")).save_pretrained(tmp_path)
    record = export_app.export_onnx(tmp_path)
    assert max(record["max_abs_diff"].values()) <= ATOL
