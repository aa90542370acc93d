"""Evaluation end to end on real files: two trained models, the CLI, results JSON, predictions CSV, compare."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.evaluation import PROB_COLUMNS, select_gradcam_examples

ARCHS = ("vgg16", "efficientnetb3")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloodcell_lib", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic set, one split, and two architectures trained one epoch each through the CLI."""
    from bloodcell_lib.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("evaluation")
    data, out = root / "data", root / "OUT"
    make_synthetic_dataset(data, per_class=8, size=48, duplicates=1, seed=3)
    assert _cli("split", str(data), "--out", str(out / "split.csv"), "--seed", "1").returncode == 0
    for arch in ARCHS:
        run = _cli("train", "--arch", arch, "--data-dir", str(data), "--split", str(out / "split.csv"),
                   "--epochs", "1", "--image-size", "32", "--weights", "none", "--batch-size", "16",
                   "--output", str(out), "--eager")
        assert run.returncode == 0, run.stderr[-2000:]
    return data, out


@pytest.fixture(scope="module")
def evaluated(trained):
    data, out = trained
    for arch in ARCHS:
        run = _cli("evaluate", "--model", str(out / f"{arch}.keras"), "--split", str(out / "split.csv"),
                   "--output", str(out), "--gradcam-images", "10")
        assert run.returncode == 0, run.stderr[-2000:]
    return data, out


@pytest.mark.parametrize("arch", ARCHS)
def test_numbers_recompute_from_the_predictions_csv(evaluated, arch):
    _, out = evaluated
    results = json.loads((out / f"{arch}_results.json").read_text())
    frame = pd.read_csv(out / f"{arch}_predictions.csv")
    assert list(frame.columns[:3]) == ["path", "true_label", "pred_label"]
    assert [c for c in frame.columns if c.startswith("prob_")] == PROB_COLUMNS
    assert results["metrics"]["accuracy"] == pytest.approx(accuracy_score(frame.true_label, frame.pred_label))
    assert results["metrics"]["macro_f1"] == pytest.approx(f1_score(frame.true_label, frame.pred_label,
                                                                      average="macro"))
    split = pd.read_csv(out / "split.csv")
    assert sorted(frame.path) == sorted(split.loc[split.subset == "test", "path"])


def test_results_file_holds_every_block(evaluated):
    _, out = evaluated
    results = json.loads((out / "efficientnetb3_results.json").read_text())
    for key in ("architecture", "weights", "image_size", "epochs", "split", "metrics", "cost", "explainability",
                "versions", "config"):
        assert results.get(key) is not None, key
    assert results["image_size"] == 32 and results["weights"].startswith("none")
    assert len(results["split"]["sha256"]) == 64 and sum(results["split"]["sizes"].values()) == 80
    assert results["epochs"]["total"] == 1
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "log_loss", "ece", "myeloblast_recall"):
        low, high = results["metrics"][f"{key}_ci"]
        assert low is None or low <= high
    assert {"gradcam", "gradcam++"} <= set(results["explainability"])
    assert results["cost"]["params_total"] > 0 and results["cost"]["latency_ms_batch1_median"] > 0
    for name in ("confusion", "confusion_normalised", "roc", "curves", "gradcam", "samples"):
        assert (out / f"efficientnetb3_{name}.png").stat().st_size > 1000


def test_compare_cli_prints_both_models_baseline_and_mcnemar(evaluated):
    _, out = evaluated
    assert _cli("baseline", "--split", str(out / "split.csv"), "--output", str(out)).returncode == 0
    run = _cli("compare", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("VGG16", "EfficientNetB3", "Colour-only baseline", "McNemar"):
        assert name in run.stdout
    mcnemar = pd.read_csv(out / "mcnemar.csv", index_col=0)
    p = mcnemar.loc["vgg16", "efficientnetb3"]
    assert 0.0 <= p <= 1.0
    assert len(pd.read_csv(out / "comparison.csv")) == 3


def test_gradcam_examples_cover_right_and_wrong_of_every_class():
    frame = pd.DataFrame({"true_label": np.repeat(CLASSES, 4), "pred_label": np.repeat(CLASSES, 4)})
    frame.loc[::4, "pred_label"] = "monocyte"  # one wrong prediction per class (or right, for monocyte)
    idx = select_gradcam_examples(frame, 10)
    chosen = frame.iloc[idx]
    assert len(idx) == 10 and len(set(idx)) == 10
    for name in CLASSES:
        rows = chosen[chosen.true_label == name]
        assert (rows.pred_label == name).any()
        if name != "monocyte":
            assert (rows.pred_label != name).any()


def test_missing_model_file_is_a_clear_error(tmp_path):
    run = _cli("evaluate", "--model", str(tmp_path / "nope.keras"), "--split", str(tmp_path / "s.csv"))
    assert run.returncode == 2 and "nope.keras" in run.stderr


def test_the_test_subset_gets_exactly_one_prediction_pass(trained, tmp_path):
    from bloodcell_lib.evaluation import evaluate
    from bloodcell_lib.model import load_trained_model
    from bloodcell_lib.split import load_split

    _, out = trained
    model, _ = load_trained_model(out / "vgg16.keras")
    calls = []
    original = model.predict
    model.predict = lambda *a, **k: calls.append(1) or original(*a, **k)
    evaluate(model, load_split(out / "split.csv"), "test", tmp_path, gradcam_images=0, n_boot=10,
             make_figures=False, cost_repeats=1)
    assert len(calls) == 1
