"""crossval.py: out-of-fold predictions and results from the folds' own folders, on cases whose answer is known."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest

from bloodcell_lib.calibration import calibration_report
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.compare import compare_study
from bloodcell_lib.config import resolve
from bloodcell_lib.crossval import collect_cross_validation, cv_path, cv_table, fold_folders
from bloodcell_lib.metrics import compute_metrics
from bloodcell_lib.results import PROB_COLUMNS, record_predictions, results_record, split_info, write_results
from bloodcell_lib.split import resolve_split


def _proba(rows: pd.DataFrame, skill: float) -> np.ndarray:
    """Probabilities that favour the true class by `skill`, with a per-image wobble fixed by the path."""
    out = []
    for path, label in zip(rows["path"], rows["label"]):
        rng = np.random.default_rng(zlib.crc32(path.encode()))
        p = rng.dirichlet(np.ones(len(CLASSES))) * (1 - skill)
        p[CLASSES.index(label)] += skill
        out.append(p)
    return np.array(out)


def _fake_run(cfg, split, arch: str, skill: float, temperature_fit: bool = True) -> None:
    """Write what evaluate() writes for a model, from made-up probabilities: predictions, results with calibration
    and TTA (TTA = the plain pass, so its difference is 0)."""
    folder = cfg.output_path
    test = split[split["subset"] == "test"]
    frame, metrics = record_predictions(folder, arch, test, _proba(test, skill), n_boot=50, seed=0)
    record_predictions(folder, arch, test, _proba(test, skill), n_boot=0, seed=0, variant="tta")
    val = split[split["subset"] == "val"]
    calibration = calibration_report(val["label"].map(CLASSES.index).to_numpy(), _proba(val, skill),
                                     frame["true_label"].map(CLASSES.index).to_numpy(),
                                     frame[PROB_COLUMNS].to_numpy(), groups=frame["group"].to_numpy(), n_boot=20)
    results = results_record(run=arch, architecture=arch, display_name=arch.upper(), split=split,
                             split_block={**split_info(split), "matches_training_split": True}, metrics=metrics,
                             output_dir=folder, versions={}, weights="none (random init)", image_size=32)
    results["calibration"] = calibration
    results["tta"] = {"enabled": True, "predictions_file": f"{arch}_tta_predictions.csv"}
    acc = metrics["accuracy"]
    results["shortcut_test"] = {"original": {"accuracy": acc}, "background_only": {"accuracy": 0.2},
                                "cell_only": {"accuracy": acc}, "chance": 0.2, "margin": 0.1, "n": int(len(test))}
    results["cost"] = {"params_total": 1000, "training_seconds": 10.0 * (cfg.fold or 1)}
    write_results(folder, results)


@pytest.fixture(scope="module")
def cv_study(tiny_set, tmp_path_factory):
    """A study folder with 2 folds × 2 seeds of two made-up models: 'good' (skill 0.6) and 'same' (its twin)."""
    out = tmp_path_factory.mktemp("cv") / "OUT"
    for seed in (1, 2):
        for fold in (1, 2):
            cfg = resolve("smoke", data_dir=str(tiny_set), output_dir=str(out), folds=2, fold=fold, seed=seed)
            split, _ = resolve_split(cfg, verbose=0)
            _fake_run(cfg, split, "vgg16", skill=0.6)
            _fake_run(cfg, split, "resnet50", skill=0.6)  # the same probabilities: an identical model
    return out


def test_out_of_fold_predictions_cover_every_image_once_per_seed(cv_study, tiny_set):
    assert list(fold_folders(cv_study)) == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
    problems = collect_cross_validation(cv_study)
    assert problems == []
    oof = pd.read_csv(cv_path(cv_study) / "vgg16_oof_predictions.csv")
    n_images = sum(1 for p in tiny_set.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    assert len(oof) == 2 * n_images and oof.groupby("seed")["path"].nunique().tolist() == [n_images, n_images]
    assert (oof.groupby(["seed", "path"]).size() == 1).all()
    # Every image's out-of-fold prediction comes from the fold that held it out.
    for (seed, fold), rows in oof.groupby(["seed", "fold"]):
        split = pd.read_csv(cv_path(cv_study) / f"seed{seed}-fold{fold}of2" / "split.csv")
        assert set(rows["path"]) == set(split.loc[split["subset"] == "test", "path"])


def test_the_cross_validated_results_are_the_out_of_fold_metrics_and_the_fold_spread(cv_study):
    collect_cross_validation(cv_study)
    results = json.loads((cv_path(cv_study) / "vgg16_results.json").read_text())
    oof = pd.read_csv(cv_path(cv_study) / results["predictions_file"])
    expected = compute_metrics(oof["true_label"].map(CLASSES.index).to_numpy(), oof[PROB_COLUMNS].to_numpy(),
                               groups=oof["group"].to_numpy(), n_boot=50, seed=0)
    assert results["metrics"]["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert results["metrics"]["macro_f1_ci"] == pytest.approx(expected["macro_f1_ci"])
    per_fold = [row["macro_f1"] for row in results["cv"]["per_fold"]]
    assert len(per_fold) == 4 and results["cv"]["macro_f1_mean"] == pytest.approx(np.mean(per_fold))
    assert results["cv"]["macro_f1_sd"] == pytest.approx(np.std(per_fold, ddof=1))
    assert results["cost"]["training_seconds"] == pytest.approx(15.0)  # the mean over folds 1, 2 (10 s × fold)
    assert results["tta"]["enabled"] and results["tta"]["macro_f1_delta"] == pytest.approx(0.0)
    assert results["calibration"]["temperature"] > 0 and len(results["calibration"]["temperatures"]) == 4
    assert results["shortcut_test"]["flagged"] is False
    assert results["split"]["cross_validation"] and results["split"]["seeds"] == [1, 2]
    table = cv_table(cv_path(cv_study))
    assert set(table["run"]) >= {"vgg16", "resnet50", "shortcut_baseline"} and "±" in table["macro_f1"].iloc[0]


def test_the_comparison_of_a_cross_validation_ranks_oof_scores_and_an_identical_ensemble_equals_the_model(cv_study):
    comparison, folder, cross = compare_study(cv_study)
    assert folder == cv_path(cv_study) and comparison is cross  # no hold-out models: the CV is the study
    table = comparison.table.set_index("run")
    assert table.loc["vgg16", "cv_folds"] == 2 and table.loc["vgg16", "cv_seeds"] == 2
    # Two identical models: the soft vote is the model, and their paired difference is exactly 0.
    assert table.loc["ensemble", "macro_f1"] == pytest.approx(table.loc["vgg16", "macro_f1"])
    paired = comparison.paired.set_index(["run_a", "run_b"])
    assert paired.loc[("vgg16", "resnet50"), "delta"] == pytest.approx(0.0)
    # With two seeds, each image is paired once per seed: as many pairs as out-of-fold rows, twice the images.
    oof = pd.read_csv(folder / "vgg16_oof_predictions.csv")
    assert paired.loc[("vgg16", "resnet50"), "n_images"] == len(oof) == 2 * oof["path"].nunique()
    assert (folder / "comparison.md").is_file() and "folds mean ± sd" in (folder / "comparison.md").read_text()


def test_a_missing_fold_is_named_and_its_run_is_not_paired_with_complete_ones(cv_study, tmp_path):
    import shutil

    study = tmp_path / "OUT"
    shutil.copytree(cv_study, study)
    (study / "cv" / "seed2-fold2of2" / "resnet50_results.json").unlink()
    problems = collect_cross_validation(study)
    assert any("resnet50: no results for seed 2 fold 2 of 2" in p for p in problems)
    comparison, _, _ = compare_study(study)
    assert not ((comparison.paired["run_a"] == "resnet50") | (comparison.paired["run_b"] == "resnet50")).any()
