"""The notebook-facing steps of one study run: each notebook cell is one of these calls.

A notebook holds prose and calls; everything a cell does lives here, so the five model notebooks,
`run_all.py` and the CLI share one implementation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import RunConfig, output_dir_override, profile_config, resolve_profile
from bloodcell_lib.split import SPLIT_FILE

SYNTHETIC_FOLDER = "synthetic_data"


def configure(arch: str, profile: str = "auto", data_dir: str | None = None, **params: Any) -> RunConfig:
    """Resolve a notebook's parameters into a RunConfig: profile, dataset (or synthetic stand-in), weights, size."""
    from bloodcell_lib.registry import get_arch

    spec = get_arch(arch)
    # Explicit beats implicit: PROFILE in the notebook wins; BLOODCELL_PROFILE only replaces "auto".
    profile, why = resolve_profile(profile, default="paper" if data_dir and Path(data_dir).exists() else "demo")
    params = {k: v for k, v in params.items() if v is not None}
    if "output_dir" in params:
        params["output_dir"] = output_dir_override(params["output_dir"])
    cfg = profile_config(profile, arch=spec.key, data_dir=data_dir, **params)
    cfg.extra["profile_source"] = why
    notes = []
    if isinstance(cfg.image_size, int) and cfg.image_size < spec.min_size:
        notes.append(f"image size raised from {cfg.image_size} to {spec.display_name}'s minimum {spec.min_size} px")
        cfg.image_size = spec.min_size
    if cfg.profile != "paper" and (not cfg.data_dir or not Path(cfg.data_dir).exists()):
        cfg.data_dir = str(ensure_synthetic_data(cfg))
        notes.append(f"no dataset given: using the synthetic stand-in at {cfg.data_dir}")
    if cfg.profile == "demo" and cfg.weights == "imagenet" and not imagenet_reachable(spec.key):
        cfg.weights = None
        notes.append("IMAGENET WEIGHTS ARE NOT REACHABLE: training from random initialisation (weights=None); "
                     "these numbers say nothing about transfer learning")
    cfg.extra["notes"] = notes
    return cfg


def imagenet_reachable(arch: str) -> bool:
    """True when Keras could load the architecture's ImageNet weights (cached file or network)."""
    from bloodcell_lib.model import imagenet_available

    return imagenet_available(arch)


def ensure_synthetic_data(cfg: RunConfig) -> Path:
    """Generate the profile's synthetic set under the output folder once; reuse it afterwards."""
    from bloodcell_lib.atomic import write_json
    from bloodcell_lib.synthetic import GENERATOR_VERSION, make_synthetic_dataset

    out = cfg.output_path / SYNTHETIC_FOLDER
    stamp = out / "synth_params.json"
    params = {"per_class": cfg.synth_per_class, "size": cfg.synth_size, "duplicates": cfg.synth_duplicates,
              "seed": cfg.seed, "shortcut": cfg.synth_shortcut}
    if stamp.exists() and json.loads(stamp.read_text()) == {**params, "generator": GENERATOR_VERSION}:
        return out
    make_synthetic_dataset(out, **params)
    write_json(stamp, {**params, "generator": GENERATOR_VERSION})
    return out


def describe(cfg: RunConfig) -> str:
    """A short, loud summary of what this run will do."""
    from bloodcell_lib.registry import get_arch

    spec = get_arch(cfg.arch)
    size = spec.native_size if cfg.image_size == "native" else cfg.image_size
    p1, p2 = cfg.phase_epochs
    lines = [
        f"Architecture : {spec.display_name} ({cfg.arch}), input {size}×{size} px",
        f"Profile      : {cfg.profile} ({cfg.extra.get('profile_source', 'given')})",
        f"Dataset      : {cfg.data_dir}",
        f"Weights      : {cfg.weights or 'none (random initialisation)'}",
        f"Epochs       : up to {cfg.epochs} ({p1} head + {p2} fine-tuning), batch {cfg.batch_size}, seed {cfg.seed}",
        f"Output folder: {cfg.output_path.resolve()}",
    ]
    lines += [f"NOTE: {n}" for n in cfg.extra.get("notes", [])]
    return "\n".join(lines)


def check_data(cfg: RunConfig):
    """Check the dataset folder and return the report (its summary is printed)."""
    from bloodcell_lib.dataset import check_dataset

    report = check_dataset(cfg.data_dir)
    print(report.summary())
    return report


