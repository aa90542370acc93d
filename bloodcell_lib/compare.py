"""The cross-model comparison: one table from every `*_results.json` in a folder, paired tests, leakage delta.

Models are ranked and tested on one metric, macro-F1. Every CNN is compared with the best one and with the
shortcut baseline by a paired cluster bootstrap over the test cells both runs saw, with a group sign-flip
p-value (metrics.paired_comparison), and the p-values are Holm-adjusted over that family. Only runs
evaluated on one split file (the SHA-256 most runs share) are compared. The conclusion reads the paired
interval, never whether two marginal intervals overlap: two models can both have wide intervals and still
differ consistently on the same cells. The paired bootstrap draws the resamples the models' own intervals were
drawn from (the n_boot and seed their results files record), so the paired and the marginal intervals agree on
which cells each resample holds. Runs evaluated on a split their model was not trained on are not compared.
McNemar's per-image test is kept as a secondary output only; it treats copies of one cell as independent
evidence and rejects far too often.

When two or more CNNs are ranked, their soft vote (the mean of their class probabilities on the test images
they all share; no retraining, no weights tuned on the test set) is added as a row "Ensemble (soft vote of N)"
with intervals from the study's resamples, unranked (it is not one of the networks the study compares), and
tested against the best single CNN in the same Holm family as every other paired test: it is one more claim
the conclusion makes from the same test cells, so it shares their family-wise error rate.

Three measurements each network's evaluation records sit beside the ranking, never in it: calibration (ECE before
and after temperature scaling fitted on validation), test-time augmentation (macro-F1 averaged over rotations and
flips, with its paired difference to the plain pass) and the background shortcut test (accuracy with the cell
masked out and with the background masked out). A network whose background-only accuracy is far above chance is
flagged in the `reads_background` column and named in the conclusion.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bloodcell_lib.atomic import write_text
from bloodcell_lib.baseline import RUN_NAME as BASELINE_RUN
from bloodcell_lib.baseline import baseline_resampling, ensure_shortcut_baseline
from bloodcell_lib.crossval import collect_cross_validation, cv_path
from bloodcell_lib.learning_curve import write_learning_curve
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.metrics import SCALAR_KEYS, compute_metrics, holm_adjust, mcnemar_p, paired_comparison
from bloodcell_lib.registry import ARCHITECTURES
from bloodcell_lib.results import (PROB_COLUMNS, predictions_path, read_predictions, read_results, results_files,
                                   run_of)
from bloodcell_lib.shortcut import SHORTCUT_MARGIN, reads_background
from bloodcell_lib.split import SPLIT_FILE, split_sha256

# Ranking and testing use the same metric, so a "best" model is never backed by a test of something else.
RANK_METRIC = "macro_f1"
ALPHA = 0.05
# Group swaps per paired p-value: enough that Holm over ~10 comparisons is not limited by resolution (the
# smallest p is 1/2001). Swaps are not bootstrap resamples, so this need not match the study's n_boot.
PAIRED_N_PERM = 2000
NO_GROUPS = "none (each image its own group)"
# The soft-vote ensemble's run name: one home, like the baseline's.
ENSEMBLE_RUN = "ensemble"
# Costs that add up over an ensemble's members (each member runs once per image); latency is not measured.
ENSEMBLE_SUMMED_COST = ("params_total", "params_trainable", "flops_per_image", "keras_file_mb", "training_seconds")
# How to read the three measurements beside the ranking: comparison.md and the HTML report print these.
READ_CALIBRATION = (
    "ECE is the average gap between a model's confidence and how often it is right (0 = its 90% means 90%). "
    "Temperature scaling divides the logits by one number T fitted on the validation images (T > 1: the model was "
    "over-confident); it never changes a prediction, only how sure the model says it is, so read the T-scaled ECE "
    "as the confidence you can trust after that one-number fix, and the interval of the change to see whether the "
    "fix helped on the test cells."
)
READ_EXPLANATIONS = (
    "Every network is explained on one set of test images chosen before any prediction (class-stratified, from the "
    "split and the seed alone; `set` is its fingerprint, equal for all). Focus: how much of the Grad-CAM heat lies "
    "on the cell rather than the background. Deletion ÷ random: how fast the predicted class's probability falls "
    "when the hottest pixels are removed first, relative to removing them in a random order — below 1 means the map "
    "points at what the prediction rests on, 1 means it does no better than chance. Sanity ρ near 1 would mean the "
    "map hardly changes when the network's weights are randomised (an explanation of the image, not of the model)."
)
READ_TTA = (
    "Each test image is predicted in its 8 rotations and mirror images and the probabilities are averaged (a cell "
    "has no up or down). The paired difference is TTA minus the single pass on the same cells; when its interval "
    "includes 0, averaging over orientations does not change the score on this test set."
)
READ_SHORTCUT = (
    "Accuracy with the cell masked out (filled with the image's median background colour) and with the background "
    "masked out (neutral glass). A model that reads the cell drops to chance without it; a model far above chance "
    f"on background-only images (lower end of the interval above chance + {SHORTCUT_MARGIN:g}) predicts from the "
    "slide around the cell and is flagged 'YES'. High cell-only accuracy is reassuring, but it is measured on images unlike any "
    "the model was trained on, so a drop there is expected too."
)
PAIRED_COLUMNS = ["model_a", "model_b", "run_a", "run_b", "metric", "delta", "ci_low", "ci_high", "p_value",
                  "p_holm", "n_images", "n_groups", "groups_from", "n_boot", "seed", "n_perm"]


@dataclass
class Comparison:
    """The comparison table and what goes with it; every part is plain data a person can open."""

    table: pd.DataFrame
    paired: pd.DataFrame
    mcnemar: pd.DataFrame
    leakage: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ensemble_members: list[str] = field(default_factory=list)
    folder: Path | None = None  # where it was saved (compare_study): the study's folder, or its cv/

    def ranked(self) -> pd.DataFrame:
        """The ranked CNN rows (group split, the majority split file), best macro-F1 first."""
        return self.table[self.table["rank"].notna()].sort_values("rank", kind="stable")

    def best_and_runner_up(self) -> tuple[pd.Series | None, pd.Series | None]:
        """The CNN rows with the highest and second-highest macro-F1 (None when absent)."""
        ranked = self.ranked()
        rows = [ranked.iloc[i] if len(ranked) > i else None for i in (0, 1)]
        return rows[0], rows[1]

    def conclusion(self) -> str:
        """A few sentences written from the numbers: the best model and whether the paired test separates it."""
        best, second = self.best_and_runner_up()
        if best is None:
            return "No trained model was found, so there is nothing to conclude yet."
        text = [f"Best by macro-F1: {best['model']} ({_fmt_ci(best, RANK_METRIC)})."]
        if second is not None:
            text.append(self._paired_sentence(best["run"], second["run"]))
        baseline = self.table[self.table["run"] == BASELINE_RUN]
        if not baseline.empty:
            b = baseline.iloc[0]
            text.append(f"The colour-only shortcut baseline reaches accuracy {_fmt_ci(b, 'accuracy')}; "
                        "a CNN is only interesting by the margin it adds above that.")
            if _paired_row(self.paired, best["run"], BASELINE_RUN) is not None:
                text.append(self._paired_sentence(best["run"], BASELINE_RUN))
        ensemble = self.table[self.table["run"] == ENSEMBLE_RUN]
        if not ensemble.empty:
            e = ensemble.iloc[0]
            names = self.table.set_index("run")["model"]
            text.append(f"Averaging the probabilities of {', '.join(names.get(r, r) for r in self.ensemble_members)} "
                        f"(soft vote, unranked) gives macro-F1 {_fmt_ci(e, RANK_METRIC)}.")
            if _paired_row(self.paired, ENSEMBLE_RUN, best["run"]) is not None:
                text.append(self._paired_sentence(ENSEMBLE_RUN, best["run"]))
        unranked = self.table[~self.table["run"].isin([BASELINE_RUN, ENSEMBLE_RUN])
                              & (self.table["split_by"] != "image") & self.table["rank"].isna()]
        if not unranked.empty:
            text.append("Not ranked (evaluated on another split or on one its model was not trained on, or no "
                        "macro-F1; see the missing or partial list): "
                        + ", ".join(unranked["model"]) + ".")
        text += self._robustness_sentences(best)
        if not self.leakage.empty:
            worst = self.leakage.sort_values("accuracy_delta", ascending=False).iloc[0]
            text.append(f"An image-level split inflates {worst['architecture']}'s accuracy by "
                        f"{worst['accuracy_delta']:+.3f} (leakage through near-duplicate copies).")
        if self.missing:
            text.append("Not in this comparison: " + ", ".join(self.missing) + ".")
        return " ".join(text)

    def _robustness_sentences(self, best: pd.Series) -> list[str]:
        """The background shortcut test over every network, then TTA and calibration of the best one."""
        text = []
        tested = self.table[self.table["reads_background"].notna() & (self.table["split_by"] != "image")]
        flagged = tested[tested["reads_background"].astype(bool)]
        if not flagged.empty:
            each = [f"{r['model']} {_fmt_ci(r, 'background_only_accuracy')} (chance {_fmt_num(r['shortcut_chance'])})"
                    for _, r in flagged.iterrows()]
            text.append("Far above chance with the cell masked out (background-only accuracy): " + "; ".join(each)
                        + f". {'This network predicts' if len(flagged) == 1 else 'These networks predict'} partly "
                        "from the background around the cell, a shortcut that need not hold on other slides.")
        elif not tested.empty:
            text.append(f"No network scores far above chance with the cell masked out (background-only accuracy at "
                        f"most {_fmt_num(tested['background_only_accuracy'].max())}, chance "
                        f"{_fmt_num(tested['shortcut_chance'].max())}), so none is caught reading the background.")
        if _is_num(best.get("tta_macro_f1_delta")):
            ci = best.get("tta_macro_f1_delta_ci") or [None, None]
            text.append(f"Test-time augmentation (8 rotations and flips) changes {best['model']}'s macro-F1 by "
                        f"{best['tta_macro_f1_delta']:+.3f} [{_fmt_num(ci[0])}, {_fmt_num(ci[1])}] (paired).")
        if _is_num(best.get("ece_calibrated")):
            text.append(f"Temperature scaling (T = {_fmt_num(best['temperature'], 2)}, fitted on validation) takes "
                        f"{best['model']}'s ECE from {_fmt_num(best['ece'])} to {_fmt_num(best['ece_calibrated'])}.")
        return text

    def _paired_sentence(self, run_a: str, run_b: str) -> str:
        row = _paired_row(self.paired, run_a, run_b)
        names = self.table.set_index("run")["model"]
        if row is None:
            return (f"No paired test of {names.get(run_a, run_a)} against {names.get(run_b, run_b)}: their "
                    "predictions are missing, on another split, or share no test image.")
        return paired_sentence(row, family_size=int(self.paired["p_value"].notna().sum()))

    def to_markdown(self) -> str:
        """The table, the paired tests, McNemar (secondary), the leakage table and the conclusion as Markdown."""
        parts = ["## Models", markdown_table(display_table(self.table))]
        if not self.paired.empty:
            parts += ["## Paired differences in macro-F1 (same test cells; Holm-adjusted)",
                      "Each row: model a minus model b on the test images both saw, 95% interval from a bootstrap "
                      "that resamples whole duplicate groups for both models at once (the resamples of the models' "
                      "own intervals: the n_boot and seed of their results files); p from swapping the two models' "
                      "predictions within whole groups; Holm p adjusted over every row"
                      + (" (the ensemble's test against the best single model included)."
                         if ENSEMBLE_RUN in set(self.paired["run_a"]) else "."),
                      markdown_table(display_paired(self.paired))]
        if not self.mcnemar.empty:
            parts += ["## McNemar p-values (per image; ignores copies — secondary)",
                      "Treats copies of one cell as independent images, so these p-values are too small when the "
                      "test set holds copies; the paired tests above are the ones to read.",
                      markdown_table(self.mcnemar.reset_index())]
        checks = (("The background shortcut, tested directly", READ_SHORTCUT, display_shortcut(self.table)),
                  ("Calibration (temperature scaling fitted on validation)", READ_CALIBRATION,
                   display_calibration(self.table)),
                  ("Test-time augmentation (8 rotations and flips)", READ_TTA, display_tta(self.table)))
        for title, note, shown in checks:
            if not shown.empty:
                parts += [f"## {title}", note, markdown_table(shown)]
        if not self.leakage.empty:
            parts += ["## Leakage delta (image-level split minus group split)", markdown_table(self.leakage)]
        if self.missing or self.problems:
            parts += ["## Missing or partial", "\n".join(f"- {m}" for m in [*self.missing, *self.problems])]
        parts += ["## Conclusion", self.conclusion()]
        return "\n\n".join(parts) + "\n"

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """Write comparison.csv (full table), comparison.md, paired_tests.csv and mcnemar.csv; return the paths."""
        out = Path(output_dir)
        paths = {"csv": out / "comparison.csv", "markdown": out / "comparison.md",
                 "paired": out / "paired_tests.csv", "mcnemar": out / "mcnemar.csv"}
        write_text(paths["csv"], self.table.to_csv(index=False))
        write_text(paths["markdown"], self.to_markdown())
        write_text(paths["paired"], self.paired.to_csv(index=False))
        write_text(paths["mcnemar"], self.mcnemar.to_csv())
        return paths


def compare_results(results_dir: str | Path, expected: list[str] | None = None,
                    n_boot: int | None = None, seed: int | None = None) -> Comparison:
    """Build the comparison from a folder; missing or broken files are listed, never fatal.

    n_boot, seed: the paired bootstrap's resamples and seed, one for every comparison so reruns agree. None →
    what the models' results files record (metrics.bootstrap), so the paired resamples are those the models'
    intervals were drawn from; only when no file records one, the profile's (BLOODCELL_PROFILE, else paper).
    """
    results_dir = Path(results_dir)
    expected = list(ARCHITECTURES) if expected is None else expected
    rows, problems, runs = [], [], {}
    for path in results_files(results_dir):
        try:
            results = read_results(path)
            rows.append(table_row(results))
            runs[run_of(results)] = results
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name}: unreadable or incomplete ({exc.__class__.__name__}: {exc})")
    order = {key: i for i, key in enumerate(ARCHITECTURES)}
    # Registry order, image-split runs after their group-split twins, the baseline last.
    rows.sort(key=lambda r: (r["run"] == BASELINE_RUN, order.get(r["architecture"], len(order)), r["run"]))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    present = {r["architecture"] for r in runs.values()}
    missing = [f"{key} (no results file)" for key in expected if key not in present]

    group_runs = {name: r for name, r in runs.items() if _split_by(r) != "image"}
    untrained, untrained_problems = not_trained_on_split(group_runs)
    trained_runs = {name: r for name, r in group_runs.items() if name not in untrained}
    other_split, split_problems = split_mismatches(trained_runs, results_dir)
    excluded = untrained | other_split
    family_runs = {name: r for name, r in group_runs.items() if name not in excluded}
    table["rank"] = rank_column(table, excluded)
    preds, read_problems = read_run_predictions(results_dir, family_runs)
    n_boot, seed = baseline_resampling(results_dir, n_boot=n_boot, seed=seed)
    members = [run for run in ranked_runs(table) if run in preds]
    ensemble, ensemble_problems = ensemble_predictions(preds, members)
    tested = preds
    if ensemble is not None:
        row = table_row(ensemble_results(ensemble, [runs[m] for m in members], n_boot=n_boot, seed=seed))
        at = len(table) - int((table["run"] == BASELINE_RUN).sum())  # after the CNNs, before the baseline
        table = pd.concat([table.iloc[:at], pd.DataFrame([row], columns=TABLE_COLUMNS), table.iloc[at:]],
                          ignore_index=True)
        tested = {**preds, ENSEMBLE_RUN: ensemble}
    paired, paired_problems = paired_tests(table, tested, n_boot=n_boot, seed=seed)
    mcnemar, mc_problems = mcnemar_matrix(preds)
    found = (problems + untrained_problems + split_problems + read_problems + ensemble_problems + paired_problems
             + mc_problems + explanation_set_problems(table))
    return Comparison(table=table, paired=paired, mcnemar=mcnemar, leakage=leakage_table(runs), missing=missing,
                      problems=list(dict.fromkeys(found)),
                      ensemble_members=members if ensemble is not None else [])


def compare_study(output_dir: str | Path) -> tuple[Comparison, Path, Comparison | None]:
    """Compare a study folder as the Comparison notebook and `compare` do: train the shortcut baseline on the
    study's split when its results are missing, combine cross-validation folds (crossval.py) into `<output>/cv/`,
    write the learning curve (learning_curve.py) when there are curve points, build and save the hold-out comparison and, when there are folds, the cross-validated one in `cv/`.

    Returns (the comparison to show, the folder it belongs to, the cross-validated comparison or None): the
    cross-validated one is shown when the folder holds no hold-out model results.
    """
    output_dir = Path(output_dir)
    split_path = output_dir / SPLIT_FILE
    if split_path.exists():  # the baseline stands beside the networks: trained on the study's split when missing
        ensure_shortcut_baseline(split_path, output_dir)
    cv_problems = collect_cross_validation(output_dir)
    holdout = compare_results(output_dir)
    holdout.folder = output_dir
    _, curve_problems = write_learning_curve(output_dir)  # learning_curve.csv/.png when there are curve points
    holdout.problems = list(dict.fromkeys([*holdout.problems, *curve_problems]))
    cross = None
    if results_files(cv_path(output_dir)):
        cross = compare_results(cv_path(output_dir))
        cross.problems = list(dict.fromkeys([*cv_problems, *cross.problems]))
        cross.folder = cv_path(output_dir)
        cross.save(cv_path(output_dir))
        if holdout.table["run"].isin([BASELINE_RUN]).all():  # no hold-out models: the study is the cross-validation
            return cross, cv_path(output_dir), cross
    holdout.save(output_dir)
    return holdout, output_dir, cross


# From results["calibration"]: the temperature fitted on validation and the test scores before (`ece` is also a
# metric with an interval) and after scaling, with the paired interval of the ECE's change.
CALIBRATION_COLUMNS = ["temperature", "temperature_at_bound", "ece_calibrated", "ece_change", "ece_change_ci",
                       "classwise_ece", "classwise_ece_calibrated", "brier", "brier_calibrated"]
# From results["tta"]: macro-F1 and accuracy over the 8 orientations, and TTA minus the plain pass, paired.
TTA_COLUMNS = ["tta_macro_f1", "tta_macro_f1_ci", "tta_accuracy", "tta_accuracy_ci", "tta_macro_f1_delta",
               "tta_macro_f1_delta_ci", "tta_macro_f1_delta_p"]
# From results["shortcut_test"]: accuracy on background-only and cell-only images, chance, and the flag.
SHORTCUT_COLUMNS = ["background_only_accuracy", "background_only_accuracy_ci", "cell_only_accuracy",
                    "cell_only_accuracy_ci", "shortcut_chance", "reads_background"]

# From results["cv"] (a cross-validated run, crossval.py): folds, seeds, and the fold runs' mean and sd.
CV_COLUMNS = ["cv_folds", "cv_seeds", "cv_macro_f1_mean", "cv_macro_f1_sd", "cv_accuracy_mean", "cv_accuracy_sd"]

TABLE_COLUMNS = [
    "model", "run", "architecture", "split_by", "split_sha256", "rank", "weights", "image_size", "n_test",
    *[c for k in SCALAR_KEYS for c in (k, f"{k}_ci")],
    "leakage_audit", "leakage_audit_n_test",
    *CALIBRATION_COLUMNS, *TTA_COLUMNS, *SHORTCUT_COLUMNS,
    "gradcam_focus", "gradcam_focus_ci", "gradcam_deletion_auc", "gradcam_deletion_normalised",
    "gradcam_deletion_normalised_ci", "gradcam_sanity_spearman", "gradcam_undefined", "explanation_set_sha256",
    "explanation_set_n", *CV_COLUMNS,
    "params_total", "params_trainable", "flops_per_image", "keras_file_mb", "training_seconds", "epochs",
    "latency_ms", "throughput_batch32", "device",
]


def table_row(results: dict[str, Any]) -> dict[str, Any]:
    """One table row from a results dict (a model's or the baseline's); `rank` is filled in later."""
    m = results["metrics"]
    cost = results.get("cost") or {}
    cam = (results.get("explainability") or {}).get("gradcam") or {}
    audit = results.get("leakage_audit") or {}
    split_by = _split_by(results)
    name = results.get("display_name", results["architecture"])
    row: dict[str, Any] = {
        "model": f"{name} (image-level split, leaks)" if split_by == "image" else name,
        "run": run_of(results),
        "architecture": results["architecture"],
        "split_by": split_by,
        "split_sha256": (results.get("split") or {}).get("sha256"),
        "rank": None,
        "weights": results.get("weights"),
        "image_size": results.get("image_size"),
        "n_test": m.get("n"),
        "leakage_audit": audit.get("test_images_with_match_in_train"),
        "leakage_audit_n_test": audit.get("n_test"),
        "gradcam_focus": cam.get("focus_mean"),
        "gradcam_focus_ci": cam.get("focus_ci"),
        "gradcam_deletion_auc": cam.get("deletion_auc_mean"),
        "gradcam_deletion_normalised": cam.get("deletion_auc_normalised"),
        "gradcam_deletion_normalised_ci": cam.get("deletion_auc_normalised_ci"),
        "explanation_set_sha256": ((results.get("explainability") or {}).get("image_set") or {}).get("paths_sha256"),
        "explanation_set_n": ((results.get("explainability") or {}).get("image_set") or {}).get("n"),
        "gradcam_sanity_spearman": cam.get("sanity_spearman_mean"),
        "gradcam_undefined": cam.get("undefined"),
        "params_total": cost.get("params_total"),
        "params_trainable": cost.get("params_trainable"),
        "flops_per_image": cost.get("flops_per_image"),
        "keras_file_mb": cost.get("keras_file_mb"),
        "training_seconds": cost.get("training_seconds"),
        "epochs": cost.get("epochs"),
        "latency_ms": cost.get("latency_ms_batch1_median"),
        "throughput_batch32": cost.get("throughput_batch32"),
        "device": cost.get("device"),
    }
    for key in SCALAR_KEYS:
        row[key] = m.get(key)
        row[f"{key}_ci"] = m.get(f"{key}_ci")
    row.update(calibration_columns(results.get("calibration") or {}))
    row.update(tta_columns(results.get("tta") or {}))
    row.update(shortcut_columns(results.get("shortcut_test") or {}))
    cv = results.get("cv") or {}
    row.update({"cv_folds": cv.get("folds"), "cv_seeds": len(cv["seeds"]) if cv.get("seeds") else None,
                **{column: cv.get(column[3:]) for column in CV_COLUMNS[2:]}})
    return row


def calibration_columns(block: dict[str, Any]) -> dict[str, Any]:
    """CALIBRATION_COLUMNS from a results["calibration"] block (None where it was skipped or not recorded)."""
    before, after = block.get("before") or {}, block.get("after") or {}
    change = (block.get("change") or {}).get("ece") or {}
    return {"temperature": block.get("temperature"), "temperature_at_bound": block.get("temperature_at_bound"),
            "ece_calibrated": after.get("ece"), "ece_change": change.get("delta"), "ece_change_ci": change.get("ci"),
            "classwise_ece": before.get("classwise_ece"), "classwise_ece_calibrated": after.get("classwise_ece"),
            "brier": before.get("brier"), "brier_calibrated": after.get("brier")}


def tta_columns(block: dict[str, Any]) -> dict[str, Any]:
    """TTA_COLUMNS from a results["tta"] block (None when TTA was off or not recorded)."""
    on = bool(block.get("enabled"))
    keys = {"tta_macro_f1": "macro_f1", "tta_macro_f1_ci": "macro_f1_ci", "tta_accuracy": "accuracy",
            "tta_accuracy_ci": "accuracy_ci", "tta_macro_f1_delta": "macro_f1_delta",
            "tta_macro_f1_delta_ci": "macro_f1_delta_ci", "tta_macro_f1_delta_p": "macro_f1_delta_p"}
    return {column: block.get(key) if on else None for column, key in keys.items()}


def shortcut_columns(block: dict[str, Any]) -> dict[str, Any]:
    """SHORTCUT_COLUMNS from a results["shortcut_test"] block; reads_background is re-read from the numbers
    (shortcut.reads_background), so a table never disagrees with its own intervals."""
    if not block.get("background_only"):
        return dict.fromkeys(SHORTCUT_COLUMNS)
    bg, cell = block["background_only"], block.get("cell_only") or {}
    return {"background_only_accuracy": bg.get("accuracy"), "background_only_accuracy_ci": bg.get("accuracy_ci"),
            "cell_only_accuracy": cell.get("accuracy"), "cell_only_accuracy_ci": cell.get("accuracy_ci"),
            "shortcut_chance": block.get("chance"),
            "reads_background": reads_background(bg, block["chance"], block.get("margin", SHORTCUT_MARGIN))}


def explanation_set_problems(table: pd.DataFrame) -> list[str]:
    """The networks explained on another image set than the others (Grad-CAM numbers compare only on one set)."""
    sets = table.dropna(subset=["explanation_set_sha256"])
    if sets["explanation_set_sha256"].nunique() <= 1:
        return []
    common = sets["explanation_set_sha256"].mode().iloc[0]
    odd = sets[sets["explanation_set_sha256"] != common]
    return [f"{row['model']}: explained on another image set ({row['explanation_set_n']:.0f} images, "
            f"{row['explanation_set_sha256'][:12]}) than the others ({common[:12]}); its Grad-CAM numbers do not "
            "compare with theirs (another split, seed or gradcam_images)" for _, row in odd.iterrows()]


def split_mismatches(runs: dict[str, dict], results_dir: Path) -> tuple[set[str], list[str]]:
    """The group-split runs (CNNs and baseline) evaluated on a split other than the majority's, and why.

    The majority is the split SHA-256 most runs record; a tie goes to the folder's split.csv. A run that
    records no SHA-256 cannot be checked: it stays in, and the problems list says so.
    """
    shas = {name: (r.get("split") or {}).get("sha256") for name, r in runs.items()}
    counts = Counter(s for s in shas.values() if s)
    if not counts:
        note = ["No results file records its split's SHA-256, so the runs are compared on the test images they "
                "share without checking that they used one split."] if len(runs) > 1 else []
        return set(), note
    folder_split = results_dir / SPLIT_FILE
    folder_sha = split_sha256(folder_split) if folder_split.is_file() else None
    majority = max(counts, key=lambda s: (counts[s], s == folder_sha, s))
    excluded = {name for name, s in shas.items() if s and s != majority}
    problems = [f"{name}: evaluated on split {shas[name][:12]} but the majority of runs used {majority[:12]}; "
                "left out of paired tests" for name in sorted(excluded)]
    problems += [f"{name}: its results record no split SHA-256, so it cannot be checked against the majority "
                 f"split {majority[:12]}; compared on the test images it shares with the others"
                 for name in sorted(n for n, s in shas.items() if not s)]
    return excluded, problems


def not_trained_on_split(runs: dict[str, dict]) -> tuple[set[str], list[str]]:
    """The runs whose results say their model was trained on another split (evaluate --allow-other-split), and why.

    Such a model may have trained on some of these test images, so its scores are not comparable. A run that
    cannot say (matches_training_split missing or null) stays in.
    """
    names = {name for name, r in runs.items() if (r.get("split") or {}).get("matches_training_split") is False}
    return names, [f"{name}: evaluated on a split other than the one its model was trained on "
                   "(split.matches_training_split is false: evaluate --allow-other-split), so some test images may "
                   "have been training images; left out of the ranking and the paired tests" for name in sorted(names)]


def rank_column(table: pd.DataFrame, excluded: set[str]) -> pd.Series:
    """Rank by macro-F1 (1 = best) of the CNNs on a group split that use the majority split; others NA."""
    ranked = ((table["run"] != BASELINE_RUN) & (table["split_by"] != "image") & ~table["run"].isin(excluded))
    score = pd.to_numeric(table[RANK_METRIC], errors="coerce").where(ranked)
    return score.rank(ascending=False, method="min").astype("Int64")


def ranked_runs(table: pd.DataFrame) -> list[str]:
    """The ranked runs, best macro-F1 first (ties in table order)."""
    return list(table.sort_values("rank", kind="stable").loc[table["rank"].notna(), "run"])


def ensemble_predictions(preds: dict[str, pd.DataFrame], members: list[str]) -> tuple[pd.DataFrame | None, list[str]]:
    """The soft vote of `members`: the mean of their class probabilities on the test images all of them share.

    The frame is shaped like read_run_predictions' and in the first member's file order (give the best run
    first: then the ensemble's resamples are the best run's, image for image). Groups come from the first
    member whose groups are known. None, with the reason, for fewer than two members, no shared image or
    disagreeing true labels.
    """
    if len(members) < 2:
        return None, []
    first = preds[members[0]]
    shared = first.index
    for run in members[1:]:
        shared = shared[shared.isin(preds[run].index)]
    if len(shared) == 0:
        return None, [f"{', '.join(members)} share no test image, so there is no ensemble"]
    frames = [preds[run].loc[shared] for run in members]
    if any(not (f["true_label"] == frames[0]["true_label"]).all() for f in frames[1:]):
        return None, [f"{', '.join(members)} disagree on the true labels of shared test images, so there is no "
                      "ensemble"]
    source = next((f for f in frames if f["groups_from"].iloc[0] != NO_GROUPS), frames[0])
    proba = np.mean([f[PROB_COLUMNS].to_numpy(dtype=np.float64) for f in frames], axis=0)
    vote = pd.DataFrame(proba, index=shared, columns=PROB_COLUMNS)
    vote.insert(0, "true_label", frames[0]["true_label"])
    problems = []
    if any(len(preds[run]) != len(shared) for run in members):
        problems.append(f"the ensemble covers the {len(shared)} test images all of {', '.join(members)} share, "
                        "not every image each one was scored on")
    return vote.assign(pred=proba.argmax(axis=1), group=source["group"].to_numpy(),
                       groups_from=source["groups_from"].to_numpy()), problems


def ensemble_results(ensemble: pd.DataFrame, members: list[dict], n_boot: int, seed: int) -> dict[str, Any]:
    """A results dict for the soft vote (shaped like a model's, for table_row): metrics with the study's intervals.

    members: the members' results, best first; costs that add up over members are summed.
    """
    y = ensemble["true_label"].map(CLASSES.index).to_numpy()
    metrics = compute_metrics(y, ensemble[PROB_COLUMNS].to_numpy(), groups=ensemble["group"].to_numpy(),
                              n_boot=n_boot, seed=seed)
    costs = [r.get("cost") or {} for r in members]
    cost = {key: (sum(c[key] for c in costs) if all(_is_num(c.get(key)) for c in costs) else None)
            for key in ENSEMBLE_SUMMED_COST}
    return {"architecture": ENSEMBLE_RUN, "run": ENSEMBLE_RUN,
            "display_name": f"Ensemble (soft vote of {len(members)})",
            "split": {"split_by": "group", "sha256": (members[0].get("split") or {}).get("sha256")},
            "members": [run_of(r) for r in members], "metrics": metrics, "cost": cost}


def read_run_predictions(results_dir: Path, runs: dict[str, dict]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Each run's predictions indexed by path, with `group` and `groups_from` columns; problems when unreadable.

    Groups come from the predictions' own group column, else the split file the results record, else the
    folder's split.csv (either only if its SHA-256 matches the recorded one); failing all, every image is its
    own group and the problems list says so.
    """
    preds, problems = {}, []
    for name, results in runs.items():
        path = results_dir / results.get("predictions_file", predictions_path(results_dir, name).name)
        try:
            _, _, frame = read_predictions(path)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{path.name}: predictions unreadable, left out of the paired tests "
                            f"({exc.__class__.__name__})")
            continue
        groups, source = _groups_of(frame, results, results_dir)
        if groups is None:
            problems.append(f"{name}: no duplicate groups found (no group column in {path.name} and no matching "
                            "split file); each image is treated as its own group, so its paired intervals and "
                            "p-values ignore copies of one cell")
            groups, source = frame["path"], NO_GROUPS
        if "seed" in frame.columns and frame["seed"].nunique() > 1:
            # Out-of-fold predictions of several seeds hold each image once per seed: one row per (image, seed).
            frame = frame.assign(path=frame["path"].astype(str) + "#seed" + frame["seed"].astype(str))
        preds[name] = frame.assign(pred=frame[PROB_COLUMNS].to_numpy().argmax(axis=1), group=groups.to_numpy(),
                                   groups_from=source).set_index("path")
    return preds, problems


