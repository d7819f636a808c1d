"""The pixel store: pre-resized uint8 images in one Arrow file, read instead of decoding image files."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data_scripts import ImageTransform, PixelStore, build_pixel_store, load_image_caption_dataset, undecoded_images
from data_scripts.pixel_store import shrink
from tests.test_data_flickr8k import _name, make_official
from tests.test_data_preprocessing import vit_processor


@pytest.fixture
def flickr(tmp_path):
    """The tiny official layout, its 10 images replaced by 40x30 gradients (JPEG), so resizing shows."""
    root = make_official(tmp_path / "flickr")
    for i in range(10):
        y, x = np.mgrid[0:30, 0:40]
        pixels = np.stack([x * 6, y * 8, (x + y + 20 * i) % 256], axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(root / "Flicker8k_Dataset" / _name(i), format="JPEG", quality=95)
    return root


def test_the_store_holds_each_image_file_once_shrunk_to_its_shorter_side(flickr, tmp_path):
    splits = load_image_caption_dataset(str(flickr))  # pair view: five rows per image
    store = build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    assert len(store) == 10
    opened = splits["train"][0]["image"]  # a PIL image datasets decoded from its file
    assert undecoded_images(splits["train"])[0]["image"] == {"bytes": None, "path": opened.filename}  # not decoded
    image = store.image(opened)
    assert image.mode == "RGB" and image.size == (20, 15)  # 40x30 -> shorter side 15, aspect kept
    reference = Image.open(splits["train"][0]["image"].filename).convert("RGB").resize((20, 15), Image.BICUBIC)
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1
    big = build_pixel_store(splits.values(), 100, tmp_path / "store", show_progress=False)
    assert big.image({"path": image_path(flickr, 0), "bytes": None}).size == (40, 30)  # never enlarged


def image_path(root, i):
    return str(root / "Flicker8k_Dataset" / _name(i))


def test_a_transform_with_the_store_gives_the_pixels_of_decoding_the_file(flickr, tmp_path):
    splits = load_image_caption_dataset(str(flickr))
    store = build_pixel_store(splits.values(), 64, tmp_path / "store", show_progress=False)  # stored at full size
    plain, stored = (ImageTransform(vit_processor(16), train=False, pixel_store=s) for s in (None, store))
    batch = splits["test"][:4]
    assert torch.equal(torch.stack(plain(batch)["pixel_values"]), torch.stack(stored(batch)["pixel_values"]))
    assert "pixel_store=PixelStore(" in repr(stored)

    # the training crop draws from the stored pixels: same shape, and the image's colours
    train = ImageTransform(vit_processor(16), train=True, pixel_store=store)
    assert train(batch)["pixel_values"][0].shape == (3, 16, 16)


def test_a_store_is_reused_and_a_new_size_or_changed_file_builds_another(flickr, tmp_path):
    splits = load_image_caption_dataset(str(flickr))
    first = build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    written = os.stat(first.file).st_mtime_ns
    again = build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    assert again.file == first.file and os.stat(again.file).st_mtime_ns == written
    assert build_pixel_store(splits.values(), 20, tmp_path / "store", show_progress=False).file != first.file
    Image.new("RGB", (40, 30), "red").save(image_path(flickr, 3), format="JPEG")  # an image file changes
    changed = build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    assert changed.file != first.file
    assert np.asarray(changed.image({"path": image_path(flickr, 3)}))[0, 0, 0] > 200  # red now
    assert not [name for name in os.listdir(tmp_path / "store") if ".partial" in name]  # only finished stores


def test_an_image_from_no_file_decodes_as_usual_and_an_unknown_file_is_an_error(flickr, tmp_path):
    splits = load_image_caption_dataset(str(flickr))
    store = build_pixel_store([splits["train"]], 15, tmp_path / "store", show_progress=False)
    assert store.image(Image.new("RGB", (4, 4))) is None  # in memory: nothing to look up
    assert store.image({"bytes": b"...", "path": "x.png"}) is None  # embedded bytes
    with pytest.raises(KeyError, match=_name(9) + ".*not in the pixel store.*pixel_store_size"):
        store.image({"path": image_path(flickr, 9)})  # a test image; this store holds the training split's


def test_a_store_pickles_as_its_file_name_for_dataloader_workers(flickr, tmp_path):
    splits = load_image_caption_dataset(str(flickr))
    store = build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    store.image({"path": image_path(flickr, 0)})  # opens the columns
    payload = pickle.dumps(store)
    assert len(payload) < 1000
    copy = pickle.loads(payload)
    assert isinstance(copy, PixelStore) and len(copy) == 10
    assert np.array_equal(np.asarray(copy.image({"path": image_path(flickr, 5)})),
                          np.asarray(store.image({"path": image_path(flickr, 5)})))


def test_data_that_embeds_its_images_has_nothing_to_store(tmp_path):
    from data_scripts import build_synthetic_dataset

    splits = build_synthetic_dataset(num_images=12, image_size=16)
    with pytest.raises(ValueError, match="pixel_store_size at 0"):
        build_pixel_store(splits.values(), 16, tmp_path / "store", show_progress=False)
    with pytest.raises(ValueError, match="positive"):
        build_pixel_store(splits.values(), 0, tmp_path / "store")


def test_shrinking_a_large_jpeg_decodes_it_at_reduced_scale_yet_never_below_the_size(tmp_path):
    path = tmp_path / "big.jpg"
    y, x = np.mgrid[0:400, 0:600]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(path, quality=95)
    assert shrink(str(path), 90).shape == (90, 135, 3)


def test_training_with_the_store_reads_it_and_trains_exactly_as_decoding_the_files(flickr, tmp_path, caplog,
                                                                                   monkeypatch):
    """run_contrastive.py --pixel_store_size builds the store once in feature_cache_dir; with images no
    larger than the size, the stored pixels are the decoded ones, so the run is the same."""
    import run_contrastive
    from safetensors.torch import load_file
    from tests.test_training import tiny_run_args
    from tests.tiny import save_tiny_model_dir

    import datasets

    caplog.set_level("INFO")
    decoded = []  # every image datasets decodes from its file
    decode = datasets.Image.decode_example
    monkeypatch.setattr(datasets.Image, "decode_example", lambda self, *a, **k: decoded.append(1) or decode(self, *a, **k))
    model_dir = save_tiny_model_dir(tmp_path / "model")
    common = ["--dataset", str(flickr), "--num_train_epochs", "1", "--augment", "true"]
    plain = run_contrastive.main(tiny_run_args(model_dir, tmp_path / "plain", *common))
    assert len(decoded) > 10
    decoded.clear()
    stored = run_contrastive.main(tiny_run_args(model_dir, tmp_path / "stored", *common, "--pixel_store_size", "64",
                                                "--feature_cache_dir", str(tmp_path / "cache")))
    assert decoded == []  # training and evaluation read the store only
    assert "pixel store: PixelStore(" in caplog.text
    assert len(list((tmp_path / "cache").glob("pixels-64px-*.arrow"))) == 1
    assert stored["test"] == pytest.approx(plain["test"])
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "stored" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_images_turned_by_their_exif_tag_are_stored_upright_as_datasets_decodes_them(flickr, tmp_path):
    path = image_path(flickr, 2)
    y, x = np.mgrid[0:30, 0:40]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(np.stack([x * 6, y * 8, x * 0], -1).astype(np.uint8)).save(path, format="JPEG", exif=exif)
    splits = load_image_caption_dataset(str(flickr))
    decoded = [row["image"] for row in splits["train"] if row["image_id"] == _name(2)][0]
    assert decoded.size == (30, 40)  # datasets turns it upright
    store = build_pixel_store(splits.values(), 64, tmp_path / "store", show_progress=False)
    assert store.image({"path": path}).size == (30, 40)
    assert np.array_equal(np.asarray(store.image({"path": path})), np.asarray(decoded.convert("RGB")))
    transform = ImageTransform(vit_processor(16), train=False)  # the undecoded path turns it too
    assert torch.equal(transform.pixels({"path": path, "bytes": None}), transform.pixels(decoded))


def test_a_file_the_store_cannot_decode_is_named_with_what_to_do(flickr, tmp_path):
    splits = load_image_caption_dataset(str(flickr))
    path = image_path(flickr, 4)
    with open(path, "wb") as handle:  # damaged after the data set was loaded and checked
        handle.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(OSError, match=_name(4) + ".*cannot decode it for the pixel store.*on_bad_image: skip"):
        build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    assert not list((tmp_path / "store").glob("*"))  # no partial store left behind


def test_cached_vision_features_are_rebuilt_when_an_image_file_changes_or_the_store_is_switched_on(flickr, tmp_path):
    import run_contrastive
    from tests.test_training import tiny_run_args
    from tests.tiny import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model")
    cache = tmp_path / "cache"

    def run(name, *extra):
        run_contrastive.main(tiny_run_args(model_dir, tmp_path / name, "--dataset", str(flickr), "--num_train_epochs",
                                           "1", "--vision_train", "frozen", "--feature_cache_dir", str(cache), *extra))
        return {path.name for path in cache.glob("vision-*.pt")}

    first = run("a")
    assert len(first) == 1 and run("b") == first  # same files, same settings: reused
    Image.new("RGB", (40, 30), "red").save(image_path(flickr, 7), format="JPEG")
    changed = run("c")
    assert len(changed) == 2  # a replaced image file is never answered with its old features
    assert len(run("d", "--pixel_store_size", "20")) == 3  # nor are pixels from a 20 px store


def test_a_partial_store_left_by_a_killed_build_is_removed_by_the_next_build(flickr, tmp_path):
    import subprocess
    import sys

    splits = load_image_caption_dataset(str(flickr))
    store = build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    os.remove(store.file)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{store.file}.partial-{int(dead.stdout)}"  # that process has exited
    unknown = f"{store.file}.partial-{os.getpid()}-other"  # not a pid: left alone
    for path in (stale, unknown):
        open(path, "wb").close()
    build_pixel_store(splits.values(), 15, tmp_path / "store", show_progress=False)
    assert os.path.exists(store.file) and not os.path.exists(stale) and os.path.exists(unknown)