def show_class_examples(report, per_class: int = 4, seed: int = 0):
    """Figure: random images from each class."""
    from bloodcell_lib.figures import plot_class_examples
    from bloodcell_lib.images import read_rgb

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
    from bloodcell_lib.figures import plot_duplicate_diagnostics

    return plot_duplicate_diagnostics([p["score"] for p in report.pairs], [p["accepted"] for p in report.pairs],
                                      report.min_score, report.group_sizes())


def show_boundary_pairs(report, n: int = 4):
    """Figure: the candidate pairs scored closest to the threshold, side by side, with their verdict."""
    from bloodcell_lib.figures import plot_image_grid
    from bloodcell_lib.images import read_rgb

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
    from bloodcell_lib.training import resolve_split

    split, path = resolve_split(cfg, verbose=1, report=report)
    split.attrs["split_path"] = str(path)
    return split


def show_preprocessing(cfg: RunConfig, split: pd.DataFrame):
    """Figure: one image before and after the architecture's own preprocess_input, with value ranges."""
    from bloodcell_lib.figures import plot_image_grid
    from bloodcell_lib.pipeline import load_images
    from bloodcell_lib.registry import get_arch

    spec = get_arch(cfg.arch)
    images, _, _ = load_images(split, "train", image_size(cfg), limit=1)
    x = np.asarray(spec.preprocess(images.astype("float32")))[0]
    shown = (x - x.min()) / max(float(x.max() - x.min()), 1e-9)
    titles = [f"uint8 input [{images.min()}, {images.max()}]",
              f"after preprocess_input\n[{x.min():.2f}, {x.max():.2f}] (rescaled to show)"]
    return plot_image_grid([images[0], shown], titles, ncols=2, title=f"{spec.display_name} preprocessing")


def show_augmentation(cfg: RunConfig, split: pd.DataFrame, n: int = 8):
    """Figure: the same training image through the training augmentation n times."""
    from bloodcell_lib.figures import plot_image_grid
    from bloodcell_lib.pipeline import augment_image, load_images

    images, _, _ = load_images(split, "train", image_size(cfg), limit=1)
    shown = [images[0]] + [np.asarray(augment_image(images[0], seed=(cfg.seed, i))) for i in range(n - 1)]
    return plot_image_grid(shown, ["original"] + [f"augmented {i}" for i in range(1, n)], ncols=4,
                           title="Training augmentation (flips, 90° rotations, brightness/contrast)")


def image_size(cfg: RunConfig) -> int:
    """The input side length this run uses."""
    from bloodcell_lib.registry import get_arch

    return get_arch(cfg.arch).native_size if cfg.image_size == "native" else int(cfg.image_size)


def train(cfg: RunConfig, split: pd.DataFrame):
    """Fine-tune the architecture in two phases (Keras progress bar shows live progress)."""
    from bloodcell_lib.training import train_from_config

    return train_from_config(cfg.replace(split_path=split.attrs["split_path"]))


def show_curves(result):
    """Figure: accuracy and loss curves with the phase boundary."""
    from bloodcell_lib.figures import plot_history

    return plot_history(result.history.get("history", result.history), title=f"{result.model.name} training")


