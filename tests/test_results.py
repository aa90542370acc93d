"""A run's files: predictions CSV → metrics → results JSON, names, versions, timestamps, Grad-CAM examples."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from sklearn.metrics import accuracy_score, f1_score

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.metrics import SCALAR_KEYS, compute_metrics
import bloodcell_lib
from bloodcell_lib.results import (
    PREDICTION_COLUMNS,
    PROB_COLUMNS,
    SOURCE_KEY,
    GradcamExamples,
    gradcam_path,
    library_versions,
    load_gradcam,
    read_predictions,
    read_results,
    record_predictions,
    results_files,
    results_path,
    results_record,
    run_name,
    source_fingerprint,
    run_of,
    split_info,
    utc_timestamp,
    write_gradcam,
    write_results,
)
from bloodcell_lib.split import dataset_fingerprint, split_sha256


def _rows_and_proba(n: int = 40, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    proba = rng.dirichlet(np.ones(len(CLASSES)), n)
    proba[np.arange(n), y] += rng.random(n)  # mostly right
    proba /= proba.sum(axis=1, keepdims=True)
    rows = pd.DataFrame({"path": [f"{CLASSES[v]}/img_{i:03d}.jpg" for i, v in enumerate(y)],
                         "label": [CLASSES[v] for v in y], "group": [f"g{i // 2}" for i in range(n)]})
    return rows, proba


@pytest.fixture()
def split(tmp_path):
    frame = pd.DataFrame({"path": [f"{c}/{name}.jpg" for name in "ab" for c in CLASSES], "label": list(CLASSES) * 2,
                          "group": [f"g{i}" for i in range(10)], "subset": ["train"] * 5 + ["test"] * 5})
    for rel in frame["path"]:  # the fingerprint hashes the files' bytes
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    path = tmp_path / "split.csv"
    frame.to_csv(path, index=False)
    frame.attrs.update(split_path=str(path), data_root=str(tmp_path), split_by="group",
                       leakage_audit={"test_images_with_match_in_train": 0, "n_test": 5})
    return frame


def test_predictions_csv_has_the_schema_and_reads_back(tmp_path):
    rows, proba = _rows_and_proba()
    frame, metrics = record_predictions(tmp_path, "vgg16", rows, proba, n_boot=50, seed=3)
    on_disk = pd.read_csv(tmp_path / "vgg16_predictions.csv")
    assert list(on_disk.columns) == PREDICTION_COLUMNS == ["path", "true_label", "pred_label", *PROB_COLUMNS, "group"]
    assert PROB_COLUMNS == [f"prob_{c}" for c in CLASSES]
    assert list(on_disk["pred_label"]) == [CLASSES[i] for i in proba.argmax(axis=1)]
    y_true, read_proba, read_frame = read_predictions(tmp_path / "vgg16_predictions.csv")
    assert np.array_equal(y_true, np.arange(40) % 5) and np.allclose(read_proba, proba)
    assert read_frame.equals(frame)


def test_metrics_are_what_the_predictions_csv_says(tmp_path):
    rows, proba = _rows_and_proba(seed=1)
    frame, metrics = record_predictions(tmp_path, "run", rows, proba, n_boot=80, seed=5)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(frame.true_label, frame.pred_label))
    assert metrics["macro_f1"] == pytest.approx(f1_score(frame.true_label, frame.pred_label, average="macro"))
    # Intervals resample the file's duplicate groups with the study's bootstrap.
    again = compute_metrics(np.arange(40) % 5, frame[PROB_COLUMNS].to_numpy(), groups=frame["group"].to_numpy(),
                            n_boot=80, seed=5)
    assert metrics["macro_f1_ci"] == pytest.approx(again["macro_f1_ci"]) and metrics["n_groups"] == 20
    assert metrics["bootstrap"]["n_boot"] == 80 and metrics["bootstrap"]["seed"] == 5


def test_results_record_holds_every_shared_block_and_round_trips(tmp_path, split):
    rows, proba = _rows_and_proba()
    _, metrics = record_predictions(tmp_path, "vgg16", rows, proba, n_boot=0, seed=0)
    results = results_record(run="vgg16", architecture="vgg16", display_name="VGG16", split=split,
                             split_block=split_info(split), metrics=metrics, output_dir=tmp_path,
                             versions=library_versions(), weights="none (random init)", image_size=32)
    for key in ("architecture", "display_name", "run", "weights", "image_size", "split", "leakage_audit",
                "metrics", "predictions_file", "output_dir", "versions", "created"):
        assert key in results, key
    assert results["predictions_file"] == "vgg16_predictions.csv" and results["output_dir"] == str(tmp_path)
    assert results["leakage_audit"]["n_test"] == 5
    assert set(SCALAR_KEYS) <= set(results["metrics"])
    path = write_results(tmp_path, results)
    assert path == results_path(tmp_path, "vgg16") == tmp_path / "vgg16_results.json"
    assert read_results(path)["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert results_files(tmp_path) == [path] and run_of(read_results(path)) == "vgg16"
    assert run_of({"architecture": "resnet50"}) == "resnet50"  # files from before runs had names


def test_split_info_names_the_file_its_hash_and_its_images(split):
    info = split_info(split)
    assert info["sha256"] == split_sha256(split.attrs["split_path"])
    assert info["dataset_sha256"] == dataset_fingerprint(split)
    assert info["sizes"] == {"train": 5, "val": 0, "test": 5} and info["split_by"] == "group"
    assert info["data_root"] == split.attrs["data_root"]


def test_run_name_marks_an_image_level_split(split):
    assert run_name("vgg16", split) == "vgg16"
    split.attrs["split_by"] = "image"
    assert run_name("vgg16", split) == "vgg16_imagesplit"


def test_versions_and_timestamps_have_one_shape():
    network = library_versions(tf, keras)
    assert list(network) == ["python", "tensorflow", "keras", "numpy", "scikit-learn", "pandas", "bloodcell_lib",
                             SOURCE_KEY]
    assert network["tensorflow"] == tf.__version__ and network["numpy"] == np.__version__
    assert library_versions(cv2)["opencv"] == cv2.__version__ and "tensorflow" not in library_versions(cv2)
    stamp = dt.datetime.fromisoformat(utc_timestamp())
    assert stamp.utcoffset() == dt.timedelta(0) and stamp.microsecond == 0
    assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 60


def test_gradcam_examples_round_trip_small_and_atomic(tmp_path):
    rng = np.random.default_rng(0)
    examples = GradcamExamples(run="vgg16", display_name="VGG16", data_root=str(tmp_path / "data"),
                               paths=[f"{c}/img.jpg" for c in CLASSES], true=np.arange(5),
                               pred=np.array([0, 1, 2, 2, 4]), heatmaps=rng.random((5, 64, 64)), image_size=224, layer="block5_conv3",
                               method="gradcam")
    path = write_gradcam(tmp_path, examples)
    assert path == gradcam_path(tmp_path, "vgg16") == tmp_path / "vgg16_gradcam.npz"
    assert path.stat().st_size < 5 * 64 * 64 * 2 + 4096  # float16 heatmaps, compressed
    assert not list(tmp_path.glob(".*tmp*"))
    loaded = load_gradcam(tmp_path, "vgg16")
    assert loaded.paths == examples.paths and loaded.display_name == "VGG16" and loaded.image_size == 224
    assert np.array_equal(loaded.true, examples.true) and np.array_equal(loaded.pred, examples.pred)
    assert loaded.heatmaps.dtype == np.float16 and np.allclose(loaded.heatmaps, examples.heatmaps, atol=1e-3)
    assert (loaded.data_root, loaded.layer, loaded.method) == (str(tmp_path / "data"), "block5_conv3", "gradcam")
    with pytest.raises(FileNotFoundError):
        load_gradcam(tmp_path, "resnet50")


def test_results_json_is_plain_json(tmp_path, split):
    results = results_record(run="x", architecture="x", display_name="X", split=split, split_block={},
                             metrics={"accuracy": np.float64(0.5), "ece": float("nan")}, output_dir=Path(tmp_path),
                             versions={})
    text = write_results(tmp_path, results).read_text()
    assert json.loads(text)["metrics"] == {"accuracy": 0.5, "ece": None}


def test_the_versions_name_the_library_code_so_runs_of_edited_code_differ(tmp_path):
    package = Path(bloodcell_lib.__file__).parent
    copy = tmp_path / "bloodcell_lib"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_fingerprint(copy) == source_fingerprint(package) == library_versions()[SOURCE_KEY]
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.pyc").write_bytes(b"compiled")  # not the source
    assert source_fingerprint(copy) == source_fingerprint(package)
    explain = copy / "explain.py"
    explain.write_text(explain.read_text() + "\n# an edit\n")
    assert source_fingerprint(copy) != source_fingerprint(package)
    assert re.fullmatch(r"[0-9a-f]{12}", source_fingerprint(copy))
