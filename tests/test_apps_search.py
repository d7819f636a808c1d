"""Search your photos: the index (incremental, tied to one model), the query command, the search backends, the server."""

import json
import os
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from dualencoder.apps import index as index_app
from dualencoder.apps import query as query_app
from dualencoder.apps.photo_index import INDEX_FILE, PhotoIndex
from dualencoder.apps.serve import HOST, make_server, serve
from dualencoder.apps.vector_search import FaissSearch, NumpySearch, build_search, faiss_available
from modeling_dualencoder import DualEncoderModel
from tests.apps_helpers import photo, save_tiny_app_model, write_photos

PHOTOS = {"red.png": "red", "blue.jpg": "blue", "trip/green.webp": "green", "trip/deeper/yellow.PNG": "yellow"}
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_app_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return save_tiny_app_model(tmp_path_factory.mktemp("other"), projection_dim=8)


@pytest.fixture(scope="module")
def indexed(model_dir, tmp_path_factory):
    """A folder of four photos (one in a sub-folder of a sub-folder) and one broken file, indexed once."""
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, PHOTOS)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image at all")
    index_dir = folder.parent / (folder.name + ".index")
    report = index_app.main(["--model_dir", model_dir, "--images", str(folder), "--index_dir", str(index_dir),
                             "--quiet"])
    return folder, index_dir, report