def evaluate(cfg: RunConfig, result, split: pd.DataFrame) -> dict[str, Any]:
    """Evaluate the trained model on the test subset and write predictions, results and figures."""
    from bloodcell_lib.evaluation import evaluate as _evaluate

    return _evaluate(result.model, split, "test", cfg.output_path, history=result.history, config=cfg.to_dict(),
                     model_path=result.model_path, weights_used=result.weights_used,
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
    from IPython.display import Image

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


LEAKAGE_FOLDER = "leakage"


def measure_leakage(output_dir: str | Path, arch: str, profile: str = "demo", epochs: int | None = None) -> dict:
    """Train and evaluate one architecture on an image-level split of the study's data (to measure leakage).

    The model lives in `<output>/leakage/`; its results land beside the others as `<arch>_imagesplit_*`,
    where the comparison turns them into the leakage delta.
    """
    from bloodcell_lib.evaluation import evaluate as _evaluate
    from bloodcell_lib.split import load_split

    output_dir = Path(output_dir)
    study_split = load_split(output_dir / SPLIT_FILE)
    cfg = configure(arch, profile=profile, data_dir=study_split.attrs["data_root"], epochs=epochs,
                    output_dir=str(output_dir / LEAKAGE_FOLDER), split_by="image", seed=study_split.attrs.get("seed"))
    split = prepare_split(cfg)
    result = train(cfg, split)
    return _evaluate(result.model, split, "test", output_dir, history=result.history, config=cfg.to_dict(),
                     model_path=result.model_path, weights_used=result.weights_used, gradcam_images=0,
                     n_boot=cfg.bootstrap, seed=cfg.seed, cost_repeats=cfg.cost_repeats)


# --- The Comparison notebook ---------------------------------------------------------------------


def compare(output_dir: str | Path):
    """Build the comparison of every model in the output folder (training the shortcut baseline if needed)."""
    from bloodcell_lib.compare import compare_results

    output_dir = Path(output_dir_override(str(output_dir)))
    split_path = output_dir / SPLIT_FILE
    if split_path.exists():
        from bloodcell_lib.baseline import ensure_shortcut_baseline

        ensure_shortcut_baseline(split_path, output_dir)  # resampled like the models in the folder
    comparison = compare_results(output_dir)
    comparison.save(output_dir)
    return comparison


def comparison_table(comparison) -> pd.DataFrame:
    """The readable comparison table (values with 95% intervals)."""
    from bloodcell_lib.compare import display_table

    return display_table(comparison.table)


def missing_table(comparison) -> pd.DataFrame:
    """Models and files that are missing or partial (empty when everything is there)."""
    return pd.DataFrame({"missing or partial": [*comparison.missing, *comparison.problems]})


def show_metric_bars(comparison, metric: str):
    """Figure: one metric per model with its interval as whiskers (the same figure the HTML report embeds)."""
    from bloodcell_lib.report import metric_bars

    return metric_bars(comparison, metric)


def show_cost_scatter(comparison, cost_column: str):
    """Figure: accuracy against a cost column (FLOPs, latency, parameters) for the CNNs (as in the HTML report)."""
    from bloodcell_lib.report import cost_scatter

    return cost_scatter(comparison, cost_column)


def show_paired_tests(comparison):
    """The paired macro-F1 differences (every CNN against the best and the baseline), with Holm-adjusted p."""
    from bloodcell_lib.compare import display_paired

    if comparison.paired.empty:
        return "Fewer than two evaluated runs on one split: nothing to test."
    return display_paired(comparison.paired)


def show_gradcam_side_by_side(output_dir: str | Path, per_class: int = 1):
    """Figure: Grad-CAM of every saved model on the same test images (one per class by default)."""
    from bloodcell_lib.explain import gradcam_heatmaps, overlay_heatmap
    from bloodcell_lib.figures import plot_image_grid
    from bloodcell_lib.model import load_trained_model, model_image_size
    from bloodcell_lib.pipeline import load_images
    from bloodcell_lib.registry import ARCHITECTURES
    from bloodcell_lib.split import load_split

    output_dir = Path(output_dir_override(str(output_dir)))
    models = [output_dir / f"{key}.keras" for key in ARCHITECTURES if (output_dir / f"{key}.keras").exists()]
    if not models or not (output_dir / SPLIT_FILE).exists():
        return "No saved model and split in this folder yet."
    split = load_split(output_dir / SPLIT_FILE)
    test = split[split["subset"] == "test"]
    picks = test.groupby("label", sort=False).head(per_class)
    chosen = split.loc[picks.index]
    chosen.attrs = dict(split.attrs)
    rows_images, titles = [], []
    for path in models:
        model, spec = load_trained_model(path)
        images, labels, _ = load_images(chosen, "test", model_image_size(model))
        heat = gradcam_heatmaps(model, spec.preprocess(images.astype("float32")), layer=spec.last_conv_layer)
        for img, h, y in zip(images, heat, labels):
            rows_images.append(overlay_heatmap(img, h))
            titles.append(f"{spec.display_name}\n{CLASSES[y]}")
    return plot_image_grid(rows_images, titles, ncols=len(chosen), title="Grad-CAM, same test images")


def shortcut_and_leakage(comparison) -> pd.DataFrame:
    """The shortcut baseline row beside the best CNN, and the leakage deltas when measured."""
    from bloodcell_lib.compare import BASELINE_RUN, display_table

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
    from IPython.display import Markdown

    return Markdown(comparison.conclusion())


def write_report(output_dir: str | Path, comparison=None) -> Path:
    """Write `comparison.html` into the output folder (self-contained: table, figures, conclusion, configuration,
    versions), print where it is and return its path. comparison: the folder's, when already built."""
    from bloodcell_lib.report import write_comparison_report

    path = write_comparison_report(Path(output_dir_override(str(output_dir))), comparison)
    print(f"HTML report: {path.resolve()}")
    return path
