"""compare_results on real results and predictions files written the way evaluation writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from bloodcell_lib.atomic import write_json
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.cli import main
from bloodcell_lib.compare import BASELINE_RUN, ENSEMBLE_RUN, NO_GROUPS, compare_results, display_table, markdown_table
from bloodcell_lib.config import profile_config
from bloodcell_lib.results import PROB_COLUMNS
from bloodcell_lib.metrics import compute_metrics, holm_adjust, mcnemar_p, paired_comparison
from bloodcell_lib.split import split_sha256

SPLIT_SHA = "a" * 64
CELLS = np.arange(100) // 2  # the fixture's 100 test images are 50 cells with two copies each


def _write_run(folder, run, arch, y_true, pred, split_by="group", paths=None, groups=CELLS, sha=SPLIT_SHA,
               seed=0, n_boot=200, matches_training_split=None, **extra):
    """Write <run>_predictions.csv and <run>_results.json for one-hot-ish predictions.

    groups=None writes a predictions file without a group column (as files from before groups were recorded);
    matches_training_split=False labels the run as evaluate --allow-other-split does.
    """
    n = len(y_true)
    proba = np.full((n, len(CLASSES)), 0.05)
    proba[np.arange(n), pred] = 0.8
    paths = paths or [f"{CLASSES[y]}/img_{i:03d}.jpg" for i, y in enumerate(y_true)]
    frame = pd.DataFrame({"path": paths, "true_label": [CLASSES[y] for y in y_true],
                          "pred_label": [CLASSES[p] for p in pred]})
    for k, col in enumerate(PROB_COLUMNS):
        frame[col] = proba[:, k]
    if groups is not None:
        frame["group"] = [f"g{g}" for g in groups]
    frame.to_csv(folder / f"{run}_predictions.csv", index=False)
    split = {"split_by": split_by, "sha256": sha}
    if matches_training_split is not None:
        split["matches_training_split"] = matches_training_split
    results = {"architecture": arch, "display_name": arch.upper(), "run": run, "weights": None, "image_size": 32,
               "split": split, "predictions_file": f"{run}_predictions.csv",
               "metrics": compute_metrics(y_true, proba, groups=groups, n_boot=n_boot, seed=seed),
               "cost": {"params_total": 1000, "flops_per_image": 2e6, "latency_ms_batch1_median": 1.5}, **extra}
    write_json(folder / f"{run}_results.json", results)


def _proba(pred):
    p = np.full((len(pred), len(CLASSES)), 0.05)
    p[np.arange(len(pred)), pred] = 0.8
    return p


@pytest.fixture()
def results_dir(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    good = np.where(rng.random(100) < 0.9, y, (y + 1) % 5)
    poor = np.where(rng.random(100) < 0.5, y, (y + 2) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, good)
    _write_run(tmp_path, "resnet50", "resnet50", y, poor)
    _write_run(tmp_path, BASELINE_RUN, BASELINE_RUN, y, np.full(100, 3))
    _write_run(tmp_path, "vgg16_imagesplit", "vgg16", y, y, split_by="image", sha="c" * 64,
               groups=np.arange(100))
    return tmp_path, y, good, poor


def test_table_has_every_run_and_the_baseline(results_dir):
    folder, *_ = results_dir
    comparison = compare_results(folder, expected=["vgg16", "resnet50", "xception"])
    assert list(comparison.table["run"]) == ["vgg16", "vgg16_imagesplit", "resnet50", ENSEMBLE_RUN, BASELINE_RUN]
    assert comparison.missing == ["xception (no results file)"]
    assert comparison.table.set_index("run").loc["vgg16", "accuracy_ci"][0] <= comparison.table.set_index(
        "run").loc["vgg16", "accuracy"]
    assert comparison.problems == []


def test_paired_table_compares_with_the_best_and_the_baseline_holm_adjusted(results_dir):
    folder, y, good, poor = results_dir
    comparison = compare_results(folder, expected=[])
    paired = comparison.paired
    assert list(zip(paired["run_a"], paired["run_b"])) == [
        ("vgg16", "resnet50"), ("vgg16", BASELINE_RUN), ("resnet50", BASELINE_RUN), (ENSEMBLE_RUN, "vgg16")]
    assert set(paired["metric"]) == {"macro_f1"}
    first = paired.iloc[0]
    assert first["delta"] == pytest.approx(f1_score(y, good, average="macro") - f1_score(y, poor, average="macro"))
    assert first["n_images"] == 100 and first["n_groups"] == 50 and first["groups_from"] == "predictions file"
    # the same test by hand: same groups, the study's bootstrap (from the results files), same resamples
    direct = paired_comparison(y, _proba(good), _proba(poor), CELLS, n_boot=200, seed=0, n_perm=2000)
    assert [first["ci_low"], first["ci_high"]] == pytest.approx(direct["ci"])
    assert first["p_value"] == pytest.approx(direct["p_value"])
    assert paired["p_holm"].tolist() == pytest.approx(holm_adjust(paired["p_value"].tolist()))
    assert (paired["p_holm"] >= paired["p_value"]).all()
    assert "vgg16_imagesplit" not in set(paired["run_a"]) | set(paired["run_b"])


def test_paired_tests_use_the_study_seed_and_reruns_agree(tmp_path):
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(5), 20)
    a = np.where(rng.random(100) < 0.8, y, (y + 1) % 5)
    b = np.where(rng.random(100) < 0.7, y, (y + 1) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, a, seed=7)
    _write_run(tmp_path, "resnet50", "resnet50", y, b, seed=7)
    first = compare_results(tmp_path, expected=[], n_boot=300).paired
    assert first.equals(compare_results(tmp_path, expected=[], n_boot=300).paired)
    pred = {"vgg16": a, "resnet50": b}
    row = first.iloc[0]
    direct = paired_comparison(y, _proba(pred[row["run_a"]]), _proba(pred[row["run_b"]]), CELLS, n_boot=300, seed=7,
                               n_perm=2000)
    assert [row["ci_low"], row["ci_high"]] == pytest.approx(direct["ci"])
    assert row["p_value"] == pytest.approx(direct["p_value"])


def test_paired_resamples_are_the_ones_the_models_intervals_drew(tmp_path):
    # resnet50 is wrong on every image, so its macro-F1 is 0 in every resample and each paired delta is
    # vgg16's own macro-F1 in that resample: with the same draws, the two intervals are the same numbers.
    y = np.repeat(np.arange(5), 20)
    good = np.where(np.random.default_rng(3).random(100) < 0.85, y, (y + 1) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, good, seed=7, n_boot=150)
    _write_run(tmp_path, "resnet50", "resnet50", y, (y + 2) % 5, seed=7, n_boot=150)
    comparison = compare_results(tmp_path, expected=[])
    row = comparison.paired.iloc[0]
    assert (row["run_a"], row["run_b"]) == ("vgg16", "resnet50")
    marginal = comparison.table.set_index("run").loc["vgg16", "macro_f1_ci"]
    assert [row["ci_low"], row["ci_high"]] == pytest.approx(marginal)
    assert (row["n_boot"], row["seed"]) == (150, 7)  # recorded in paired_tests.csv


def test_paired_bootstrap_falls_back_to_the_profile_only_when_nothing_is_recorded(tmp_path):
    y = np.repeat(np.arange(5), 20)
    rng = np.random.default_rng(4)
    pred = {"vgg16": np.where(rng.random(100) < 0.9, y, (y + 1) % 5),
            "resnet50": np.where(rng.random(100) < 0.6, y, (y + 1) % 5)}
    for run in pred:
        _write_run(tmp_path, run, run, y, pred[run], seed=3)
        path = tmp_path / f"{run}_results.json"
        results = json.loads(path.read_text())
        del results["metrics"]["bootstrap"]  # as results written before the bootstrap was recorded
        write_json(path, results)
    row = compare_results(tmp_path, expected=[]).paired.iloc[0]
    cfg = profile_config(None)  # the paper profile: the unit tests unset BLOODCELL_PROFILE
    direct = paired_comparison(y, _proba(pred["vgg16"]), _proba(pred["resnet50"]), CELLS, n_boot=cfg.bootstrap,
                               seed=cfg.seed, n_perm=2000)
    assert [row["ci_low"], row["ci_high"]] == pytest.approx(direct["ci"])
    assert (row["n_boot"], row["seed"]) == (cfg.bootstrap, cfg.seed)


def test_models_are_ranked_and_tested_by_macro_f1_not_accuracy(tmp_path):
    # 80 basophils and 5 of each other class: "lazy" calls everything basophil (accuracy 0.80, macro-F1
    # 0.18); "balanced" gets 70% of every class right (accuracy 0.70, macro-F1 about 0.6).
    y = np.array([0] * 80 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5)
    lazy = np.zeros(100, dtype=int)
    balanced = np.where(np.arange(100) % 10 < 7, y, (y + 1) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, lazy)
    _write_run(tmp_path, "resnet50", "resnet50", y, balanced)
    comparison = compare_results(tmp_path, expected=[])
    ranks = comparison.table.set_index("run")["rank"]
    assert ranks["resnet50"] == 1 and ranks["vgg16"] == 2
    assert comparison.table.set_index("run").loc["vgg16", "accuracy"] > comparison.table.set_index(
        "run").loc["resnet50", "accuracy"]
    assert comparison.conclusion().startswith("Best by macro-F1: RESNET50 (")
    row = comparison.paired.iloc[0]
    assert (row["run_a"], row["run_b"], row["metric"]) == ("resnet50", "vgg16", "macro_f1")
    assert row["delta"] > 0.3
    assert comparison.to_markdown().index("| rank |") < comparison.to_markdown().index("macro_f1")


def test_conclusion_reads_the_paired_interval_not_overlapping_marginal_intervals(tmp_path):
    # 100 cells of two copies; b equals a except that it is also wrong on 8 cells a gets right.
    rng = np.random.default_rng(1)
    cells = np.arange(200) // 2
    y = np.repeat(rng.integers(0, 5, 100), 2)
    a = np.where(np.repeat(rng.random(100) < 0.85, 2), y, (y + 1) % 5)
    right_cells = np.unique(cells[a == y])
    spoiled = np.isin(cells, rng.choice(right_cells, 8, replace=False))
    b = np.where(spoiled, (y + 2) % 5, a)
    paths = [f"img_{i:03d}.jpg" for i in range(200)]
    _write_run(tmp_path, "vgg16", "vgg16", y, a, paths=paths, groups=cells)
    _write_run(tmp_path, "resnet50", "resnet50", y, b, paths=paths, groups=cells)
    comparison = compare_results(tmp_path, expected=[])
    t = comparison.table.set_index("run")
    assert t.loc["vgg16", "macro_f1_ci"][0] < t.loc["resnet50", "macro_f1_ci"][1]  # marginal intervals overlap
    row = comparison.paired.iloc[0]
    assert row["ci_low"] > 0 and row["p_holm"] < 0.05
    text = comparison.conclusion()
    assert f"VGG16 leads RESNET50 by {row['delta']:.3f} macro-F1 [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in text
    assert "(paired over 100 cells); Holm p = " in text
    assert "so this test set separates them" in text and "overlap" not in text


def test_conclusion_says_when_the_paired_interval_includes_zero(results_dir):
    folder, y, good, _ = results_dir
    rng = np.random.default_rng(9)
    similar = np.where(rng.random(100) < 0.9, y, (y + 1) % 5)  # as good as vgg16, wrong elsewhere
    _write_run(folder, "resnet50", "resnet50", y, similar)
    comparison = compare_results(folder, expected=[])
    row = comparison.paired.iloc[0]
    assert row["ci_low"] < 0 < row["ci_high"]
    text = comparison.conclusion()
    assert "the paired interval includes 0, so this test set does not separate them" in text
    assert "baseline" in text


def test_runs_on_another_split_are_left_out_of_the_paired_tests(results_dir):
    folder, y, good, _ = results_dir
    _write_run(folder, "xception", "xception", y, y, sha="b" * 64)  # perfect, but on another split
    comparison = compare_results(folder, expected=[])
    assert (f"xception: evaluated on split {'b' * 12} but the majority of runs used {'a' * 12}; "
            "left out of paired tests") in comparison.problems
    assert "xception" not in set(comparison.paired["run_a"]) | set(comparison.paired["run_b"])
    assert "xception" not in comparison.mcnemar.index
    assert pd.isna(comparison.table.set_index("run").loc["xception", "rank"])
    text = comparison.conclusion()
    assert text.startswith("Best by macro-F1: VGG16") and "Not ranked" in text and "XCEPTION" in text


def test_runs_evaluated_on_a_split_their_model_was_not_trained_on_are_left_out(results_dir):
    folder, y, *_ = results_dir
    # perfect, on the study's split file, but its model was trained on another split (--allow-other-split)
    _write_run(folder, "xception", "xception", y, y, matches_training_split=False)
    comparison = compare_results(folder, expected=[])
    ranks = comparison.table.set_index("run")["rank"]
    assert pd.isna(ranks["xception"]) and ranks["vgg16"] == 1
    assert comparison.conclusion().startswith("Best by macro-F1: VGG16")
    assert "xception" not in set(comparison.paired["run_a"]) | set(comparison.paired["run_b"])
    assert "xception" not in comparison.mcnemar.index
    assert any(p.startswith("xception: evaluated on a split other than the one its model was trained on")
               and "left out of the ranking and the paired tests" in p for p in comparison.problems)


def test_missing_groups_are_read_from_the_split_file_or_noted(tmp_path):
    y = np.repeat(np.arange(5), 20)
    rng = np.random.default_rng(2)
    a = np.where(rng.random(100) < 0.9, y, (y + 1) % 5)
    b = np.where(rng.random(100) < 0.6, y, (y + 1) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, a, groups=None)
    _write_run(tmp_path, "resnet50", "resnet50", y, b, groups=None)
    comparison = compare_results(tmp_path, expected=[])
    row = comparison.paired.iloc[0]
    assert row["groups_from"] == NO_GROUPS and row["n_groups"] == 100
    assert any(p.startswith("vgg16: no duplicate groups found") for p in comparison.problems)
    assert "paired over 100 images (no duplicate groups known)" in comparison.conclusion()

    # With the study's split.csv in the folder (the split the results record), its groups are used.
    paths = [f"{CLASSES[v]}/img_{i:03d}.jpg" for i, v in enumerate(y)]
    split = pd.DataFrame({"path": paths, "label": [CLASSES[v] for v in y], "group": [f"g{c}" for c in CELLS],
                          "subset": "test"})
    split.to_csv(tmp_path / "split.csv", index=False)
    sha = split_sha256(tmp_path / "split.csv")
    _write_run(tmp_path, "vgg16", "vgg16", y, a, groups=None, sha=sha)
    _write_run(tmp_path, "resnet50", "resnet50", y, b, groups=None, sha=sha)
    comparison = compare_results(tmp_path, expected=[])
    row = comparison.paired.iloc[0]
    assert row["groups_from"] == "split file split.csv" and row["n_groups"] == 50
    assert not any("no duplicate groups" in p for p in comparison.problems)


def test_leakage_audit_column(results_dir):
    folder, y, good, _ = results_dir
    _write_run(folder, "vgg16", "vgg16", y, good,
               leakage_audit={"test_images_with_match_in_train": 3, "n_test": 100})
    shown = compare_results(folder, expected=[]).to_markdown()
    header = next(line for line in shown.splitlines() if line.startswith("| rank |"))
    assert "leakage audit" in header
    assert "| 3 of 100 |" in shown and "| — |" in shown


def test_mcnemar_is_kept_as_a_secondary_output(results_dir):
    folder, y, good, poor = results_dir
    comparison = compare_results(folder, expected=[])
    assert comparison.mcnemar.loc["vgg16", "resnet50"] == pytest.approx(mcnemar_p(y, good, poor))
    assert "vgg16_imagesplit" not in comparison.mcnemar.index  # other split → other test images
    assert "McNemar" not in comparison.conclusion()


def test_leakage_delta_is_image_split_minus_group_split(results_dir):
    folder, y, good, _ = results_dir
    leakage = compare_results(folder, expected=[]).leakage
    assert leakage.loc[0, "architecture"] == "vgg16"
    assert leakage.loc[0, "accuracy_delta"] == pytest.approx(1.0 - np.mean(good == y))


def test_conclusion_names_best_model_and_the_paired_test(results_dir):
    folder, *_ = results_dir
    comparison = compare_results(folder, expected=[])
    text = comparison.conclusion()
    assert text.startswith("Best by macro-F1: VGG16 (")
    assert "VGG16 leads RESNET50 by " in text  # the image-split run is not a contender: its score leaks
    assert "separates them" in text and "VGG16 leads Colour" not in text and "baseline" in text
    assert f"VGG16 leads {BASELINE_RUN.upper()} by " in text


def test_broken_and_partial_files_are_reported_not_fatal(results_dir):
    folder, *_ = results_dir
    (folder / "xception_results.json").write_text("{ not json")
    (folder / "resnet50_predictions.csv").unlink()
    comparison = compare_results(folder, expected=["xception"])
    assert any("xception_results.json" in p for p in comparison.problems)
    assert any("resnet50_predictions.csv" in p for p in comparison.problems)
    assert "resnet50" in set(comparison.table["run"])
    assert "No paired test of VGG16 against RESNET50" in comparison.conclusion()


def test_save_writes_csv_markdown_and_paired_tests(results_dir):
    folder, *_ = results_dir
    paths = compare_results(folder, expected=[]).save(folder)
    assert len(pd.read_csv(paths["csv"])) == 5  # vgg16, its image-split twin, resnet50, their ensemble, baseline
    assert len(pd.read_csv(paths["paired"])) == 4 and paths["paired"].name == "paired_tests.csv"
    md = paths["markdown"].read_text()
    assert "| model |" in md and "Leakage" in md and "Conclusion" in md
    assert "## Paired differences in macro-F1" in md and "Holm p" in md
    assert "## McNemar p-values (per image; ignores copies — secondary)" in md
    assert md.index("Paired differences") < md.index("McNemar")


def test_compare_command_prints_where_the_paired_tests_are(results_dir, capsys):
    folder, *_ = results_dir
    assert main(["compare", str(folder)]) == 0
    out = capsys.readouterr().out
    assert str(folder / "paired_tests.csv") in out and str(folder / "comparison.csv") in out
    assert "## Conclusion" in out and "Best by macro-F1: VGG16" in out


def test_the_baseline_run_name_has_one_home():
    library = Path(__file__).resolve().parents[1] / "bloodcell_lib"
    copies = [path.name for path in sorted(library.glob("*.py")) for quote in "\"'"
              if f"{quote}shortcut_baseline{quote}" in path.read_text(encoding="utf-8")]
    assert copies == ["baseline.py"]


def test_empty_folder_gives_an_empty_table(tmp_path):
    comparison = compare_results(tmp_path, expected=["vgg16"])
    assert comparison.table.empty and comparison.missing == ["vgg16 (no results file)"]
    assert comparison.paired.empty
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
                  study.show_paired_tests(comparison), study.show_gradcam_side_by_side(tmp_path)):
        assert isinstance(shown, str)
    assert study.shortcut_and_leakage(comparison).empty


def test_comparison_notebook_shows_the_paired_tests(results_dir):
    from bloodcell_lib import study

    folder, *_ = results_dir
    shown = study.show_paired_tests(compare_results(folder, expected=[]))
    assert list(shown["model a"]) == ["VGG16", "VGG16", "RESNET50", "Ensemble (soft vote of 2)"]
    assert "Holm p" in shown.columns


# --- the soft-vote ensemble -------------------------------------------------------------------------------


def test_an_ensemble_of_identical_models_is_the_model(tmp_path):
    y = np.repeat(np.arange(5), 20)
    pred = np.where(np.random.default_rng(6).random(100) < 0.8, y, (y + 1) % 5)
    for run in ("vgg16", "resnet50", "xception"):
        _write_run(tmp_path, run, run, y, pred, seed=4, n_boot=150)
    comparison = compare_results(tmp_path, expected=[])
    t = comparison.table.set_index("run")
    assert t.loc[ENSEMBLE_RUN, "model"] == "Ensemble (soft vote of 3)"
    assert comparison.ensemble_members == ["vgg16", "resnet50", "xception"]
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "myeloblast_recall", "log_loss", "ece"):
        assert t.loc[ENSEMBLE_RUN, key] == pytest.approx(t.loc["vgg16", key]), key
        assert t.loc[ENSEMBLE_RUN, f"{key}_ci"] == pytest.approx(t.loc["vgg16", f"{key}_ci"]), key  # same draws
    assert pd.isna(t.loc[ENSEMBLE_RUN, "rank"]) and t.loc[ENSEMBLE_RUN, "n_test"] == 100
    assert t.loc[ENSEMBLE_RUN, "params_total"] == 3000 and t.loc[ENSEMBLE_RUN, "flops_per_image"] == 6e6
    assert pd.isna(t.loc[ENSEMBLE_RUN, "latency_ms"])  # not measured: members may run in parallel or in turn
    row = comparison.paired[comparison.paired["run_a"] == ENSEMBLE_RUN].iloc[0]
    assert row["run_b"] == "vgg16" and row["delta"] == 0 and row["ci_low"] == row["ci_high"] == 0
    assert row["p_value"] == 1.0 and row["n_groups"] == 50
    text = comparison.conclusion()
    assert "Averaging the probabilities of VGG16, RESNET50, XCEPTION (soft vote, unranked) gives macro-F1" in text
    assert "Ensemble (soft vote of 3) and VGG16 tie" in text
    assert "Not ranked" not in text


def test_the_ensemble_is_the_mean_of_the_probabilities_and_is_tested_in_the_holm_family(tmp_path):
    # Three models, each wrong on a different fifth of the cells: the vote of the two that are right wins.
    y = np.repeat(np.arange(5), 20)
    cell_of = CELLS
    preds = {}
    for i, run in enumerate(("vgg16", "resnet50", "xception")):
        wrong = (cell_of % 5) == i
        preds[run] = np.where(wrong, (y + 1 + i) % 5, y)
        _write_run(tmp_path, run, run, y, preds[run], seed=2, n_boot=200)
    _write_run(tmp_path, BASELINE_RUN, BASELINE_RUN, y, np.full(100, 3), seed=2, n_boot=200)
    comparison = compare_results(tmp_path, expected=[])
    mean = np.mean([_proba(preds[run]) for run in preds], axis=0)
    expected = compute_metrics(y, mean, groups=CELLS, n_boot=200, seed=2)
    e = comparison.table.set_index("run").loc[ENSEMBLE_RUN]
    assert e["accuracy"] == pytest.approx(1.0) and e["macro_f1"] == pytest.approx(1.0)
    assert e["log_loss"] == pytest.approx(expected["log_loss"])
    assert e["macro_f1_ci"] == pytest.approx(expected["macro_f1_ci"])
    paired = comparison.paired
    row = paired[paired["run_a"] == ENSEMBLE_RUN].iloc[0]
    best = comparison.ranked().iloc[0]["run"]
    assert row["run_b"] == best and row["model_a"] == "Ensemble (soft vote of 3)"
    direct = paired_comparison(y, mean, _proba(preds[best]), CELLS, n_boot=200, seed=2, n_perm=2000)
    assert row["delta"] == pytest.approx(direct["delta"]) and row["delta"] > 0.1
    assert [row["ci_low"], row["ci_high"]] == pytest.approx(direct["ci"])
    assert row["p_value"] == pytest.approx(direct["p_value"])
    assert paired["p_holm"].tolist() == pytest.approx(holm_adjust(paired["p_value"].tolist()))  # one family
    assert len(paired) == 2 + 3 + 1  # best vs 2 others, 3 CNNs vs baseline, the ensemble vs the best
    assert ENSEMBLE_RUN not in comparison.mcnemar.index  # McNemar stays among the networks
    assert "(the ensemble's test against the best single model included)" in comparison.to_markdown()


def test_the_ensemble_leaves_out_the_runs_the_comparison_leaves_out(results_dir):
    folder, y, good, poor = results_dir
    _write_run(folder, "xception", "xception", y, y, sha="b" * 64)  # another split
    _write_run(folder, "densenet201", "densenet201", y, y, matches_training_split=False)  # trained elsewhere
    comparison = compare_results(folder, expected=[])
    assert comparison.ensemble_members == ["vgg16", "resnet50"]  # not the image-split run nor the baseline
    mean = (_proba(good) + _proba(poor)) / 2
    e = comparison.table.set_index("run").loc[ENSEMBLE_RUN]
    assert e["model"] == "Ensemble (soft vote of 2)"
    assert e["macro_f1"] == pytest.approx(compute_metrics(y, mean, groups=CELLS, n_boot=0)["macro_f1"])
    assert list(comparison.table["run"])[-2:] == [ENSEMBLE_RUN, BASELINE_RUN]


def test_no_ensemble_with_fewer_than_two_ranked_cnns(results_dir):
    folder, *_ = results_dir
    (folder / "resnet50_results.json").unlink()  # vgg16, its image-split twin and the baseline remain
    comparison = compare_results(folder, expected=[])
    assert ENSEMBLE_RUN not in set(comparison.table["run"]) and comparison.ensemble_members == []
    assert ENSEMBLE_RUN not in set(comparison.paired["run_a"])
    assert "soft vote" not in comparison.conclusion()
    assert "Holm p adjusted over every row." in comparison.to_markdown()


def test_the_ensemble_covers_only_the_images_its_members_share(tmp_path):
    y = np.repeat(np.arange(5), 20)
    pred = np.where(np.random.default_rng(8).random(100) < 0.8, y, (y + 1) % 5)
    paths = [f"{CLASSES[v]}/img_{i:03d}.jpg" for i, v in enumerate(y)]
    _write_run(tmp_path, "vgg16", "vgg16", y, pred, paths=paths)
    _write_run(tmp_path, "resnet50", "resnet50", y[:80], pred[:80], paths=paths[:80], groups=CELLS[:80])
    comparison = compare_results(tmp_path, expected=[])
    assert comparison.table.set_index("run").loc[ENSEMBLE_RUN, "n_test"] == 80
    assert any(p.startswith("the ensemble covers the 80 test images all of") for p in comparison.problems)


def test_compare_command_trains_the_missing_baseline_on_the_studys_split_and_writes_the_report(tmp_path, capsys):
    from bloodcell_lib.baseline import RUN_NAME
    from bloodcell_lib.split import SPLIT_FILE, make_split, save_split
    from bloodcell_lib.synthetic import make_synthetic_dataset

    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic_dataset(data, per_class=8, size=48, duplicates=1, seed=2)
    out.mkdir()
    save_split(make_split(data, seed=1, progress=False), out / SPLIT_FILE)
    assert main(["compare", str(out)]) == 0
    assert (out / f"{RUN_NAME}_results.json").is_file()
    printed = capsys.readouterr().out
    assert str(out / "comparison.html") in printed
    assert pd.read_csv(out / "comparison.csv")["run"].tolist() == [RUN_NAME]


# --- Calibration, TTA and the background shortcut test beside the ranking -------------------------------------


def _shortcut_block(background, low, chance=0.2):
    def entry(acc, ci):
        return {"accuracy": acc, "accuracy_ci": ci, "macro_f1": acc, "macro_f1_ci": ci}

    return {"original": entry(0.9, [0.85, 0.95]), "background_only": entry(background, [low, background + 0.05]),
            "cell_only": entry(0.7, [0.6, 0.8]), "chance": chance, "margin": 0.1, "flagged": low > chance + 0.1}


def _calibration_block(t, before, after):
    def scores(ece):
        return {"ece": ece, "classwise_ece": ece / 2, "brier": 0.3, "log_loss": 0.5, "accuracy": 0.9}

    return {"temperature": t, "temperature_at_bound": False, "before": scores(before), "after": scores(after),
            "change": {"ece": {"delta": after - before, "ci": [after - before - 0.01, after - before + 0.01],
                               "p_value": 0.01}}}


def _tta_block(value, delta):
    return {"enabled": True, "views": 8, "macro_f1": value, "macro_f1_ci": [value - 0.05, value + 0.05],
            "accuracy": value, "accuracy_ci": [value - 0.05, value + 0.05], "macro_f1_delta": delta,
            "macro_f1_delta_ci": [delta - 0.02, delta + 0.02], "macro_f1_delta_p": 0.2}


@pytest.fixture()
def robustness_dir(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    good = np.where(rng.random(100) < 0.9, y, (y + 1) % 5)
    poor = np.where(rng.random(100) < 0.6, y, (y + 2) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, good, shortcut_test=_shortcut_block(0.24, 0.18),
               calibration=_calibration_block(1.5, 0.12, 0.03), tta=_tta_block(0.91, 0.01))
    _write_run(tmp_path, "resnet50", "resnet50", y, poor, shortcut_test=_shortcut_block(0.7, 0.62),
               calibration=_calibration_block(0.8, 0.05, 0.04), tta={"enabled": False, "why": "off"})
    _write_run(tmp_path, BASELINE_RUN, BASELINE_RUN, y, np.full(100, 3))
    return tmp_path


def test_a_network_that_reads_the_background_is_flagged_in_the_table_and_the_conclusion(robustness_dir):
    comparison = compare_results(robustness_dir, expected=["vgg16", "resnet50"])
    t = comparison.table.set_index("run")
    assert t.loc["resnet50", "reads_background"] == True and t.loc["vgg16", "reads_background"] == False  # noqa: E712
    assert pd.isna(t.loc[BASELINE_RUN, "reads_background"]) and pd.isna(t.loc[ENSEMBLE_RUN, "reads_background"])
    assert t.loc["resnet50", "background_only_accuracy"] == 0.7 and t.loc["resnet50", "cell_only_accuracy"] == 0.7
    text = comparison.conclusion()
    assert "Far above chance with the cell masked out" in text and "RESNET50 0.700 [0.620, 0.750]" in text
    assert "VGG16 0.240" not in text
    shown = comparison.to_markdown()
    assert "The background shortcut, tested directly" in shown and "| YES |" in shown


def test_no_flag_says_so(robustness_dir):
    _write_run(robustness_dir, "resnet50", "resnet50", np.repeat(np.arange(5), 20), np.repeat(np.arange(5), 20),
               shortcut_test=_shortcut_block(0.25, 0.2))
    text = compare_results(robustness_dir, expected=["vgg16", "resnet50"]).conclusion()
    assert "No network scores far above chance with the cell masked out" in text


def test_calibrated_and_uncalibrated_ece_and_tta_are_columns(robustness_dir):
    from bloodcell_lib.compare import display_calibration, display_shortcut, display_tta

    comparison = compare_results(robustness_dir, expected=["vgg16", "resnet50"])
    t = comparison.table.set_index("run")
    assert t.loc["vgg16", "temperature"] == 1.5 and t.loc["vgg16", "ece_calibrated"] == 0.03
    assert t.loc["vgg16", "classwise_ece"] == 0.06 and t.loc["vgg16", "ece_change_ci"] == pytest.approx([-0.1, -0.08])
    assert t.loc["vgg16", "tta_macro_f1"] == 0.91 and pd.isna(t.loc["resnet50", "tta_macro_f1"])
    calibration = display_calibration(comparison.table)
    assert list(calibration["model"]) == ["VGG16", "RESNET50"]
    assert calibration.loc[0, "ECE T-scaled"] == "0.030" and calibration.loc[0, "Δ ECE [95% CI]"].startswith("-0.090")
    assert list(display_tta(comparison.table)["model"]) == ["VGG16"]  # TTA off for ResNet50
    assert list(display_shortcut(comparison.table)["reads background"]) == ["no", "YES"]
    text = comparison.conclusion()
    assert "Temperature scaling (T = 1.50" in text and "Test-time augmentation" in text
    header = comparison.to_markdown()
    for column in ("ece T-scaled", "TTA macro_f1", "background-only acc", "reads background"):
        assert column in header


def test_fields_that_do_not_apply_to_the_baseline_show_a_dash_not_nan(results_dir):
    folder, *_ = results_dir
    shown = display_table(compare_results(folder, expected=[]).table)
    baseline = shown[shown["model"].str.contains("baseline|Colour", case=False)].iloc[0]
    assert baseline["weights"] == "—" and baseline["size"] != "nan"
    assert "nan" not in markdown_table(shown).lower()


def test_a_network_explained_on_another_image_set_is_named():
    from bloodcell_lib.compare import explanation_set_problems

    table = pd.DataFrame({"model": ["A", "B", "C", "baseline"], "explanation_set_sha256": ["x" * 64, "x" * 64,
                                                                                          "y" * 64, None],
                          "explanation_set_n": [100, 100, 50, None]})
    problems = explanation_set_problems(table)
    assert len(problems) == 1 and problems[0].startswith("C: explained on another image set (50 images")
    assert explanation_set_problems(table.iloc[[0, 1, 3]]) == []
