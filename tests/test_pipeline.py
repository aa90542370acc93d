import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.errors import DatasetError
from bloodcell_lib.images import read_rgb
from bloodcell_lib.pipeline import (
    ROUTE_JPEG,
    ROUTE_PILLOW,
    ROUTE_TF,
    _finish_fn,
    augment_batch,
    augment_image,
    augment_params,
    decode_route,
    load_images,
    make_dataset,
)
from bloodcell_lib.predict import prepare_image

S = 32


def cell_image(rng, height, width):
    """A smooth, random RGB picture (so JPEG decoding and resizing have real work to do)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(40, 215, size=3)
    slope = rng.uniform(-120, 120, size=(2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def strip_adobe_marker(data: bytes) -> bytes:
    """Drop the APP14 'Adobe' segment of a JPEG, leaving a CMYK JPEG that TensorFlow decodes as black."""
    out, i = bytearray(data[:2]), 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # start of scan: the rest is image data
            return bytes(out + data[i:])
        if marker != 0xEE:
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out)


def write_odd_files(folder, rng):
    """Files TensorFlow alone would get wrong or cannot read; each must come out as Pillow reads it."""
    img = cell_image(rng, 36, 30)
    Image.fromarray(img).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    (folder / "cmyk_no_adobe.jpg").write_bytes(strip_adobe_marker((folder / "cmyk.jpg").read_bytes()))
    gray16 = (cell_image(rng, 30, 34)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(gray16).save(folder / "gray16.png")
    rgba = np.dstack([cell_image(rng, 33, 33), np.tile(np.linspace(0, 255, 33, dtype=np.uint8), (33, 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    rotated = Image.fromarray(cell_image(rng, 20, 40))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated.save(folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(cell_image(rng, 34, 34)).save(folder / "scan.tif")
    Image.fromarray(cell_image(rng, 30, 30)).convert("P").save(folder / "palette.bmp")
    names = ("cmyk.jpg", "cmyk_no_adobe.jpg", "gray16.png", "rgba.png", "exif_rotated.jpg", "scan.tif", "palette.bmp")
    return {name: folder / name for name in names}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 images per class (2 train, 1 val, 1 test; JPEG and PNG of several sizes) plus odd files in test."""
    root = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    rows = []
    for c, label in enumerate(CLASSES):
        (root / label).mkdir()
        for i, subset in enumerate(("train", "train", "val", "test")):
            ext = ".jpg" if (i + c) % 2 else ".png"
            rel = f"{label}/{label[:3]}_{i}{ext}"
            Image.fromarray(cell_image(rng, 28 + 7 * i, 44 - 3 * c)).save(root / rel, quality=92)
            rows.append((rel, label, f"{label}-{i}", subset))
    odd = write_odd_files(root / "basophil", rng)
    for k, (name, path) in enumerate(odd.items()):
        rows.append((f"basophil/{name}", CLASSES[k % len(CLASSES)], f"odd-{k}", "test"))
    split = pd.DataFrame(rows, columns=["path", "label", "group", "subset"])
    split.attrs["data_root"] = str(root)
    return split


def reference(split, subset):
    """What the pipeline must yield before preprocess: Pillow's pixels, resized like predict.prepare_image."""
    rows = split[split["subset"] == subset]
    root = split.attrs["data_root"]
    images = []
    for rel in rows["path"]:
        resized = tf.image.resize(read_rgb(f"{root}/{rel}"), (S, S), method="bilinear", antialias=True).numpy()
        images.append(np.clip(np.rint(resized), 0, 255).astype(np.uint8))
    return np.stack(images), rows["label"].map(CLASSES.index).to_numpy()


def collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_batches_have_the_contract_shapes_and_dtypes(dataset):
    ds = make_dataset(dataset, "val", S, None, batch_size=2)
    assert ds.element_spec[0].shape.as_list() == [None, S, S, 3] and ds.element_spec[0].dtype == tf.float32
    assert ds.element_spec[1].dtype == tf.int32
    sizes = [int(x.shape[0]) for x, _ in ds]
    assert sizes == [2, 2, 1]


@pytest.mark.parametrize("subset", ["val", "test"])
def test_val_and_test_follow_split_order_with_pillow_pixels(dataset, subset):
    # The test subset holds CMYK (with and without the Adobe marker), 16-bit, RGBA, EXIF-rotated, TIFF and
    # palette-BMP files: each must come out with 3 channels, exactly as read_rgb reads it.
    x, y = collect(make_dataset(dataset, subset, S, None, batch_size=4, cache="none"))
    ref_x, ref_y = reference(dataset, subset)
    np.testing.assert_array_equal(y, ref_y)
    assert np.abs(x - ref_x.astype(np.float32)).max() <= 1.0


