"""The notebook-facing steps of one study run: each notebook cell is one of these calls.

A notebook holds prose and calls; everything a cell does lives here, so the five model notebooks,
`run_all.py` and the CLI share one implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from IPython.display import Image, Markdown

from bloodcell_lib import evaluation, progress
from bloodcell_lib.cache import StudyCache
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.compare import (BASELINE_RUN, compare_study, display_calibration, display_explanations, display_paired,
                                   display_shortcut, display_table, display_tta)
from bloodcell_lib.config import (AUTO, NOTEBOOK_OUTPUT, SCRATCH, RunConfig, check_image_size, output_dir_override,
                                  resolve)
from bloodcell_lib.crossval import cv_path, cv_table
from bloodcell_lib.dataset import check_dataset
from bloodcell_lib.errors import ConfigError
from bloodcell_lib.explain import explain_image as explain_one_image
from bloodcell_lib.explain import gradcam_side_by_side, plot_explanation
from bloodcell_lib.figures import plot_class_examples, plot_duplicate_diagnostics, plot_history, plot_image_grid
from bloodcell_lib.images import read_rgb
from bloodcell_lib.learning_curve import CURVE_FIGURE, display_learning_curve, learning_curve_table
from bloodcell_lib.model import build_model, imagenet_available, layer_blocks
from bloodcell_lib.pipeline import augment_image, load_images
from bloodcell_lib.registry import get_arch
from bloodcell_lib.report import cost_scatter, metric_bars, write_comparison_report
from bloodcell_lib.split import SPLIT_FILE, resolve_split
from bloodcell_lib.synthetic import make_stand_in
from bloodcell_lib.predict import prepare_image
from bloodcell_lib.training import train_from_config, trainable_layers


def configure(arch: str, profile: str = AUTO, data_dir: str | None = None, **params: Any) -> RunConfig:
    """Resolve a notebook's parameters into the run's configuration (config.resolve, with the notebooks' defaults:
    the demo on a synthetic stand-in without DATA_DIR, ../Saved Models) and make the stand-in when it is used."""
    cfg = resolve(profile, spec=get_arch(arch), stand_in=True, imagenet_reachable=imagenet_available,
                  default_output=NOTEBOOK_OUTPUT, data_dir=data_dir, **params)
    if not data_dir:  # resolve chose the stand-in (or refused the paper profile without data)
        make_stand_in(cfg)
    return cfg


def describe(cfg: RunConfig) -> str:
    """A loud summary of what this run will do; then every setting that changes the result, grouped, with where its
    value came from (parameter, environment, profile, a rule of resolve, default); then every note of what was chosen
    for the user and why."""
    spec = get_arch(cfg.arch)
    size = input_size(cfg)
    p1, p2 = cfg.phase_epochs
    epochs = "every layer from the first epoch" if cfg.training_recipe == SCRATCH else f"{p1} head + {p2} fine-tuning"
    lines = [
        f"Architecture : {spec.display_name} ({cfg.arch}), input {size}×{size} px",
        f"Profile      : {cfg.profile} ({cfg.why('profile') or 'given'})",
        f"Dataset      : {cfg.data_dir}",
        f"Weights      : {cfg.weights or 'none (random initialisation)'}",
        f"Recipe       : {cfg.recipe_label}",
        f"Epochs       : up to {cfg.epochs} ({epochs}), batch {cfg.batch_size}, seed {cfg.seed}",
        f"Output folder: {cfg.output_path.resolve()}",
        "",
        "Settings that change the result (value — where it came from):",
    ]
    settings = cfg.settings()
    width = max(len(name) for _, name, _, _ in settings)
    group = None
    for group_name, name, value, source in settings:
        if group_name != group:
            lines.append(f"  {group_name}")
            group = group_name
        lines.append(f"    {name:<{width}} = {value}  [{source}]")
    return "\n".join(lines + cfg.note_lines())


def input_size(cfg: RunConfig) -> int:
    """The input side length this run builds its network at."""
    return check_image_size(get_arch(cfg.arch), cfg.image_size)


def check_data(cfg: RunConfig):
    """Check the dataset folder and return the report (its summary is printed). The same pass fills the study's
    image cache (OUTPUT/.image_cache), which every model's pipeline, evaluation and Grad-CAM read."""
    progress.step("data check")
    report = check_dataset(cfg.data_dir, cache=StudyCache.in_output(cfg.study_path, cfg.image_size))
    print(report.summary())
    return report


def show_class_examples(report, per_class: int = 4, seed: int = 0):
    """Figure: random images from each class."""
    rng = np.random.default_rng(seed)
    frame = report.to_frame()
    images = {}
    for name in CLASSES:
        paths = frame.loc[frame["label"] == name, "path"].to_numpy()
        picks = rng.permutation(paths)[:per_class]
        images[name] = [read_rgb(Path(report.root) / p) for p in picks]
    return plot_class_examples(images)