def _groups_of(frame: pd.DataFrame, results: dict, results_dir: Path) -> tuple[pd.Series | None, str]:
    if "group" in frame.columns:
        return frame["group"], "predictions file"
    split = results.get("split") or {}
    for candidate in (split.get("path"), results_dir / SPLIT_FILE):
        if not candidate or not Path(candidate).is_file():
            continue
        if split.get("sha256") and split_sha256(candidate) != split["sha256"]:
            continue  # another split than the one this run was evaluated on: its groups may differ
        rows = pd.read_csv(candidate, dtype=str, keep_default_na=False)
        if {"path", "group"} <= set(rows.columns) and frame["path"].astype(str).isin(rows["path"]).all():
            lookup = rows.drop_duplicates("path").set_index("path")["group"]
            return frame["path"].astype(str).map(lookup), f"split file {Path(candidate).name}"
    return None, NO_GROUPS


def paired_tests(table: pd.DataFrame, preds: dict[str, pd.DataFrame], n_boot: int,
                 seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Every ranked CNN against the best one and against the baseline, and the ensemble (when in preds) against
    the best one, paired on shared images, Holm-adjusted over all of them.

    n_boot, seed: the study's bootstrap, so each paired resample holds the cells the models' intervals drew.
    """
    ranked = [run for run in ranked_runs(table) if run in preds]
    pairs = [(ranked[0], other) for other in ranked[1:]] if ranked else []
    if BASELINE_RUN in preds:
        pairs += [(run, BASELINE_RUN) for run in ranked]
    if ENSEMBLE_RUN in preds and ranked:
        pairs.append((ENSEMBLE_RUN, ranked[0]))
    names = table.set_index("run")["model"]
    rows, problems = [], []
    for run_a, run_b in pairs:
        a, b = preds[run_a], preds[run_b]
        # In run a's file order: groups are numbered in order of appearance, and the resamples of the models'
        # intervals were drawn over the predictions file's order.
        shared = a.index[a.index.isin(b.index)]
        if len(shared) == 0:
            problems.append(f"{run_a} and {run_b} share no test image; were they evaluated on the same split?")
            continue
        a, b = a.loc[shared], b.loc[shared]
        if not (a["true_label"] == b["true_label"]).all():
            problems.append(f"{run_a} and {run_b} disagree on the true labels of shared test images; not compared")
            continue
        # Copies of a cell are known when either run's file said so; the two agree when both did.
        source = a if a["groups_from"].iloc[0] != NO_GROUPS else b
        result = paired_comparison(a["true_label"].map(CLASSES.index).to_numpy(), a[PROB_COLUMNS].to_numpy(),
                                   b[PROB_COLUMNS].to_numpy(), groups=source["group"].to_numpy(),
                                   metric=RANK_METRIC, n_boot=n_boot, seed=seed, n_perm=PAIRED_N_PERM)
        rows.append({"model_a": names.get(run_a, run_a), "model_b": names.get(run_b, run_b), "run_a": run_a,
                     "run_b": run_b, "metric": RANK_METRIC, "delta": result["delta"], "ci_low": result["ci"][0],
                     "ci_high": result["ci"][1], "p_value": result["p_value"], "n_images": result["n"],
                     "n_groups": result["n_groups"], "groups_from": source["groups_from"].iloc[0],
                     "n_boot": result["n_boot"], "seed": result["seed"], "n_perm": result["n_perm"]})
    paired = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    paired["p_holm"] = holm_adjust(paired["p_value"].tolist())
    return paired, problems


def paired_sentence(row: Any, family_size: int) -> str:
    """One sentence from a paired-test row: who leads by how much, the interval, Holm p, and what it means."""
    a, b = row["model_a"], row["model_b"]
    delta, low, high = row["delta"], row["ci_low"], row["ci_high"]
    if delta < 0:  # say it from the leader's side
        a, b, delta, low, high = b, a, -delta, -high, -low
    unit = "images (no duplicate groups known)" if row["groups_from"] == NO_GROUPS else "cells"
    n = row["n_images"] if row["groups_from"] == NO_GROUPS else row["n_groups"]
    lead = f"{a} and {b} tie" if delta == 0 else f"{a} leads {b} by {delta:.3f}"
    text = (f"{lead} macro-F1 [{_fmt_num(low)}, {_fmt_num(high)}] (paired over {n} {unit}); "
            f"Holm p = {_fmt_p(row['p_holm'])}")
    if not (_is_num(low) and _is_num(high)):
        return text + ": no interval could be computed, so this test set does not separate them."
    if low > 0 or high < 0:
        if _is_num(row["p_holm"]) and row["p_holm"] < ALPHA:
            return text + ": the paired interval excludes 0, so this test set separates them."
        return (text + f": the paired interval excludes 0, but after Holm correction over {family_size} "
                       "comparisons p is not below 0.05, so treat the lead as suggestive.")
    return text + ": the paired interval includes 0, so this test set does not separate them."


def mcnemar_matrix(preds: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, list[str]]:
    """Pairwise per-image McNemar p-values over the test images two runs share (secondary: ignores copies)."""
    names = sorted(preds)
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    problems = []
    for a, b in itertools.combinations(names, 2):
        shared = preds[a].index.intersection(preds[b].index)
        if len(shared) == 0:
            problems.append(f"{a} and {b} share no test image; were they evaluated on the same split?")
            continue
        y = preds[a].loc[shared, "true_label"].map(CLASSES.index).to_numpy()
        matrix.loc[a, b] = matrix.loc[b, a] = mcnemar_p(y, preds[a].loc[shared, "pred"].to_numpy(),
                                                       preds[b].loc[shared, "pred"].to_numpy())
    for n in names:
        matrix.loc[n, n] = 1.0
    return matrix, problems


def leakage_table(runs: dict[str, dict]) -> pd.DataFrame:
    """For each architecture run on both kinds of split: accuracy on image split minus on group split."""
    rows = []
    for name, r in runs.items():
        if _split_by(r) != "image":
            continue
        group = next((g for g in runs.values() if g["architecture"] == r["architecture"]
                      and _split_by(g) == "group"), None)
        if group is None:
            continue
        a_img, a_grp = r["metrics"]["accuracy"], group["metrics"]["accuracy"]
        rows.append({"architecture": r["architecture"], "accuracy_group_split": a_grp,
                     "accuracy_image_split": a_img, "accuracy_delta": a_img - a_grp})
    return pd.DataFrame(rows, columns=["architecture", "accuracy_group_split", "accuracy_image_split", "accuracy_delta"])


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A compact, human-readable version of the table: values with their intervals as text."""
    out = pd.DataFrame({"rank": table["rank"].map(lambda v: "—" if pd.isna(v) else str(int(v))),
                        "model": table["model"], "weights": table["weights"].map(lambda v: "—" if pd.isna(v) else v),
                        "size": table["image_size"].map(lambda v: "—" if pd.isna(v) else str(int(v)))})
    for key in ("macro_f1", "accuracy", "roc_auc_macro", "myeloblast_recall", "ece"):
        out[key] = [_fmt_ci(row, key) for _, row in table.iterrows()]
        if key == "macro_f1" and table["cv_folds"].notna().any():  # a cross-validated study
            out["macro_f1 folds mean ± sd"] = [_fmt_mean_sd(r["cv_macro_f1_mean"], r["cv_macro_f1_sd"])
                                              for _, r in table.iterrows()]
    out["ece T-scaled"] = table["ece_calibrated"].map(_fmt_num)
    out["TTA macro_f1"] = [_fmt_ci(row, "tta_macro_f1") for _, row in table.iterrows()]
    out["background-only acc"] = [_fmt_ci(row, "background_only_accuracy") for _, row in table.iterrows()]
    out["reads background"] = table["reads_background"].map(_fmt_flag)
    out["leakage audit"] = [_fmt_audit(k, n) for k, n in zip(table["leakage_audit"], table["leakage_audit_n_test"])]
    out["focus"] = [_fmt_ci(row, "gradcam_focus") for _, row in table.iterrows()]
    out["deletion ÷ random"] = [_fmt_ci(row, "gradcam_deletion_normalised") for _, row in table.iterrows()]
    out["sanity ρ"] = table["gradcam_sanity_spearman"].map(_fmt_num)
    out["params (M)"] = table["params_total"].map(lambda v: _fmt_num(v / 1e6 if _is_num(v) else None, 2))
    out["GFLOPs"] = table["flops_per_image"].map(lambda v: _fmt_num(v / 1e9 if _is_num(v) else None, 2))
    out["latency ms"] = table["latency_ms"].map(lambda v: _fmt_num(v, 1))
    return out


def display_calibration(table: pd.DataFrame) -> pd.DataFrame:
    """Calibration of every network that recorded it: temperature, ECE (top-label and classwise) and Brier
    before and after temperature scaling, and the paired interval of the ECE's change."""
    rows = _rows_with(table, "temperature")
    return pd.DataFrame({
        "model": rows["model"], "T": rows["temperature"].map(lambda v: _fmt_num(v, 2)),
        "ECE": [_fmt_ci(r, "ece") for _, r in rows.iterrows()],
        "ECE T-scaled": rows["ece_calibrated"].map(_fmt_num),
        "Δ ECE [95% CI]": [_fmt_delta(r["ece_change"], r["ece_change_ci"]) for _, r in rows.iterrows()],
        "classwise ECE": rows["classwise_ece"].map(_fmt_num),
        "classwise ECE T-scaled": rows["classwise_ece_calibrated"].map(_fmt_num),
        "Brier": rows["brier"].map(_fmt_num), "Brier T-scaled": rows["brier_calibrated"].map(_fmt_num),
    }).reset_index(drop=True)


def display_tta(table: pd.DataFrame) -> pd.DataFrame:
    """Test-time augmentation of every network that ran it: macro-F1 and accuracy plain and over 8 orientations,
    and the paired difference in macro-F1 with its p-value."""
    rows = _rows_with(table, "tta_macro_f1")
    return pd.DataFrame({
        "model": rows["model"],
        "macro_f1": [_fmt_ci(r, "macro_f1") for _, r in rows.iterrows()],
        "macro_f1 TTA": [_fmt_ci(r, "tta_macro_f1") for _, r in rows.iterrows()],
        "Δ macro_f1 (TTA − plain) [95% CI]": [_fmt_delta(r["tta_macro_f1_delta"], r["tta_macro_f1_delta_ci"])
                                              for _, r in rows.iterrows()],
        "p": rows["tta_macro_f1_delta_p"].map(_fmt_p),
        "accuracy": [_fmt_ci(r, "accuracy") for _, r in rows.iterrows()],
        "accuracy TTA": [_fmt_ci(r, "tta_accuracy") for _, r in rows.iterrows()],
    }).reset_index(drop=True)


def display_explanations(table: pd.DataFrame) -> pd.DataFrame:
    """Grad-CAM numbers of every network on the study's explanation set, with intervals: focus on the cell,
    deletion AUC ÷ random-order deletion AUC (below 1: the map finds what the prediction rests on), sanity ρ; a note
    where a network's map cannot point at a region (its explained layer is 1×1 at the input size)."""
    rows = _rows_with(table, "gradcam_deletion_auc")
    return pd.DataFrame({
        "model": rows["model"],
        "images": rows["explanation_set_n"].map(lambda v: _int_or_dash(v)),
        "focus on the cell": [_fmt_ci(r, "gradcam_focus") for _, r in rows.iterrows()],
        "deletion ÷ random [95% CI]": [_fmt_ci(r, "gradcam_deletion_normalised") for _, r in rows.iterrows()],
        "deletion AUC": rows["gradcam_deletion_auc"].map(_fmt_num),
        "sanity ρ (randomised weights)": rows["gradcam_sanity_spearman"].map(_fmt_num),
        "set": rows["explanation_set_sha256"].map(lambda v: v[:12] if isinstance(v, str) else "—"),
        "note": rows["gradcam_undefined"].map(lambda v: v if isinstance(v, str) else ""),
    }).reset_index(drop=True)


def _int_or_dash(value: Any) -> str:
    return str(int(value)) if _is_num(value) else "—"


def display_shortcut(table: pd.DataFrame) -> pd.DataFrame:
    """The background shortcut test of every network that ran it: accuracy on the test images, with only the
    background and with only the cell, chance, and whether it reads the background."""
    rows = _rows_with(table, "background_only_accuracy")
    return pd.DataFrame({
        "model": rows["model"],
        "accuracy": [_fmt_ci(r, "accuracy") for _, r in rows.iterrows()],
        "background only": [_fmt_ci(r, "background_only_accuracy") for _, r in rows.iterrows()],
        "cell only": [_fmt_ci(r, "cell_only_accuracy") for _, r in rows.iterrows()],
        "chance": rows["shortcut_chance"].map(_fmt_num),
        "reads background": rows["reads_background"].map(_fmt_flag),
    }).reset_index(drop=True)


def display_paired(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired tests as text: the difference with its interval, p and Holm p, images and cells."""
    return pd.DataFrame({
        "model a": paired["model_a"], "model b": paired["model_b"],
        "Δ macro-F1 (a − b) [95% CI]": [f"{r.delta:+.3f} [{_fmt_num(r.ci_low)}, {_fmt_num(r.ci_high)}]"
                                        for r in paired.itertuples()],
        "p": paired["p_value"].map(_fmt_p), "Holm p": paired["p_holm"].map(_fmt_p),
        "images": paired["n_images"],
        "cells": [n if source != NO_GROUPS else "— (no groups)"
                  for n, source in zip(paired["n_groups"], paired["groups_from"])],
    })


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a DataFrame as a GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def _split_by(results: dict) -> str:
    return (results.get("split") or {}).get("split_by", "group")


def _paired_row(paired: pd.DataFrame, run_a: str, run_b: str) -> pd.Series | None:
    hit = paired[((paired["run_a"] == run_a) & (paired["run_b"] == run_b))
                 | ((paired["run_a"] == run_b) & (paired["run_b"] == run_a))]
    if hit.empty:
        return None
    row = hit.iloc[0].copy()
    if row["run_a"] != run_a:  # same test from the other side
        row["model_a"], row["model_b"] = row["model_b"], row["model_a"]
        row["delta"], row["ci_low"], row["ci_high"] = -row["delta"], -row["ci_high"], -row["ci_low"]
    return row


def _fmt_mean_sd(mean: Any, sd: Any) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if _is_num(mean) and _is_num(sd) else "—"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return _fmt_num(v)
    return "" if v is None else str(v).replace("|", "/")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and np.isfinite(v)


def _fmt_num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _is_num(v) else "—"


def _fmt_p(v: Any) -> str:
    return f"{v:.3g}" if _is_num(v) else "—"


def _rows_with(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows with a number in column (a boolean mask of dtype bool, also on an empty table)."""
    return table.loc[table[column].map(_is_num).astype(bool)]


def _fmt_flag(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return "YES" if bool(v) else "no"


def _fmt_delta(delta: Any, ci: Any) -> str:
    if not _is_num(delta):
        return "—"
    ci = ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else [None, None]
    return f"{delta:+.3f} [{_fmt_num(ci[0])}, {_fmt_num(ci[1])}]"


def _fmt_audit(count: Any, n_test: Any) -> str:
    if not _is_num(count):
        return "—"
    return f"{int(count)} of {int(n_test)}" if _is_num(n_test) else str(int(count))


def _fmt_ci(row: Any, key: str) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci")
    if not _is_num(value):
        return "—"
    if ci is not None and len(ci) == 2 and all(_is_num(c) for c in ci):
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"
