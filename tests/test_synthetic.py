"""The synthetic set: Kaggle layout, manifest, determinism, class-free backgrounds, safety, CLI, cell masks."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from bloodcell_lib.classes import CLASSES, FILE_PREFIXES
from bloodcell_lib.errors import ConfigError, DatasetError
from bloodcell_lib.images import read_rgb
from bloodcell_lib import synthetic
from bloodcell_lib.synthetic import (
    _MARGIN, MANIFEST_COLUMNS, MANIFEST_NAME, STAMP_NAME, TINY_SET, _augment, ensure_synthetic_dataset, load_manifest,
    make_synthetic_dataset, manifest_mask,
)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_kaggle_layout_with_n_times_one_plus_k_images_per_class(small_set, small_set_params):
    per_class, size, duplicates = (small_set_params[k] for k in ("per_class", "size", "duplicates"))
    assert sorted(p.name for p in small_set.iterdir()) == sorted([*CLASSES, MANIFEST_NAME])
    for cls in CLASSES:
        names = sorted(p.name for p in (small_set / cls).iterdir())
        assert len(names) == per_class * (1 + duplicates)
        assert all(re.fullmatch(rf"{FILE_PREFIXES[cls]}_\d+\.jpg", n) for n in names), names
        image = read_rgb(small_set / cls / names[0])
        assert image.shape == (size, size, 3)


def test_manifest_has_one_row_per_file_and_names_each_cell(small_set, small_set_params):
    per_class, duplicates = small_set_params["per_class"], small_set_params["duplicates"]
    frame = load_manifest(small_set)
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert sorted(frame["file"]) == [f for f in _files(small_set) if f != MANIFEST_NAME]
    assert (frame["file"].str.split("/").str[0] == frame["class"]).all()
    copies = frame.groupby("cell_id")["copy"].apply(sorted)
    assert len(copies) == per_class * len(CLASSES)
    assert all(c == list(range(1 + duplicates)) for c in copies)
    # Copies of a cell share its slide; slides are shared across classes.
    assert (frame.groupby("cell_id")["slide"].nunique() == 1).all()
    assert frame.groupby("slide")["class"].nunique().max() > 1
    assert load_manifest(small_set / MANIFEST_NAME).equals(frame)


def test_file_numbers_do_not_reveal_copies(small_set, small_set_params):
    per_class, duplicates = small_set_params["per_class"], small_set_params["duplicates"]
    frame = load_manifest(small_set)
    frame["number"] = frame["file"].str.extract(r"_(\d+)\.jpg$", expand=False).astype(int)
    n_files = per_class * (1 + duplicates)
    contiguous = 0
    for cls, group in frame.groupby("class"):
        assert sorted(group["number"]) == list(range(1, n_files + 1))
        for _, cell in group.groupby("cell_id"):
            numbers = sorted(cell["number"])
            contiguous += numbers[-1] - numbers[0] == duplicates
    assert contiguous <= 2, "copies of one cell sit on consecutive file numbers"


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        make_synthetic_dataset(out, seed=seed, **TINY_SET)
    assert _files(a) == _files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    assert (a / MANIFEST_NAME).read_bytes() != (c / MANIFEST_NAME).read_bytes()


def test_a_set_is_made_once_and_made_again_when_the_generator_changed(tmp_path):
    out = tmp_path / "stand-in"
    assert ensure_synthetic_dataset(out, **TINY_SET) == out
    stamp = out / STAMP_NAME
    first = stamp.read_text()
    assert ensure_synthetic_dataset(out, **TINY_SET) == out and stamp.read_text() == first  # reused as it is
    old = json.loads(first)
    del old["generator"]  # a stamp written before copies followed real-world ranges
    stamp.write_text(json.dumps(old))
    marker = out / "basophil" / "stale.jpg"
    marker.write_bytes(b"stale")
    ensure_synthetic_dataset(out, **TINY_SET)
    assert json.loads(stamp.read_text())["generator"] == synthetic.GENERATOR_VERSION
    assert not marker.exists()
    ensure_synthetic_dataset(out, **{**TINY_SET, "per_class": 2})  # other parameters: made again
    assert len(load_manifest(out)) == len(CLASSES) * 2 * (1 + TINY_SET["duplicates"])


def test_tiny_set_for_other_tests_is_cheap(tmp_path):
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path / "tiny", **TINY_SET)
    assert time.perf_counter() - start < 3.0
    assert len(load_manifest(tmp_path / "tiny")) == len(CLASSES) * TINY_SET["per_class"] * (1 + TINY_SET["duplicates"])


def _background_warmth_spread(root) -> float:
    """Spread over classes of the median (red − blue) of the glass, estimated as each image's brightest pixels."""
    frame = load_manifest(root)
    warmth = {}
    for cls, group in frame.groupby("class"):
        values = []
        for file in group["file"]:
            rgb = read_rgb(root / file).reshape(-1, 3).astype(float)
            glass = rgb[rgb.sum(1) >= np.quantile(rgb.sum(1), 0.8)]
            values.append(glass[:, 0].mean() - glass[:, 2].mean())
        warmth[cls] = np.median(values)
    return max(warmth.values()) - min(warmth.values())