def problems_table(report) -> pd.DataFrame:
    """The problems the check found, one row each (empty when the folder is clean)."""
    return pd.DataFrame([{"path": p.path, "kind": p.kind, "message": p.message} for p in report.problems],
                        columns=["path", "kind", "message"])


def duplicate_groups_table(report) -> pd.DataFrame:
    """Per class: images, duplicate groups, and images per group."""
    frame = report.to_frame()
    table = frame.groupby("label").agg(images=("path", "size"), groups=("group", "nunique"))
    table["images_per_group"] = (table["images"] / table["groups"]).round(2)
    return table.reindex(CLASSES)


def show_duplicate_check(report):
    """Figure: similarity of accepted pairs against the nearest rejected ones, and the group sizes."""
    return plot_duplicate_diagnostics([p["score"] for p in report.pairs], [p["accepted"] for p in report.pairs],
                                      report.min_score, report.group_sizes())


def show_boundary_pairs(report, n: int = 4):
    """Figure: the candidate pairs scored closest to the threshold, side by side, with their verdict."""
    pairs = report.boundary_pairs(n)
    if not pairs:
        print("No candidate pair came near the threshold.")
        return None
    images, titles = [], []
    for p in pairs:
        verdict = "copy" if p["accepted"] else "distinct"
        images += [read_rgb(Path(report.root) / p["a"]), read_rgb(Path(report.root) / p["b"])]
        titles += [f"{p['a']}", f"{p['score']:.3f}: {verdict}\n{p['b']}"]
    return plot_image_grid(images, titles, ncols=4)


def prepare_split(cfg: RunConfig, report=None) -> pd.DataFrame:
    """The study's split: the output folder's split for this dataset, or a new one made and saved there."""
    progress.step("split")
    split, path = resolve_split(cfg, verbose=1, report=report)
    split.attrs["split_path"] = str(path)
    return split


def show_preprocessing(cfg: RunConfig, split: pd.DataFrame):
    """Figure: one image before and after the architecture's own preprocess_input, with value ranges."""
    spec = get_arch(cfg.arch)
    images, _, _ = load_images(split, "train", input_size(cfg), limit=1)
    x = spec.network_input(images)[0]
    shown = (x - x.min()) / max(float(x.max() - x.min()), 1e-9)
    titles = [f"uint8 input [{images.min()}, {images.max()}]",
              f"after preprocess_input\n[{x.min():.2f}, {x.max():.2f}] (rescaled to show)"]
    return plot_image_grid([images[0], shown], titles, ncols=2, title=f"{spec.display_name} preprocessing")


def show_augmentation(cfg: RunConfig, split: pd.DataFrame, n: int = 8):
    """Figure: the same training image through the training augmentation n times."""
    images, _, _ = load_images(split, "train", input_size(cfg), limit=1)
    shown = [images[0]] + [np.asarray(augment_image(images[0], seed=(cfg.seed, i), brightness=cfg.augment_brightness,
                                                    contrast_range=cfg.contrast_range)) for i in range(n - 1)]
    return plot_image_grid(shown, ["original"] + [f"augmented {i}" for i in range(1, n)], ncols=4,
                           title="Training augmentation (flips, 90° rotations, brightness/contrast)")


def model_summary(cfg: RunConfig) -> pd.DataFrame:
    """The network block by block: layers, parameters, and per phase of the run's recipe how many are trained and
    how many stay fixed (fixed includes BatchNorm's moving statistics, which no gradient changes). Built with
    weights=None, so it needs no download; the counts do not depend on the weights."""
    spec = get_arch(cfg.arch)
    model = build_model(spec.key, image_size=input_size(cfg), weights=None, dropout=cfg.dropout,
                        hidden_units=cfg.hidden_units)
    unfreeze = cfg.unfreeze_layers if cfg.unfreeze_layers is not None else spec.unfreeze_layers
    phases = [p for p, epochs in enumerate(cfg.phase_epochs, start=1) if epochs]
    trained = {p: {id(layer) for layer in trainable_layers(model, p, unfreeze, cfg.training_recipe)} for p in phases}
    rows = []
    for block, layers in layer_blocks(model).items():
        row = {"block": block, "layers": len(layers), "parameters": sum(layer.count_params() for layer in layers)}
        for p in phases:
            row[f"phase {p} trained"] = sum(int(np.prod(w.shape)) for layer in layers if id(layer) in trained[p]
                                            for w in layer.weights if w.trainable)
            row[f"phase {p} fixed"] = row["parameters"] - row[f"phase {p} trained"]
        rows.append(row)
    table = pd.DataFrame(rows).set_index("block")
    table.loc["total"] = table.sum()
    return table


