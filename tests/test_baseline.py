import json

import numpy as np
import pandas as pd
import pytest

from bloodcell_lib.baseline import colour_features, run_shortcut_baseline
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.errors import SplitError
from bloodcell_lib.results import read_predictions
from bloodcell_lib.split import make_split, save_split
from bloodcell_lib.synthetic import load_manifest, make_synthetic_dataset


def _synthetic_split(root, shortcut: bool, seed: int = 0) -> pd.DataFrame:
    """A synthetic set and a group split on its true cells (the manifest's cell_id), 30 % test."""
    make_synthetic_dataset(root, per_class=100, size=64, duplicates=1, seed=seed, shortcut=shortcut)
    manifest = load_manifest(root)
    frame = pd.DataFrame({"path": manifest["file"], "label": manifest["class"], "group": manifest["cell_id"]})
    frame.attrs["data_root"] = str(root)
    return make_split(frame, val=0.15, test=0.3, seed=seed)


@pytest.fixture(scope="module")
def with_shortcut(tmp_path_factory):
    base = tmp_path_factory.mktemp("shortcut")
    split = _synthetic_split(base / "data", shortcut=True)
    return split, run_shortcut_baseline(split, base / "out", n_boot=300), base / "out"


@pytest.fixture(scope="module")
def without_shortcut(tmp_path_factory):
    base = tmp_path_factory.mktemp("no_shortcut")
    split = _synthetic_split(base / "data", shortcut=False)
    return split, run_shortcut_baseline(split, base / "out", n_boot=300), base / "out"


def test_background_tint_by_class_is_found(with_shortcut):
    # The generator tints slides of {basophil, erythroblast, neutrophil} warm and {monocyte, myeloblast}
    # cool, so background colour can at best name the source: accuracy ceiling 3/5·1/3 + 2/5·1/2 = 0.4.
    _, results, _ = with_shortcut
    metrics = results["metrics"]
    assert metrics["accuracy"] > 0.3
    assert metrics["accuracy_ci"][0] > 0.2  # above chance, with the interval
    assert metrics["roc_auc_macro"] > 0.7


def test_without_the_shortcut_it_stays_near_chance(without_shortcut):
    # The cells' own colours tell these classes apart (a whole-image colour histogram scores ~0.9),
    # so staying near chance shows that the baseline sees the background only.
    _, results, _ = without_shortcut
    metrics = results["metrics"]
    assert metrics["accuracy"] < 0.3
    assert metrics["roc_auc_macro"] < 0.6
    assert metrics["roc_auc_macro_ci"][0] < 0.5  # chance is inside the interval


def test_results_are_reported_like_a_model(with_shortcut):
    split, results, out = with_shortcut
    n_test = int((split["subset"] == "test").sum())
    assert results["architecture"] == "shortcut_baseline"
    assert results["display_name"] == "Colour-only baseline"
    assert results["n_train"] == int((split["subset"] == "train").sum())
    assert results["n_test"] == n_test == results["metrics"]["n"]
    assert results["metrics"]["n_groups"] == split.loc[split["subset"] == "test", "group"].nunique()
    assert "background" in results["features"]
    on_disk = json.loads((out / "shortcut_baseline_results.json").read_text())
    assert on_disk["metrics"]["accuracy"] == pytest.approx(results["metrics"]["accuracy"])
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_predictions_file_matches_the_reported_metrics(with_shortcut):
    split, results, out = with_shortcut
    frame = pd.read_csv(out / "shortcut_baseline_predictions.csv")
    assert list(frame.columns[:3]) == ["path", "true_label", "pred_label"]
    assert [c for c in frame.columns if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
    assert list(frame["path"]) == list(split.loc[split["subset"] == "test", "path"])
    proba = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert (frame["pred_label"] == [CLASSES[i] for i in proba.argmax(axis=1)]).all()
    assert (frame["true_label"] == frame["pred_label"]).mean() == pytest.approx(results["metrics"]["accuracy"])
    y_true, _, _ = read_predictions(out / "shortcut_baseline_predictions.csv")  # what compare.py reads
    assert len(y_true) == results["n_test"]


def test_a_split_file_and_data_dir_are_accepted(with_shortcut, tmp_path):
    split, results, _ = with_shortcut
    path = save_split(split, tmp_path / "split.csv")
    again = run_shortcut_baseline(path, tmp_path / "out", data_dir=split.attrs["data_root"], n_boot=0)
    assert again["metrics"]["accuracy"] == pytest.approx(results["metrics"]["accuracy"])
    assert again["split"]["sha256"] is not None


def test_features_see_the_background_and_not_the_cell():
    yy, xx = np.mgrid[0:64, 0:64]
    cell = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 24 ** 2

    def image(background, cell_colour):
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = background
        img[cell] = cell_colour
        return img

    warm, cool = (240, 225, 205), (215, 225, 240)
    features = colour_features(np.stack([
        # a dark cell and one brighter than the glass: neither may change the features
        image(warm, (120, 60, 150)), image(warm, (255, 255, 255)), image(cool, (120, 60, 150)),
    ]))
    assert features.shape == (3, 114)
    assert np.array_equal(features[0], features[1])  # a different cell, the same features
    assert not np.allclose(features[0], features[2])  # a different background, different features
    # Corner means (the last 12 values) are the background colour on 0..1.
    assert features[0, -12:] == pytest.approx(np.tile(np.array(warm) / 255, 4), abs=1e-6)
    # Every channel histogram of a uniform border holds all pixels in one bin.
    assert features[0, :16].sum() == pytest.approx(1.0) and features[0, :16].max() == pytest.approx(1.0)


def test_features_refuse_non_image_arrays():
    with pytest.raises(ValueError, match="uint8"):
        colour_features(np.zeros((2, 64, 64, 3), np.float32))


def test_split_without_data_root_or_test_rows_is_refused(tmp_path):
    split = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["basophil", "monocyte"],
                          "group": ["1", "2"], "subset": ["train", "test"]})
    with pytest.raises(SplitError, match="data_root"):
        run_shortcut_baseline(split, tmp_path)
    split.attrs["data_root"] = str(tmp_path)
    split["subset"] = "train"
    with pytest.raises(SplitError, match="'test'"):
        run_shortcut_baseline(split, tmp_path)


def test_a_class_missing_from_train_gets_probability_zero(with_shortcut, tmp_path):
    split, _, _ = with_shortcut
    reduced = split[~((split["subset"] == "train") & (split["label"] == "monocyte"))].reset_index(drop=True)
    reduced.attrs = dict(split.attrs)
    results = run_shortcut_baseline(reduced, tmp_path, n_boot=0)
    frame = pd.read_csv(tmp_path / "shortcut_baseline_predictions.csv")
    assert (frame["prob_monocyte"] == 0).all()
    assert np.allclose(frame[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1.0)
    assert results["metrics"]["per_class"]["monocyte"]["recall"] == 0