def test_background_tells_the_class_only_with_shortcut(tmp_path):
    params = dict(per_class=24, size=32, duplicates=0, seed=11)
    make_synthetic_dataset(tmp_path / "plain", **params)
    make_synthetic_dataset(tmp_path / "shortcut", shortcut=True, **params)
    plain, shortcut = _background_warmth_spread(tmp_path / "plain"), _background_warmth_spread(tmp_path / "shortcut")
    assert shortcut > 25, shortcut
    assert plain < 10, plain
    assert shortcut > 3 * plain


def test_refuses_a_non_empty_folder_that_is_not_a_synthetic_set_and_leaves_it_untouched(tmp_path):
    user = tmp_path / "my_data"
    (user / "basophil").mkdir(parents=True)
    (user / "basophil" / "BA_1.jpg").write_bytes(b"precious")
    (user / "notes.txt").write_text("mine")
    before = {f: (user / f).read_bytes() for f in _files(user)}
    with pytest.raises(DatasetError, match="empty folder"):
        make_synthetic_dataset(user, **TINY_SET)
    assert {f: (user / f).read_bytes() for f in _files(user)} == before
    assert sorted(p.name for p in user.iterdir()) == ["basophil", "notes.txt"]  # no staging folder left behind
    with pytest.raises(DatasetError, match="not a folder"):
        make_synthetic_dataset(user / "notes.txt", **TINY_SET)


def test_bad_parameters_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="per_class"):
        make_synthetic_dataset(tmp_path / "x", per_class=0)
    with pytest.raises(ConfigError, match="size"):
        make_synthetic_dataset(tmp_path / "x", size=8)
    assert not (tmp_path / "x").exists()


def test_rerun_replaces_a_previous_synthetic_set_cleanly(tmp_path):
    out = tmp_path / "set"
    make_synthetic_dataset(out, per_class=6, size=32, duplicates=1)
    (out / "my_split.csv").write_text("kept")
    make_synthetic_dataset(out, per_class=2, size=32, duplicates=0, seed=1)
    frame = load_manifest(out)
    assert len(frame) == 2 * len(CLASSES)
    assert sorted(frame["file"]) == [f for f in _files(out) if f not in (MANIFEST_NAME, "my_split.csv")]
    assert (out / "my_split.csv").read_text() == "kept"


def test_an_interrupted_run_can_be_run_again(tmp_path):
    out = tmp_path / "set"
    # What a crash after the images but before the manifest leaves: staged and half-swapped folders.
    (out / ".synth_staging" / "monocyte").mkdir(parents=True)
    (out / ".synth_staging" / "monocyte" / "MO_9.jpg").write_bytes(b"half")
    (out / "basophil").mkdir()
    (out / "basophil" / "BA_99.jpg").write_bytes(b"stale")
    make_synthetic_dataset(out, **TINY_SET)
    assert sorted(p.name for p in out.iterdir()) == sorted([*CLASSES, MANIFEST_NAME])
    assert sorted(load_manifest(out)["file"]) == [f for f in _files(out) if f != MANIFEST_NAME]


