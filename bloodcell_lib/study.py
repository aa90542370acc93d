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

from bloodcell_lib import evaluation
from bloodcell_lib.baseline import ensure_shortcut_baseline
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.compare import BASELINE_RUN, compare_results, display_paired, display_table
from bloodcell_lib.config import AUTO, NOTEBOOK_OUTPUT, RunConfig, check_image_size, output_dir_override, resolve
from bloodcell_lib.dataset import check_dataset
from bloodcell_lib.explain import gradcam_side_by_side
from bloodcell_lib.figures import plot_class_examples, plot_duplicate_diagnostics, plot_history, plot_image_grid
from bloodcell_lib.images import read_rgb
from bloodcell_lib.model import imagenet_available
from bloodcell_lib.pipeline import augment_image, load_images
from bloodcell_lib.registry import get_arch
from bloodcell_lib.report import cost_scatter, metric_bars, write_comparison_report
from bloodcell_lib.split import SPLIT_FILE, resolve_split
from bloodcell_lib.synthetic import ensure_synthetic_dataset
from bloodcell_lib.training import train_from_config


def configure(arch: str, profile: str = AUTO, data_dir: str | None = None, **params: Any) -> RunConfig:
    """Resolve a notebook's parameters into the run's configuration (config.resolve, with the notebooks' defaults:
    the demo on a synthetic stand-in without DATA_DIR, ../Saved Models) and make the stand-in when it is used."""
    cfg = resolve(profile, spec=get_arch(arch), stand_in=True, imagenet_reachable=imagenet_available,
                  default_output=NOTEBOOK_OUTPUT, data_dir=data_dir, **params)
    if not data_dir:  # resolve chose the stand-in (or refused the paper profile without data)
        ensure_synthetic_dataset(cfg.data_dir, per_class=cfg.synth_per_class, size=cfg.synth_size,
                                 duplicates=cfg.synth_duplicates, seed=cfg.seed, shortcut=cfg.synth_shortcut)
    return cfg


def describe(cfg: RunConfig) -> str:
    """A short, loud summary of what this run will do, with every note of what was chosen for the user and why."""
    spec = get_arch(cfg.arch)
    size = input_size(cfg)
    p1, p2 = cfg.phase_epochs
    lines = [
        f"Architecture : {spec.display_name} ({cfg.arch}), input {size}×{size} px",
        f"Profile      : {cfg.profile} ({cfg.why('profile') or 'given'})",
        f"Dataset      : {cfg.data_dir}",
        f"Weights      : {cfg.weights or 'none (random initialisation)'}",
        f"Epochs       : up to {cfg.epochs} ({p1} head + {p2} fine-tuning), batch {cfg.batch_size}, seed {cfg.seed}",
        f"Output folder: {cfg.output_path.resolve()}",
    ]
    return "\n".join(lines + cfg.note_lines())


def input_size(cfg: RunConfig) -> int:
    """The input side length this run builds its network at."""
    return check_image_size(get_arch(cfg.arch), cfg.image_size)


def check_data(cfg: RunConfig):
    """Check the dataset folder and return the report (its summary is printed)."""
    report = check_dataset(cfg.data_dir)
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
    shown = [images[0]] + [np.asarray(augment_image(images[0], seed=(cfg.seed, i))) for i in range(n - 1)]
    return plot_image_grid(shown, ["original"] + [f"augmented {i}" for i in range(1, n)], ncols=4,
                           title="Training augmentation (flips, 90° rotations, brightness/contrast)")


def train(cfg: RunConfig, split: pd.DataFrame):
    """Fine-tune the architecture in two phases (Keras progress bar shows live progress)."""
    return train_from_config(cfg.replace(split_path=split.attrs["split_path"]))


def show_curves(result):
    """Figure: accuracy and loss curves with the phase boundary."""
    return plot_history(result.history.get("history", result.history), title=f"{result.model.name} training")


def evaluate(cfg: RunConfig, result, split: pd.DataFrame) -> dict[str, Any]:
    """Evaluate the trained model on the test subset and write predictions, results and figures."""
    return evaluation.evaluate(result.model, split, "test", cfg.output_path, history=result.history,
                               config=cfg.to_dict(), model_path=result.model_path, weights_used=result.weights_used,
                               gradcam_images=cfg.gradcam_images, n_boot=cfg.bootstrap, seed=cfg.seed,
                               cost_repeats=cfg.cost_repeats)


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


def outputs_written(cfg: RunConfig) -> pd.DataFrame:
    """The files this run wrote for its architecture, with their sizes."""
    files = sorted(p for p in cfg.output_path.glob(f"{cfg.arch}*") if p.is_file())
    files += [p for p in (cfg.output_path / SPLIT_FILE,) if p.exists()]
    return pd.DataFrame({"file": [str(p) for p in files], "kB": [round(p.stat().st_size / 1024, 1) for p in files]})


# --- The Comparison notebook ---------------------------------------------------------------------


def compare(output_dir: str | Path):
    """Build the comparison of every model in the output folder (training the shortcut baseline if needed)."""
    output_dir = Path(output_dir_override(output_dir))
    split_path = output_dir / SPLIT_FILE
    if split_path.exists():
        ensure_shortcut_baseline(split_path, output_dir)  # resampled like the models in the folder
    comparison = compare_results(output_dir)
    comparison.save(output_dir)
    return comparison


def comparison_table(comparison) -> pd.DataFrame:
    """The readable comparison table (values with 95% intervals)."""
    return display_table(comparison.table)


def missing_table(comparison) -> pd.DataFrame:
    """Models and files that are missing or partial (empty when everything is there)."""
    return pd.DataFrame({"missing or partial": [*comparison.missing, *comparison.problems]})


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


def show_gradcam_side_by_side(output_dir: str | Path, per_class: int = 1):
    """Figure: every evaluated model's Grad-CAM on the same test images (per_class of each class), drawn from the
    examples each evaluation saved (`<run>_gradcam.npz`): no model is reloaded and no heatmap recomputed."""
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
    path = write_comparison_report(Path(output_dir_override(output_dir)), comparison)
    print(f"HTML report: {path.resolve()}")
    return path