def test_decode_route_uses_tensorflow_only_where_it_matches_pillow(dataset):
    root = dataset.attrs["data_root"]
    routes = {p: decode_route(f"{root}/{p}") for p in dataset["path"]}
    assert routes["basophil/bas_0.png"] == ROUTE_TF and routes["basophil/bas_1.jpg"] == ROUTE_JPEG
    odd = set(dataset.loc[dataset["group"].str.startswith("odd-"), "path"])
    assert len(odd) == 7 and all(routes[p] == ROUTE_PILLOW for p in odd)
    assert all(routes[p] == (ROUTE_JPEG if p.endswith(".jpg") else ROUTE_TF) for p in set(routes) - odd)


def test_preprocess_is_the_last_step(dataset):
    x, _ = collect(make_dataset(dataset, "val", S, keras.applications.resnet50.preprocess_input, cache="none"))
    ref, _ = reference(dataset, "val")
    expected = keras.applications.resnet50.preprocess_input(ref.astype(np.float32))
    np.testing.assert_allclose(x, np.asarray(expected), atol=1.0)
    assert x.min() < -50  # caffe mode: BGR minus the ImageNet mean, not [0, 1] or [-1, 1]
    # Augmentation (brightness may add ±25) clips to [0, 255] before preprocess: x/255 stays in [0, 1].
    train = make_dataset(dataset, "train", S, lambda t: t / 255.0, augment=True, seed=3)
    for _ in range(3):
        xt, _ = collect(train)
        assert xt.min() >= 0.0 and xt.max() <= 1.0 and xt.max() > 0.5


def test_augmentation_only_on_train_and_fresh_each_epoch(dataset):
    val = make_dataset(dataset, "val", S, None)
    np.testing.assert_array_equal(collect(val)[0], collect(val)[0])
    train = make_dataset(dataset, "train", S, None, shuffle=False)  # augment defaults to on for train
    (a, ya), (b, yb) = collect(train), collect(train)
    np.testing.assert_array_equal(ya, yb)
    assert np.abs(a - b).mean() > 5
    plain, _ = collect(make_dataset(dataset, "train", S, None, shuffle=False, augment=False))
    np.testing.assert_array_equal(plain, reference(dataset, "train")[0])
    # Flips/rotations keep the pixel multiset up to the brightness/contrast change: means stay close.
    assert np.abs(a.mean(axis=(1, 2, 3)) - plain.mean(axis=(1, 2, 3))).max() < 40


def test_shuffle_keeps_pairs_is_seeded_and_reshuffles_each_epoch(dataset):
    ref, ref_y = reference(dataset, "train")
    train = make_dataset(dataset, "train", S, None, batch_size=3, augment=False, seed=1)
    epochs = [collect(train) for _ in range(3)]
    orders = []
    for x, y in epochs:
        # Each epoch holds every image once, still paired with its own label.
        match = [int(np.flatnonzero((ref == img.astype(np.uint8)).all(axis=(1, 2, 3)))[0]) for img in x]
        assert sorted(match) == list(range(len(ref)))
        np.testing.assert_array_equal(y, ref_y[match])
        orders.append(match)
    assert len({tuple(o) for o in orders}) > 1
    again = collect(make_dataset(dataset, "train", S, None, batch_size=3, augment=False, seed=1))
    np.testing.assert_array_equal(again[1], epochs[0][1])
    np.testing.assert_array_equal(again[0], epochs[0][0])


def test_cache_holds_uint8_and_decodes_once(dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset.attrs["data_root"], root)
    split = dataset.copy()
    split.attrs["data_root"] = str(root)
    n = int((split["subset"] == "train").sum())
    ds = make_dataset(split, "train", S, None, augment=False, cache=tmp_path / "cache")
    first = collect(ds)
    cached = sum(f.stat().st_size for f in (tmp_path / "cache").iterdir())
    # uint8 pixels are n·S·S·3 bytes; float32 would be four times that.
    assert n * S * S * 3 <= cached < 1.5 * n * S * S * 3
    # A run killed mid-epoch leaves a lockfile that tf.data would refuse; a new pipeline clears it.
    prefix = next((tmp_path / "cache").glob("*.index")).with_suffix("")
    for f in (tmp_path / "cache").iterdir():
        f.unlink()
    Path(f"{prefix}_0.lockfile").write_text("Created at: 0")
    ds = make_dataset(split, "train", S, None, augment=False, cache=tmp_path / "cache")
    assert len(collect(ds)[1]) == n
    memory = make_dataset(split, "val", S, None, cache="memory")
    val_first = collect(memory)
    shutil.rmtree(root)  # the files are gone: only a cache can still serve the images
    np.testing.assert_array_equal(collect(memory)[0], val_first[0])
    again = collect(ds)[0].reshape(n, -1)
    assert sorted(map(tuple, again.tolist())) == sorted(map(tuple, first[0].reshape(n, -1).tolist()))