@pytest.mark.slow  # two CLI subprocesses
def test_cli_writes_a_set_and_refuses_a_user_folder(tmp_path):
    cmd = [sys.executable, "-m", "bloodcell_lib", "synth", "--per-class", "2", "--size", "32", "--duplicates", "1"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "cli"), "--seed", "4"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cli" / "myeloblast").glob("MYO_*.jpg"))) == 4
    assert MANIFEST_NAME in done.stdout
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "cell.png").write_bytes(b"x")
    refused = subprocess.run([*cmd, "--out", str(tmp_path / "user")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "empty folder" in refused.stderr
    assert _files(tmp_path / "user") == ["cell.png"]


def test_manifest_mask_rasterises_the_ellipse():
    row = {"mask_cx": 10.0, "mask_cy": 5.0, "mask_rx": 4.0, "mask_ry": 2.0, "mask_angle": 0.0}
    mask = manifest_mask(row, 12, 20)
    assert mask.shape == (12, 20) and mask.dtype == bool
    assert mask[5, 14] and not mask[5, 15] and mask[7, 10] and not mask[8, 10]
    turned = manifest_mask({**row, "mask_angle": 90.0}, 12, 20)
    assert turned[9, 10] and not turned[5, 13]


def test_mask_holds_the_stained_cell_in_originals_and_copies(small_set, small_set_params):
    size, duplicates = small_set_params["size"], small_set_params["duplicates"]
    frame = load_manifest(small_set)
    inside, shifted = [], []
    for row in frame.to_dict("records"):
        rgb = read_rgb(small_set / row["file"]).astype(float)
        brightness = rgb.sum(axis=2)
        darkest = brightness <= np.quantile(brightness, 0.01)  # nucleus or granules, never a pale red cell
        mask = manifest_mask(row, size, size)
        inside.append(mask[darkest].mean())
        shifted.append(manifest_mask({**row, "mask_cx": row["mask_cx"] + size / 3}, size, size)[darkest].mean())
        assert 0.05 < mask.mean() < 0.65, row["file"]  # a large monocyte zoomed ×1.2 fills up to ~60 %
        assert (765 - brightness)[mask].mean() > 1.2 * (765 - brightness)[~mask].mean(), row["file"]
    inside, shifted = np.array(inside), np.array(shifted)
    assert (inside == 1.0).mean() > 0.97, frame.loc[inside < 1.0, "file"].tolist()
    assert np.mean(shifted) < 0.8  # the check above can fail: a misplaced ellipse misses the cell
    assert set(frame["copy"]) == set(range(1 + duplicates))


@pytest.mark.parametrize("seed", range(6))
def test_copy_geometry_maps_the_cell_ellipse_exactly(seed):
    # A known, elongated ellipse on a canvas must land where _augment says it went (turns, flips, zoom, shift).
    size = 64
    side = size + 2 * math.ceil(_MARGIN * size)  # as _render_canvas draws it: no copy sees past its edge
    names = ("mask_cx", "mask_cy", "mask_rx", "mask_ry", "mask_angle")
    ellipse = (side / 2 + 2.0, side / 2 - 4.0, 18.0, 8.0, 30.0)
    canvas = np.full((side, side, 3), 230, np.float32)
    canvas[manifest_mask(dict(zip(names, ellipse)), side, side)] = 40
    image, moved, _ = _augment(canvas, ellipse, size, np.random.default_rng(seed))
    grey = image.mean(axis=2)
    dark = grey < (grey.min() + grey.max()) / 2
    mask = manifest_mask(dict(zip(names, moved)), size, size)
    iou = (dark & mask).sum() / (dark | mask).sum()
    assert iou > 0.93, (moved, iou)


@pytest.mark.parametrize("angle", [45.0, 135.0, 225.0, 315.0])
def test_the_widest_copy_never_sees_past_the_canvas_edge(monkeypatch, angle):
    # Smallest zoom, largest shift towards a corner, turned 45°: the farthest any copy reaches.
    size = 64
    side = size + 2 * math.ceil(_MARGIN * size)
    canvas = np.full((side, side, 3), 200, np.float32)
    canvas[[0, -1], :] = canvas[:, [0, -1]] = 0  # the edge; reflected borders would show it too
    widest = synthetic._Copy(angle=angle, flip_h=False, flip_v=False, zoom=0.85, shift_x=0.08, shift_y=-0.08,
                             gain=1.0, offset=0.0, blur_sigma=0.0, jpeg_quality=90)
    monkeypatch.setattr(synthetic, "_draw_copy", lambda rng: widest)
    image, _, _ = _augment(canvas, (side / 2, side / 2, 5.0, 5.0, 0.0), size, np.random.default_rng(0))
    assert image.min() > 199
