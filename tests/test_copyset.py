"""The near-duplicate test set: layout, ground truth, real-world transform ranges, hard negatives, pair scores."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from bloodcell_lib.classes import CLASSES, FILE_PREFIXES
from bloodcell_lib.copyset import (
    COPY_MANIFEST_COLUMNS, COPY_MANIFEST_NAME, load_copy_manifest, make_copy_set, pair_precision_recall,
)
from bloodcell_lib.errors import ConfigError, DatasetError
from bloodcell_lib.images import read_rgb

CELLS, SIZE, MAX_COPIES, PER_SMEAR = 8, 128, 5, 4
# The real-world ranges the set must draw from, written here independently of the code under test.
RANGES = {
    "angle": (0.0, 360.0), "zoom": (0.85, 1.2), "shift_x": (-0.08, 0.08), "shift_y": (-0.08, 0.08),
    "gain": (0.8, 1.25), "offset": (-25.0, 25.0), "blur_sigma": (0.0, 1.6), "jpeg_quality": (70, 95),
}


@pytest.fixture(scope="module")
def copy_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("copyset") / "set"
    make_copy_set(out, cells_per_class=CELLS, size=SIZE, max_copies=MAX_COPIES, seed=0, cells_per_smear=PER_SMEAR)
    return out, load_copy_manifest(out)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_kaggle_layout_and_a_manifest_row_for_every_decodable_file(copy_set):
    root, frame = copy_set
    assert sorted(p.name for p in root.iterdir()) == sorted([*CLASSES, COPY_MANIFEST_NAME])
    assert list(frame.columns) == list(COPY_MANIFEST_COLUMNS)
    assert sorted(frame["file"]) == [f for f in _files(root) if f != COPY_MANIFEST_NAME]
    assert (frame["file"].str.split("/").str[0] == frame["class"]).all()
    for row in frame.itertuples():
        assert re.fullmatch(rf"{row[2]}/{FILE_PREFIXES[row[2]]}_\d+\.jpg", row.file), row.file
        assert read_rgb(root / row.file).shape == (SIZE, SIZE, 3)
    assert load_copy_manifest(root / COPY_MANIFEST_NAME).equals(frame)


def test_each_cell_has_one_original_and_one_to_max_copies_images(copy_set):
    _, frame = copy_set
    per_cell = frame.groupby("cell_id")
    assert per_cell.ngroups == CELLS * len(CLASSES)
    assert all(sorted(c) == list(range(len(c))) for c in per_cell["copy"].apply(list))
    sizes = per_cell.size()
    assert sizes.min() == 1 and sizes.max() == MAX_COPIES  # the number is drawn, not fixed
    assert (per_cell[["class", "smear_id", "field_id"]].nunique() == 1).all().all()


def test_file_numbers_do_not_reveal_copies(copy_set):
    _, frame = copy_set
    frame = frame.assign(number=frame["file"].str.extract(r"_(\d+)\.jpg$", expand=False).astype(int))
    neighbours = 0
    for _, group in frame.groupby("class"):
        assert sorted(group["number"]) == list(range(1, len(group) + 1))
        by_number = group.sort_values("number")["cell_id"].tolist()
        neighbours += sum(a == b for a, b in zip(by_number, by_number[1:]))
    assert neighbours < 0.2 * len(frame), "copies of one cell sit on consecutive file numbers"


def test_transforms_stay_within_and_span_the_real_world_ranges(copy_set):
    _, frame = copy_set
    copies = frame[frame["copy"] > 0]
    assert len(copies) > 60
    for name, (low, high) in RANGES.items():
        values = copies[name]
        assert values.between(low, high).all(), (name, values.min(), values.max())
        # Covering the range: the lowest and highest tenth of it both occur.
        span = high - low
        assert values.min() < low + 0.1 * span and values.max() > high - 0.1 * span, (name, values.min(), values.max())
    assert copies["angle"].max() - copies["angle"].min() > 300
    assert copies["zoom"].min() < 0.9 and copies["zoom"].max() > 1.15
    for flip in ("flip_h", "flip_v"):
        assert 0.3 < copies[flip].mean() < 0.7
    assert set(copies["fill"]) == {"recrop", "nearest", "reflect", "constant"}
    assert 0.35 < (copies["fill"] == "recrop").mean() < 0.65  # half re-cropped, half augmented

    originals = frame[frame["copy"] == 0]
    assert (originals["fill"] == "original").all()
    assert originals["jpeg_quality"].between(85, 95).all()
    assert (originals[["angle", "shift_x", "shift_y", "offset", "blur_sigma"]] == 0).all().all()
    assert (originals[["zoom", "gain"]] == 1).all().all()


def _corner_brightness(rgb: np.ndarray) -> float:
    """Mean RGB sum of the darkest of the four 4×4 corner patches."""
    return min(float(rgb[rows, cols].astype(float).sum(axis=2).mean())
               for rows in (slice(0, 4), slice(-4, None)) for cols in (slice(0, 4), slice(-4, None)))


def test_recrops_show_smear_in_the_corners_and_constant_fills_show_black(copy_set):
    root, frame = copy_set
    turned = ((frame["angle"] % 90).between(30, 60)) & (frame["zoom"] < 1.1)
    recrops, blacks = frame[turned & (frame["fill"] == "recrop")], frame[turned & (frame["fill"] == "constant")]
    assert len(recrops) >= 3 and len(blacks) >= 2
    assert all(_corner_brightness(read_rgb(root / f)) > 200 for f in recrops["file"])
    assert all(_corner_brightness(read_rgb(root / f)) < 100 for f in blacks["file"])


def test_manifest_says_where_the_white_cell_lies_in_every_image(copy_set):
    root, frame = copy_set
    near, far = [], []
    for row in frame[frame["fill"] != "constant"].itertuples():  # black borders would be the darkest pixels
        red = read_rgb(root / row.file)[..., 0].astype(float)
        y, x = np.nonzero(red <= np.quantile(red, 0.01))  # nucleus or granules: red cells barely absorb red
        near.append(np.hypot(x - row.cell_x, y - row.cell_y).max() < 0.45 * SIZE)
        far.append(np.hypot(x - row.cell_x - SIZE / 2, y - row.cell_y).max() < 0.45 * SIZE)
    assert np.mean(near) > 0.97
    assert np.mean(far) < 0.5  # the check above can fail: a wrong position misses the nucleus


def test_hard_negatives_several_cells_per_smear_sharing_its_stain(copy_set):
    root, frame = copy_set
    assert (frame.groupby("smear_id")["class"].nunique() == 1).all()
    cells_per_smear = frame.groupby("smear_id")["cell_id"].nunique()
    assert (cells_per_smear >= 2).all() and cells_per_smear.max() == PER_SMEAR
    assert (frame.groupby("smear_id")["field_id"].nunique() == cells_per_smear).all()  # each cell in a field of its own
    # Same stain: the glass colour (brightest pixels) of originals varies far less within a smear than between smears.
    originals = frame[frame["copy"] == 0].copy()
    glass = []
    for file in originals["file"]:
        rgb = read_rgb(root / file).reshape(-1, 3).astype(float)
        glass.append(rgb[rgb.sum(1) >= np.quantile(rgb.sum(1), 0.9)].mean(axis=0))
    originals[["r", "g", "b"]] = np.array(glass)
    within = originals.groupby("smear_id")[["r", "g", "b"]].std().mean().mean()
    between = originals.groupby("smear_id")[["r", "g", "b"]].mean().std().mean()
    assert within < 0.5 * between, (within, between)


def test_smears_range_from_dense_to_sparse(copy_set):
    _, frame = copy_set
    cover = frame.groupby("smear_id")["rbc_cover"].first()
    assert cover.min() < 0.15 and cover.max() > 0.35, cover.describe()


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    params = dict(cells_per_class=2, size=64, max_copies=3, cells_per_smear=2)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_copy_set(tmp_path / name, seed=seed, **params)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _files(a) == _files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    assert (a / COPY_MANIFEST_NAME).read_bytes() != (c / COPY_MANIFEST_NAME).read_bytes()


def test_refuses_a_foreign_folder_and_leaves_it_untouched_but_replaces_a_previous_set(tmp_path):
    user = tmp_path / "my_data"
    (user / "basophil").mkdir(parents=True)
    (user / "basophil" / "BA_1.jpg").write_bytes(b"precious")
    before = {f: (user / f).read_bytes() for f in _files(user)}
    with pytest.raises(DatasetError, match=f"holds no {COPY_MANIFEST_NAME}.*empty folder"):
        make_copy_set(user, cells_per_class=1, size=32)
    assert {f: (user / f).read_bytes() for f in _files(user)} == before
    assert [p.name for p in user.iterdir()] == ["basophil"]  # no staging folder left behind

    out = tmp_path / "set"
    make_copy_set(out, cells_per_class=2, size=32, max_copies=2)
    make_copy_set(out, cells_per_class=1, size=32, max_copies=1)
    frame = load_copy_manifest(out)
    assert len(frame) == len(CLASSES)
    assert sorted(frame["file"]) == [f for f in _files(out) if f != COPY_MANIFEST_NAME]


def test_bad_parameters_are_config_errors(tmp_path):
    for bad in ({"cells_per_class": 0}, {"size": 16}, {"max_copies": 0}, {"cells_per_smear": 0}, {"seed": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            make_copy_set(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()
    with pytest.raises(DatasetError, match="no copy-set manifest"):
        load_copy_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Pair precision and recall

TRUE = ["a", "a", "a", "b", "b", "c"]  # 3 + 1 = 4 true pairs


def test_perfect_grouping_under_other_labels():
    assert pair_precision_recall([7, 7, 7, 2, 2, 9], TRUE) == {
        "precision": 1.0, "recall": 1.0, "true_pairs": 4, "predicted_pairs": 4, "correct_pairs": 4, "largest_group": 3,
    }


def test_everything_merged():
    assert pair_precision_recall([0] * 6, TRUE) == {
        "precision": 4 / 15, "recall": 1.0, "true_pairs": 4, "predicted_pairs": 15, "correct_pairs": 4,
        "largest_group": 6,
    }


def test_everything_split():
    assert pair_precision_recall(range(6), TRUE) == {
        "precision": 1.0, "recall": 0.0, "true_pairs": 4, "predicted_pairs": 0, "correct_pairs": 0, "largest_group": 1,
    }


def test_a_partial_grouping():
    # Groups {0,1}, {2,3,4}, {5}: pairs 01 (right), 23 and 24 (wrong), 34 (right).
    assert pair_precision_recall(["x", "x", "y", "y", "y", "z"], TRUE) == {
        "precision": 0.5, "recall": 0.5, "true_pairs": 4, "predicted_pairs": 4, "correct_pairs": 2, "largest_group": 3,
    }


def test_no_true_pairs_and_no_images():
    assert pair_precision_recall([1, 1], ["p", "q"])["precision"] == 0.0
    assert pair_precision_recall([1, 2], ["p", "q"])["recall"] == 1.0
    assert pair_precision_recall([], [])["largest_group"] == 0


def test_bad_labels_are_value_errors():
    with pytest.raises(ValueError, match="2 predicted labels but 3"):
        pair_precision_recall([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="missing label"):
        pair_precision_recall([1, None, 2], [1, 2, 3])


def test_a_million_images_score_in_seconds():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 300_000, 1_000_000)
    start = time.perf_counter()
    scores = pair_precision_recall(true, true)  # an N×N matrix would need a terabyte
    assert time.perf_counter() - start < 5.0
    assert scores["precision"] == scores["recall"] == 1.0