def train(cfg: RunConfig, split: pd.DataFrame):
    """Train the architecture with the run's recipe (two-phase fine-tuning, or every layer from scratch); a live
    progress bar when watched, a line per epoch when headless."""
    progress.emit("training", arch=cfg.arch, epochs=cfg.epochs, recipe=cfg.recipe_label)
    result = train_from_config(cfg.replace(split_path=split.attrs["split_path"]))
    meta = result.history.get("meta") or {}
    progress.emit("trained", arch=cfg.arch, epochs_run=len(result.history.get("phase", [])),
                  best_epoch=meta.get("best_epoch"))
    return result


def show_curves(result):
    """Figure: accuracy and loss curves with the phase boundary."""
    return plot_history(result.history.get("history", result.history), title=f"{result.model.name} training")


def evaluate(cfg: RunConfig, result, split: pd.DataFrame) -> dict[str, Any]:
    """Evaluate the trained model on the test subset and write predictions, results and figures."""
    progress.step("evaluation: predictions, metrics, Grad-CAM, cost")
    return evaluation.evaluate(result.model, split, "test", cfg.output_path, history=result.history,
                               config=cfg.to_dict(), model_path=result.model_path, weights_used=result.weights_used,
                               gradcam_images=cfg.gradcam_images, n_boot=cfg.bootstrap, seed=cfg.seed,
                               cost_repeats=cfg.cost_repeats, tta=cfg.tta)


def metrics_table(results: dict[str, Any]) -> pd.DataFrame:
    """Headline metrics with their 95% intervals, one row each."""
    m = results["metrics"]
    rows = []
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "myeloblast_recall", "log_loss", "ece"):
        ci = m.get(f"{key}_ci") or [np.nan, np.nan]
        rows.append({"metric": key, "value": m.get(key), "ci_low": ci[0], "ci_high": ci[1]})
    return pd.DataFrame(rows).set_index("metric").round(4)


