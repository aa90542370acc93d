"""compare_results on real results and predictions files written the way evaluation writes them."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from bloodcell_lib.atomic import write_json
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.compare import BASELINE_RUN, compare_results, markdown_table
from bloodcell_lib.evaluation import PROB_COLUMNS
from bloodcell_lib.metrics import compute_metrics, mcnemar_p


def _write_run(folder, run, arch, y_true, pred, split_by="group", paths=None):
    """Write <run>_predictions.csv and <run>_results.json for one-hot-ish predictions."""
    n = len(y_true)
    proba = np.full((n, len(CLASSES)), 0.05)
    proba[np.arange(n), pred] = 0.8
    paths = paths or [f"{CLASSES[y]}/img_{i:03d}.jpg" for i, y in enumerate(y_true)]
    frame = pd.DataFrame({"path": paths, "true_label": [CLASSES[y] for y in y_true],
                          "pred_label": [CLASSES[p] for p in pred]})
    for k, col in enumerate(PROB_COLUMNS):
        frame[col] = proba[:, k]
    frame.to_csv(folder / f"{run}_predictions.csv", index=False)
    results = {"architecture": arch, "display_name": arch.upper(), "run": run, "weights": None, "image_size": 32,
               "split": {"split_by": split_by}, "predictions_file": f"{run}_predictions.csv",
               "metrics": compute_metrics(y_true, proba, n_boot=50),
               "cost": {"params_total": 1000, "flops_per_image": 2e6, "latency_ms_batch1_median": 1.5}}
    write_json(folder / f"{run}_results.json", results)


@pytest.fixture()
def results_dir(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    good = np.where(rng.random(100) < 0.9, y, (y + 1) % 5)
    poor = np.where(rng.random(100) < 0.5, y, (y + 2) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, good)
    _write_run(tmp_path, "resnet50", "resnet50", y, poor)
    _write_run(tmp_path, BASELINE_RUN, BASELINE_RUN, y, np.full(100, 3))
    _write_run(tmp_path, "vgg16_imagesplit", "vgg16", y, y, split_by="image")
    return tmp_path, y, good, poor


def test_table_has_every_run_and_the_baseline(results_dir):
    folder, *_ = results_dir
    comparison = compare_results(folder, expected=["vgg16", "resnet50", "xception"])
    assert list(comparison.table["run"]) == ["vgg16", "vgg16_imagesplit", "resnet50", BASELINE_RUN]
    assert comparison.missing == ["xception (no results file)"]
    assert comparison.table.set_index("run").loc["vgg16", "accuracy_ci"][0] <= comparison.table.set_index(
        "run").loc["vgg16", "accuracy"]


def test_mcnemar_matrix_matches_the_direct_test(results_dir):
    folder, y, good, poor = results_dir
    comparison = compare_results(folder, expected=[])
    assert comparison.mcnemar.loc["vgg16", "resnet50"] == pytest.approx(mcnemar_p(y, good, poor))
    assert "vgg16_imagesplit" not in comparison.mcnemar.index  # other split → other test images


def test_leakage_delta_is_image_split_minus_group_split(results_dir):
    folder, y, good, _ = results_dir
    leakage = compare_results(folder, expected=[]).leakage
    assert leakage.loc[0, "architecture"] == "vgg16"
    assert leakage.loc[0, "accuracy_delta"] == pytest.approx(1.0 - np.mean(good == y))


def test_conclusion_names_best_model_and_interval_overlap(results_dir):
    folder, *_ = results_dir
    comparison = compare_results(folder, expected=[])
    text = comparison.conclusion()
    assert text.startswith("Best by macro-F1: VGG16 (")
    assert "Runner-up: RESNET50" in text  # the image-split run is not a contender: its score leaks
    assert "do not overlap" in text and "baseline" in text


def test_broken_and_partial_files_are_reported_not_fatal(results_dir):
    folder, *_ = results_dir
    (folder / "xception_results.json").write_text("{ not json")
    (folder / "resnet50_predictions.csv").unlink()
    comparison = compare_results(folder, expected=["xception"])
    assert any("xception_results.json" in p for p in comparison.problems)
    assert any("resnet50_predictions.csv" in p for p in comparison.problems)
    assert "resnet50" in set(comparison.table["run"])


def test_save_writes_csv_and_markdown(results_dir):
    folder, *_ = results_dir
    paths = compare_results(folder, expected=[]).save(folder)
    assert len(pd.read_csv(paths["csv"])) == 4
    md = paths["markdown"].read_text()
    assert "| model |" in md and "McNemar" in md and "Leakage" in md and "Conclusion" in md


def test_empty_folder_gives_an_empty_table(tmp_path):
    comparison = compare_results(tmp_path, expected=["vgg16"])
    assert comparison.table.empty and comparison.missing == ["vgg16 (no results file)"]
    assert "No trained model" in comparison.conclusion()


def test_markdown_table_escapes_pipes():
    text = markdown_table(pd.DataFrame({"a": ["x|y"], "b": [0.12345]}))
    assert text.splitlines()[2] == "| x/y | 0.123 |"


def test_comparison_notebook_steps_survive_an_empty_folder(tmp_path):
    """Regression: with no results at all the Comparison notebook crashed drawing the metric bars."""
    from bloodcell_lib import study

    comparison = study.compare(tmp_path)
    assert study.comparison_table(comparison).empty
    for shown in (study.show_metric_bars(comparison, "macro_f1"), study.show_cost_scatter(comparison, "latency_ms"),
                  study.show_mcnemar(comparison), study.show_gradcam_side_by_side(tmp_path)):
        assert isinstance(shown, str)
    assert study.shortcut_and_leakage(comparison).empty