def test_index_embeds_every_image_recursively_and_names_the_unreadable_one(indexed, model_dir):
    folder, index_dir, report = indexed
    assert (report.added, report.changed, report.removed, report.unchanged) == (4, 0, 0, 0)
    assert len(report.skipped) == 1 and "broken.jpg" in report.skipped[0]
    index = PhotoIndex.load(index_dir)
    assert sorted(e["path"] for e in index.entries) == sorted(PHOTOS)
    # Each row is the model's own normalised embedding of that file.
    model = DualEncoderModel.from_pretrained(model_dir).eval()
    from dualencoder.apps.encoders import load_preprocessing
    image_processor, _ = load_preprocessing(model_dir)
    from dualencoder.apps.photos import open_rgb
    pixels = image_processor(images=[open_rgb(p) for p in index.paths()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixels).numpy()
    np.testing.assert_allclose(index.embeddings, expected, atol=1e-5)


def test_reindexing_embeds_only_new_and_changed_files_and_drops_removed_ones(tmp_path):
    folder = tmp_path / "photos"
    write_photos(folder, {"a.png": "red", "b.png": "blue", "c.png": "green"})
    embedded = []

    def embed(images):  # a stand-in model: counts what it is asked to embed
        embedded.extend(images)
        return np.array([np.asarray(im, np.float32).mean((0, 1)) for im in images], np.float32)

    index = PhotoIndex.open_or_create(tmp_path / "idx", folder, tmp_path, "fp")
    first = index.update(embed)
    index.save()
    assert (first.added, len(embedded)) == (3, 3)
    row_of_a = np.asarray(index.embeddings[[e["path"] for e in index.entries].index("a.png")])

    photo("yellow", seed=9).save(folder / "b.png")  # changed content (and size/mtime)
    os.utime(folder / "b.png", ns=(1, 1))
    (folder / "c.png").unlink()
    photo("green", seed=7).save(folder / "d.png")
    embedded.clear()
    index = PhotoIndex.open_or_create(tmp_path / "idx", folder, tmp_path, "fp")
    second = index.update(embed)
    index.save()
    assert (second.added, second.changed, second.removed, second.unchanged) == (1, 1, 1, 1)
    assert len(embedded) == 2  # b and d only
    reloaded = PhotoIndex.load(tmp_path / "idx")
    assert sorted(e["path"] for e in reloaded.entries) == ["a.png", "b.png", "d.png"]
    assert reloaded.embeddings.shape == (3, 3)
    np.testing.assert_array_equal(reloaded.embeddings[[e["path"] for e in reloaded.entries].index("a.png")], row_of_a)
    assert len(list((tmp_path / "idx").glob("embeddings-*.npy"))) == 1  # the old embeddings file is gone

    with pytest.raises(SystemExit, match="different model"):
        PhotoIndex.open_or_create(tmp_path / "idx", folder, tmp_path, "another model")
    assert PhotoIndex.open_or_create(tmp_path / "idx", folder, tmp_path, "another model", rebuild=True).entries == []


def test_a_second_run_of_the_command_embeds_nothing(indexed, model_dir):
    folder, index_dir, _ = indexed
    report = index_app.main(["--model_dir", model_dir, "--images", str(folder), "--index_dir", str(index_dir),
                             "--quiet"])
    assert (report.added, report.changed, report.removed, report.unchanged) == (0, 0, 0, 4)


def test_the_index_refuses_another_model_and_another_folder(indexed, other_model_dir, tmp_path):
    folder, index_dir, _ = indexed
    with pytest.raises(SystemExit, match="different model"):
        index_app.main(["--model_dir", other_model_dir, "--images", str(folder), "--index_dir", str(index_dir)])
    with pytest.raises(SystemExit, match="different model"):
        query_app.main(["--index_dir", str(index_dir), "--model_dir", other_model_dir, "--text", "red"])
    with pytest.raises(SystemExit, match="another --index_dir"):
        index_app.main(["--model_dir", json.loads((index_dir / INDEX_FILE).read_text())["model_dir"],
                        "--images", str(tmp_path), "--index_dir", str(index_dir)])


def test_query_by_photo_finds_that_photo_first(indexed, capsys):
    folder, index_dir, _ = indexed
    hits = query_app.main(["--index_dir", str(index_dir), "--image", str(folder / "trip" / "green.webp"),
                           "--top_k", "2"])
    assert len(hits) == 2
    assert hits[0][1] == folder / "trip" / "green.webp" and hits[0][2] == pytest.approx(1.0, abs=1e-4)
    assert hits[0][2] >= hits[1][2]
    assert str(folder / "trip" / "green.webp") in capsys.readouterr().out


@pytest.mark.parametrize("search", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_query_by_text_ranks_by_the_models_cosine_similarity(indexed, model_dir, search):
    _, index_dir, _ = indexed
    hits = query_app.main(["--index_dir", str(index_dir), "--text", "a red square", "--top_k", "3", "--search", search])
    index = PhotoIndex.load(index_dir)
    model = DualEncoderModel.from_pretrained(model_dir).eval()
    from dualencoder.apps.encoders import load_preprocessing
    _, tokenizer = load_preprocessing(model_dir)
    with torch.no_grad():
        text = model.get_text_features(**tokenizer(["a red square"], return_tensors="pt",
                                                   return_token_type_ids=False)).numpy()[0]
    scores = index.embeddings @ text
    expected = np.argsort(-scores)[:3]
    assert [row for row, _, _ in hits] == list(expected)
    np.testing.assert_allclose([score for _, _, score in hits], scores[expected], atol=1e-5)


@needs_faiss
def test_faiss_and_numpy_search_agree():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:4] + 0.01 * rng.normal(size=(4, 8)).astype(np.float32)
    (s1, r1), (s2, r2) = NumpySearch(vectors).top(queries, 5), FaissSearch(vectors).top(queries, 5)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert list(r1[:, 0]) == [0, 1, 2, 3]
    assert isinstance(build_search(vectors, "auto"), FaissSearch)
    assert NumpySearch(vectors).top(queries, 99)[1].shape == (4, 50)  # k is capped at the number of photos


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, None, b""


def test_the_server_answers_a_text_query_with_indexed_photos_only(indexed):
    folder, index_dir, _ = indexed
    search = query_app.PhotoSearch(index_dir)
    server = make_server(search, port=0)
    assert server.server_address[0] == HOST == "127.0.0.1"
    thread = threading.Thread(target=serve, args=(server, 30), daemon=True)
    thread.start()
    try:
        base = f"http://{HOST}:{server.server_address[1]}"
        status, kind, body = _get(base + "/?q=a+red+%3Cb%3Esquare&k=3")
        page = body.decode()
        assert status == 200 and kind.startswith("text/html")
        assert page.count('<img src="/photo/') == 3
        assert "&lt;b&gt;square" in page and "<b>square" not in page  # the query is escaped
        row = [entry["path"] for entry in search.index.entries].index("red.png")
        status, kind, body = _get(base + f"/photo/{row}")
        assert status == 200 and kind == "image/png" and body == (folder / "red.png").read_bytes()
        assert _get(base + "/?like=1&k=2")[2].decode().count('<img src="/photo/') == 2
        for bad in ("/photo/99", "/photo/..%2f..%2fetc%2fpasswd", "/etc/passwd"):
            assert _get(base + bad)[0] == 404
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_the_server_stops_by_itself(indexed):
    _, index_dir, _ = indexed
    server = make_server(query_app.PhotoSearch(index_dir), port=0)
    thread = threading.Thread(target=serve, args=(server, 0.5), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