def classification_report_table(results: dict[str, Any]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support."""
    report = results["metrics"]["per_class"]
    return pd.DataFrame({k: v for k, v in report.items() if isinstance(v, dict)}).T.round(3)


def show_figure(results: dict[str, Any], kind: str):
    """Show one of the PNG figures written by the evaluation (confusion, roc, curves, gradcam ...)."""
    name = results["run"]
    return Image(filename=str(Path(results.get("output_dir", ".")) / f"{name}_{kind}.png"))


def explainability_table(results: dict[str, Any]) -> pd.DataFrame:
    """Grad-CAM and Grad-CAM++ numbers: focus on the cell, deletion AUC, randomisation sanity."""
    block = results.get("explainability") or {}
    rows = {m: block[m] for m in ("gradcam", "gradcam++") if m in block}
    return pd.DataFrame(rows).T


def explain_image(cfg: RunConfig, result, split: pd.DataFrame, image: int | str | Path = 0, top: int = 3):
    """Figure: one image, its top classes and Grad-CAM / Grad-CAM++ of the predicted class side by side (the top
    classes are printed too). image: a position in the test subset (split order) or the path of any image file."""
    model = result.model
    if isinstance(image, (int, np.integer)):
        rows = split[split["subset"] == "test"]
        if not 0 <= int(image) < len(rows):
            raise ConfigError(f"image {image}: the test subset has {len(rows)} images, numbered 0 to {len(rows) - 1}; "
                              "pass one of those numbers or the path of an image file.")
        row = rows.iloc[int(image)]
        path, true_label = Path(split.attrs["data_root"]) / row["path"], row["label"]
    else:
        path, true_label = Path(image), None
    explanation = explain_one_image(model, prepare_image(read_rgb(path), int(model.input_shape[1])), true_label)
    print(f"{path}" + (f" (true class: {true_label})" if true_label else ""))
    for rank, (name, p) in enumerate(explanation.top(top), start=1):
        print(f"  {rank}. {name:<22} {p:.3f}")
    return plot_explanation(explanation, top)


def outputs_written(cfg: RunConfig) -> pd.DataFrame:
    """The files this run wrote for its architecture, with their sizes."""
    files = sorted(p for p in cfg.output_path.glob(f"{cfg.arch}*") if p.is_file())
    files += [p for p in (cfg.output_path / SPLIT_FILE,) if p.exists()]
    return pd.DataFrame({"file": [str(p) for p in files], "kB": [round(p.stat().st_size / 1024, 1) for p in files]})


# --- The Comparison notebook ---------------------------------------------------------------------


def compare(output_dir: str | Path):
    """Build the comparison of every model in the output folder (training the shortcut baseline if needed); a
    cross-validated study (run_all.py --folds) is combined from its folds and compared in OUTPUT/cv."""
    progress.step("comparison: shortcut baseline, table, paired tests")
    comparison, _, _ = compare_study(Path(output_dir_override(output_dir)))
    return comparison


def cross_validation_table(output_dir: str | Path) -> pd.DataFrame:
    """Per model: folds, seeds, and the mean ± sd over the fold runs (one row saying "none" without folds)."""
    table = cv_table(cv_path(Path(output_dir_override(output_dir))))
    return table if not table.empty else pd.DataFrame({"cross-validation": ["none: no folds in this output folder "
                                                                            "(run_all.py --folds K)"]})


def learning_curve(output_dir: str | Path) -> pd.DataFrame:
    """The learning-curve table (macro-F1 against training cells, pretrained and from scratch); "none" without
    learning-curve runs."""
    table, _ = learning_curve_table(Path(output_dir_override(output_dir)))
    return display_learning_curve(table)


def show_learning_curve(output_dir: str | Path):
    """Figure: macro-F1 with intervals against the number of training cells, one line per network and
    initialisation (written by compare as learning_curve.png); None without learning-curve runs."""
    path = Path(output_dir_override(output_dir)) / CURVE_FIGURE
    return Image(filename=str(path)) if path.is_file() else None


def comparison_table(comparison) -> pd.DataFrame:
    """The readable comparison table (values with 95% intervals)."""
    return display_table(comparison.table)


def missing_table(comparison) -> pd.DataFrame:
    """Models and files that are missing or partial; one row saying "none" when everything is there."""
    return pd.DataFrame({"missing or partial": [*comparison.missing, *comparison.problems] or ["none"]})


def show_metric_bars(comparison, metric: str):
    """Figure: one metric per model with its interval as whiskers (the same figure the HTML report embeds)."""
    return metric_bars(comparison, metric)


def show_cost_scatter(comparison, cost_column: str):
    """Figure: accuracy against a cost column (FLOPs, latency, parameters) for the CNNs (as in the HTML report)."""
    return cost_scatter(comparison, cost_column)


def show_paired_tests(comparison):
    """The paired macro-F1 differences (every CNN against the best and the baseline), with Holm-adjusted p."""
    if comparison.paired.empty:
        return "Fewer than two evaluated runs on one split: nothing to test."
    return display_paired(comparison.paired)


def show_shortcut_test(comparison):
    """Per network: accuracy on the test images, with the cell masked out and with the background masked out;
    'YES' when it is far above chance without the cell (it reads the background)."""
    shown = display_shortcut(comparison.table)
    return shown if not shown.empty else "No network in this folder recorded the background shortcut test."


def show_calibration(comparison):
    """Per network: the temperature fitted on validation, and ECE, classwise ECE and Brier before and after it."""
    shown = display_calibration(comparison.table)
    return shown if not shown.empty else "No network in this folder recorded a calibration."


def show_explanations(comparison):
    """Per network: Grad-CAM focus and deletion ÷ random-order deletion with intervals, on the shared image set."""
    shown = display_explanations(comparison.table)
    return shown if not shown.empty else "No network in this folder recorded Grad-CAM numbers."


def show_tta(comparison):
    """Per network that ran it: macro-F1 and accuracy with test-time augmentation beside the single pass."""
    shown = display_tta(comparison.table)
    return shown if not shown.empty else ("No network in this folder ran test-time augmentation (off in the demo "
                                          "and smoke profiles; evaluation.TTA_BY_PROFILE).")


def show_gradcam_side_by_side(output_dir: str | Path, per_class: int = 1):
    """Figure: every evaluated model's Grad-CAM on the same test images (per_class of each class), drawn from the
    examples each evaluation saved (`<run>_gradcam.npz`): no model is reloaded and no heatmap recomputed."""
    progress.step("Grad-CAM side by side")
    return gradcam_side_by_side(Path(output_dir_override(str(output_dir))), per_class=per_class)


def shortcut_and_leakage(comparison) -> pd.DataFrame:
    """The shortcut baseline row beside the best CNN, and the leakage deltas when measured."""
    t = comparison.table
    best, _ = comparison.best_and_runner_up()
    rows = t[(t["run"] == BASELINE_RUN) | (t["run"] == (best["run"] if best is not None else None))]
    table = display_table(rows)
    if not comparison.leakage.empty:
        print(comparison.leakage.to_string(index=False))
    else:
        print("No image-level split run in this folder, so no leakage delta (run_all.py --leakage adds one).")
    return table


def show_conclusion(comparison):
    """The conclusion, written from the numbers, as Markdown."""
    return Markdown(comparison.conclusion())


def write_report(output_dir: str | Path, comparison=None) -> Path:
    """Write `comparison.html` into the output folder (self-contained: table, figures, conclusion, configuration,
    versions), print where it is and return its path. comparison: the folder's, when already built."""
    progress.step("HTML report")
    folder = comparison.folder if comparison is not None and comparison.folder else None
    path = write_comparison_report(folder or Path(output_dir_override(output_dir)), comparison)
    print(f"HTML report: {path.resolve()}")
    return path