def test_missing_file_and_empty_subset_are_clear_errors(dataset):
    split = dataset.copy()
    split.loc[split.index[5], "path"] = "monocyte/gone.jpg"
    with pytest.raises(DatasetError, match=r"monocyte/gone\.jpg.*check-data"):
        make_dataset(split, split.loc[split.index[5], "subset"], S, None)
    empty = dataset[dataset["subset"] != "val"].copy()
    with pytest.raises(DatasetError, match="'val' subset is empty"):
        make_dataset(empty, "val", S, None)


def test_load_images_matches_the_pipeline_and_spreads_a_limit_over_classes(dataset):
    images, labels, paths = load_images(dataset, "train", S)
    ref, ref_y = reference(dataset, "train")
    assert images.dtype == np.uint8 and images.shape == (len(ref), S, S, 3)
    np.testing.assert_array_equal(images, ref)
    np.testing.assert_array_equal(labels, ref_y)
    assert paths == dataset.loc[dataset["subset"] == "train", "path"].tolist()
    few, few_labels, few_paths = load_images(dataset, "train", S, limit=5)
    assert sorted(few_labels) == [0, 1, 2, 3, 4]
    assert few_paths == [p for p in paths if p in few_paths]  # still in split order


def test_augmentation_is_seeded_and_yields_all_eight_orientations(dataset):
    images, _, _ = load_images(dataset, "val", S, limit=1)
    a, b, c = (augment_image(images[0], seed=s) for s in ((0, 1), (0, 1), (0, 2)))
    assert a.dtype == np.uint8 and a.shape == (S, S, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Every output is one of the 8 orientations (rotations × mirror) up to brightness/contrast, and all 8 occur.
    original = images[0].astype(np.float64)
    orientations = [np.rot90(m, k) for m in (original, original[:, ::-1]) for k in range(4)]

    def closest(img):
        z = img.astype(np.float64) - img.mean(axis=(0, 1))
        scores = [np.sum(z * (o - o.mean(axis=(0, 1)))) / (np.linalg.norm(z) * np.linalg.norm(o - o.mean(axis=(0, 1))))
                  for o in orientations]
        assert max(scores) > 0.95
        return int(np.argmax(scores))

    batch = augment_batch(tf.constant(np.repeat(images[:1], 48, axis=0)), tf.constant([7, 0], tf.int64)).numpy()
    assert {closest(img) for img in batch} == set(range(8))


def test_a_short_last_batch_gives_what_its_images_give_in_a_full_batch():
    """The compiled per-batch step pads a short batch to the batch size (one XLA compile per pipeline)."""
    finish = _finish_fn(keras.applications.resnet50.preprocess_input, True, 8)
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (8, S, S, 3), np.uint8))
    params = augment_params(8, tf.constant([5, 0], tf.int64))
    full = finish(images, params).numpy()
    short = finish(images[:3], tuple(p[:3] for p in params)).numpy()
    assert short.shape == (3, S, S, 3)
    np.testing.assert_allclose(short, full[:3], rtol=0, atol=1e-4)


def test_a_preprocess_xla_cannot_compile_still_runs(dataset):
    """The pipeline compiles per-batch work with XLA; a preprocess XLA refuses falls back to the plain graph."""

    def numpy_preprocess(x):
        y = tf.numpy_function(lambda a: (a / 255.0).astype("float32"), [x], tf.float32)
        y.set_shape(x.shape)
        return y

    for augment in (False, True):
        x, _ = collect(make_dataset(dataset, "val", S, numpy_preprocess, batch_size=4, augment=augment,
                                    shuffle=False))
        plain, _ = collect(make_dataset(dataset, "val", S, lambda v: v / 255.0, batch_size=4, augment=augment,
                                        shuffle=False))
        np.testing.assert_allclose(x, plain, atol=1e-5)
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_predict_prepares_images_exactly_like_the_pipeline(dataset):
    images, _, paths = load_images(dataset, "val", S)
    root = dataset.attrs["data_root"]
    for image, rel in zip(images, paths):
        np.testing.assert_array_equal(prepare_image(read_rgb(f"{root}/{rel}"), S), image)
