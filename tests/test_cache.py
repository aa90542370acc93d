"""The study's image cache: filled by the data check's one decode per file, read by every pipeline."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell_lib import cache as cache_module
from bloodcell_lib import images, pipeline
from bloodcell_lib.cache import CACHE_FOLDER, StudyCache, study_side, study_sizes
from bloodcell_lib.dataset import check_dataset
from bloodcell_lib.split import load_split, make_split, save_split


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """Count every decode of a file through images.read_rgb_sized (read_rgb, the check and the cache use it)."""
    counts: Counter = Counter()
    original = images.read_rgb_sized

    def counted(path, min_side=None, data=None):
        counts[str(Path(path).resolve())] += 1
        return original(path, min_side, data)

    monkeypatch.setattr(images, "read_rgb_sized", counted)
    return counts


@pytest.fixture
def no_file_decoding_pipeline(monkeypatch) -> list:
    """Record each pipeline that would decode files itself (decode_and_resize is traced once per pipeline)."""
    built: list = []
    original = pipeline.decode_and_resize
    monkeypatch.setattr(pipeline, "decode_and_resize", lambda *a: built.append(a) or original(*a))
    return built


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg"))


def test_the_check_fills_the_cache_once_and_decodes_only_changed_files(tiny_set_copy, tmp_path, decodes):
    n = len(_files(tiny_set_copy))
    first = check_dataset(tiny_set_copy, progress=False, cache=StudyCache(tmp_path / CACHE_FOLDER, 64))
    assert sum(decodes.values()) == n and set(decodes.values()) == {1}
    cache = StudyCache(tmp_path / CACHE_FOLDER, 64)
    assert len(cache) == len({r.sha256 for r in first.records})

    again = check_dataset(tiny_set_copy, progress=False, cache=cache)
    assert sum(decodes.values()) == n  # nothing decoded: sizes and fingerprints come from the cache
    assert [(r.path, r.group, r.width, r.height) for r in again.records] == [
        (r.path, r.group, r.width, r.height) for r in first.records]

    changed = _files(tiny_set_copy)[0]
    Image.open(changed).rotate(90).save(changed, quality=90)
    check_dataset(tiny_set_copy, progress=False, cache=StudyCache(tmp_path / CACHE_FOLDER, 64))
    assert sum(decodes.values()) == n + 1 and decodes[str(changed.resolve())] == 2


def test_cached_images_are_uint8_rows_of_memory_mapped_files(tiny_set, tmp_path):
    cache = StudyCache(tmp_path / CACHE_FOLDER, 40)
    files = _files(tiny_set)[:5]
    shas = cache.ensure(files)
    assert StudyCache(tmp_path / CACHE_FOLDER, 40).ensure(files) == shas  # nothing left to add
    got = cache.images(shas[::-1])
    assert got.dtype == np.uint8 and got.shape == (5, 40, 40, 3)
    shard = next((tmp_path / CACHE_FOLDER / "40px").glob("shard-*.npy"))
    assert isinstance(np.load(shard, mmap_mode="r"), np.memmap)
    assert StudyCache.find(tmp_path / CACHE_FOLDER, 32).side == 40
    assert StudyCache.find(tmp_path / CACHE_FOLDER, 41) is None


def test_a_large_jpeg_is_decoded_at_the_smallest_dct_scale_above_the_cache_side(tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), np.uint8)).save(big, quality=90)
    rgb, size, _ = StudyCache(tmp_path / CACHE_FOLDER, 300).decode(big)
    assert size == (1024, 1024) and rgb.shape == (512, 512, 3)  # 1/2 scale: 1/4 would be 256 < 300
    rgb, _, _ = StudyCache(tmp_path / CACHE_FOLDER, 224).decode(big)
    assert rgb.shape == (256, 256, 3)  # 1/4 scale, still ≥ 224 (and ≥ the fingerprint's 256)


def test_study_side_is_the_largest_input_the_study_needs():
    assert study_side("native") == 300  # EfficientNetB3's native size
    assert study_side(32) == 71  # the smoke profile's 32 px, raised to Xception's minimum
    assert study_side(448) == 448
    assert study_sizes("native") == (224, 299, 300) and study_sizes(32) == (32, 71)
    assert StudyCache.in_output("OUT", "native").sizes == (224, 299)  # stored beside the 300-px side


def test_every_network_size_is_stored_and_reads_as_resizing_the_side_would(tiny_set, tmp_path, monkeypatch):
    files = _files(tiny_set)[:6]
    sized = StudyCache(tmp_path / "sized", 40, sizes=(24, 32, 40, 64))
    assert sized.sizes == (24, 32)  # the side itself and larger sizes are not extra copies
    shas = sized.ensure(files)
    stored = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "sized" / "40px").glob("shard-*.npy"))
    assert stored == ["24px.npy", "32px.npy", "npy"]
    plain = StudyCache(tmp_path / "plain", 40)
    plain.ensure(files)
    expected = {side: plain.images(shas, side) for side in (24, 32, 28)}

    resized = Counter()
    original = cache_module.fit_square
    monkeypatch.setattr(cache_module, "fit_square", lambda *a, **k: resized.update([a[1]]) or original(*a, **k))
    reopened = StudyCache(tmp_path / "sized", 40)  # reading finds the stored sizes without being told them
    for side, want in expected.items():
        np.testing.assert_array_equal(reopened.images(shas, side), want)
    assert resized == {28: len(files)}  # 24 and 32 px were copied, only the size not stored was resized


def test_a_threaded_fill_matches_a_serial_one_and_decodes_each_content_once(tiny_set_copy, tmp_path, decodes,
                                                                           monkeypatch):
    files = _files(tiny_set_copy)
    copy = files[0].with_name(f"copy_{files[0].name}")
    shutil.copyfile(files[0], copy)  # an exact copy: one content in two files
    files = sorted([*files, copy])

    threaded = StudyCache(tmp_path / "threaded", 40, sizes=(24,))
    shas = threaded.ensure(files)
    assert len(set(shas)) == len(files) - 1
    assert sum(decodes.values()) == len(set(shas)) and set(decodes.values()) == {1}

    monkeypatch.setattr(cache_module, "WORKERS", 1)
    assert StudyCache(tmp_path / "serial", 40, sizes=(24,)).ensure(files) == shas
    def shard(run: str, suffix: str) -> Path:  # "shard-*.npy" alone would also match "shard-*.24px.npy"
        (path,) = [p for p in (tmp_path / run / "40px").glob("shard-*.npy") if p.name.split(".", 1)[1] == suffix]
        return path

    for suffix in ("npy", "24px.npy"):  # the same rows in the same order, byte for byte
        a, b = (np.load(shard(run, suffix)) for run in ("threaded", "serial"))
        assert a.tobytes() == b.tobytes()
    a, b = (np.load(next((tmp_path / run / "40px").glob("shard-*.prints.npz"))) for run in ("threaded", "serial"))
    assert all(np.array_equal(a[k], b[k]) for k in ("polar", "profile"))


def test_the_pipeline_reads_the_study_cache_beside_the_split(tiny_set, tmp_path, decodes,
                                                            no_file_decoding_pipeline):
    out = tmp_path / "OUT"
    report = check_dataset(tiny_set, progress=False, cache=StudyCache.in_output(out, 32))
    split = load_split(save_split(make_split(report, seed=1, progress=False), out / "split.csv"))
    checked = sum(decodes.values())
    ds = pipeline.make_dataset(split, "train", 32, None, batch_size=8, shuffle=False, augment=False)
    cached = np.concatenate([x.numpy() for x, _ in ds])
    shown, _, _ = pipeline.load_images(split, "test", 32)
    assert sum(decodes.values()) == checked and not no_file_decoding_pipeline
    assert shown.dtype == np.uint8 and shown.shape[1:] == (32, 32, 3)

    # The same images as decoding the files (one extra resize through the cache's side: a few levels at most).
    direct = np.concatenate([x.numpy() for x, _ in pipeline.make_dataset(
        split, "train", 32, None, batch_size=8, shuffle=False, augment=False, image_cache=None)])
    assert cached.shape == direct.shape
    assert np.abs(cached - direct).mean() < 2.0
    # A size above the cache's side decodes the files instead of enlarging cached images.
    pipeline.make_dataset(split, "train", 80, None, batch_size=8)
    assert len(no_file_decoding_pipeline) == 2


@pytest.mark.slow
def test_a_five_model_smoke_study_decodes_each_file_once(tiny_set, tmp_path, decodes, no_file_decoding_pipeline):
    """Five models through the notebooks' steps (check, split, train, evaluate with Grad-CAM): one decode per file."""
    import keras

    from bloodcell_lib import study
    from bloodcell_lib.config import profile_config
    from bloodcell_lib.registry import ARCHITECTURES, ArchSpec

    def tiny_base(include_top=False, weights=None, input_tensor=None, **_):
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="tiny_conv")(input_tensor)
        return keras.Model(input_tensor, x)

    keys = [f"tinynet{i}" for i in range(5)]
    for i, key in enumerate(keys):
        ARCHITECTURES[key] = ArchSpec(key=key, display_name=f"TinyNet{i}", constructor=tiny_base,
                                      preprocess=keras.applications.efficientnet.preprocess_input,
                                      native_size=32, min_size=8, last_conv_layer="tiny_conv", unfreeze_layers=1,
                                      notebook=f"TinyNet{i}")
    try:
        for i, key in enumerate(keys):
            cfg = profile_config("smoke", arch=key, data_dir=str(tiny_set), output_dir=str(tmp_path / "OUT"),
                                 epochs=1, image_size=24 + 4 * i, gradcam_images=5, cost_repeats=1)
            report = study.check_data(cfg)
            split = study.prepare_split(cfg, report)
            result = study.train(cfg, split)
            study.evaluate(cfg, result, split)
    finally:
        for key in keys:
            del ARCHITECTURES[key]
    n = len(_files(tiny_set))
    assert len(decodes) == n and set(decodes.values()) == {1}, Counter(decodes.values())
    assert not no_file_decoding_pipeline


def test_a_content_is_added_where_its_first_file_stands_whichever_thread_decoded_it(tiny_set_copy, tmp_path,
                                                                                  monkeypatch):
    # The first file's read is slow, so its copy's thread meets the content first and decodes it; the entry must
    # still be added in the first file's place (before the fix: the copy's place, so the rows depended on timing).
    import time

    files = sorted(_files(tiny_set_copy))[:6]
    copy = tmp_path / "zz_copy.jpg"
    shutil.copyfile(files[0], copy)
    slow, read_bytes = files[0], Path.read_bytes

    def delayed(self):
        if self == slow:
            time.sleep(0.5)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", delayed)
    monkeypatch.setattr(cache_module, "WORKERS", 2)
    cache = StudyCache(tmp_path / "cache", 40)
    shas = cache.ensure([*files, copy])
    index = json.loads((tmp_path / "cache" / "40px" / "index.json").read_text())["entries"]
    rows = [index[sha][1] for sha in dict.fromkeys(shas)]
    assert rows == sorted(rows) and rows[0] == 0  # rows in the order of each content's first file
