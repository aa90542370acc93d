"""Render the five model notebooks and the Comparison notebook from one template.

    python notebooks/render.py          # write the notebooks
    python notebooks/render.py --check  # exit 1 when a committed notebook differs from its rendering

Fix a sentence here and it is fixed in all five notebooks. Notebooks are committed without outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from bloodcell_lib.registry import ARCHITECTURES

HERE = Path(__file__).resolve().parent


def model_notebooks() -> dict[str, str]:
    """Notebook title → registry key; the registry is the one place architectures are listed."""
    return {spec.notebook: spec.key for spec in ARCHITECTURES.values()}


SETUP_PROSE = """## Setup

Detects Colab, mounts Google Drive when `MOUNT_DRIVE = True` in the Parameters cell above (your Kaggle
folder or output folder lives there), and makes `bloodcell_lib` importable: in a local clone it is found
next to this notebook; in Colab, first clone the repository into `/content/bloodcell` (or copy it to
`MyDrive/bloodcell`)."""

SETUP_CODE = """import importlib.util
import subprocess
import sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules

if IN_COLAB and MOUNT_DRIVE:
    from google.colab import drive

    drive.mount("/content/drive")

if importlib.util.find_spec("bloodcell_lib") is None:
    candidates = [Path.cwd().parent, Path.cwd(), Path("/content/bloodcell"), Path("/content/drive/MyDrive/bloodcell")]
    repo = next((c for c in candidates if (c / "bloodcell_lib").is_dir()), None)
    if repo is None:
        raise ModuleNotFoundError("bloodcell_lib not found: clone the repository to /content/bloodcell, then rerun.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(repo)], check=True)
    sys.path.insert(0, str(repo))
print("Colab:", IN_COLAB)"""


def parameters_cell(source: str):
    """A code cell tagged `parameters`, so papermill can inject values after it."""
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


def model_cells(title: str, arch: str) -> list:
    """The cells of one model notebook."""
    md, code = new_markdown_cell, new_code_cell
    return [
        md(f"""# {title}: fine-tuning on single blood-cell images

Fine-tunes Keras' ImageNet-pretrained **{title}** to tell five blood-cell types apart — basophil,
erythroblast, monocyte, myeloblast (the leukaemia-relevant one) and segmented neutrophil — and asks
whether the answer can be trusted and explained. Every model notebook of this suite is rendered from one
template, runs the same steps on the same split, and writes its results to the output folder for the
`Comparison` notebook.

*Research software, not a medical device.* Numbers on the Kaggle set "Blood Cell Images for Cancer
Detection" are inflated by augmented copies of the same cells and by a background-colour shortcut; this
notebook keeps copies on one side of the split, reports 95% intervals, and the comparison shows the
shortcut baseline beside the networks."""),
        md("""## Parameters

`PROFILE` picks a preset: `paper` (your Kaggle folder, ImageNet weights, native input size, up to 20
epochs with early stopping), `demo` (no dataset needed: a synthetic stand-in, small images, few epochs)
or `smoke` (tiny, for CI); `auto` means `paper` when `DATA_DIR` is given and `demo` otherwise. `None`
keeps the profile's value. A value you set always wins: the environment variables `BLOODCELL_PROFILE` and
`BLOODCELL_OUTPUT` only fill in an `auto` profile and output folder. The summary below names every value
that was chosen for you, and why."""),
        parameters_cell("""MOUNT_DRIVE = False  # True: mount Google Drive in Colab (a DATA_DIR or OUTPUT_DIR on Drive)
DATA_DIR = None  # the Kaggle folder (or one/two levels above it); None → synthetic demo set
PROFILE = "auto"  # auto | paper | demo | smoke
EPOCHS = None  # total over both training phases
IMAGE_SIZE = None  # "native" or pixels
BATCH_SIZE = None
WEIGHTS = None  # "imagenet", "none" or a path to a weights file
OUTPUT_DIR = "auto"  # a folder (e.g. on Drive); auto → $BLOODCELL_OUTPUT, else the repository's Saved Models
SEED = 42
# Cross-validation: fold FOLD (1..FOLDS) of a grouped, stratified FOLDS-fold split made with SEED, in its own
# folder OUTPUT_DIR/cv/; None → the single hold-out split (run_all.py --folds K runs every fold)
FOLDS = None
FOLD = None
# Learning curve: train on this share of the study split's training cells, in OUTPUT_DIR/learning_curve/
TRAIN_FRACTION = None
CURVE_POINT = False  # True: a learning-curve point even at fraction 1 (the from-scratch ablation)"""),
        md(SETUP_PROSE),
        code(SETUP_CODE),
        code(f"""from bloodcell_lib import study

cfg = study.configure(
    "{arch}", profile=PROFILE, data_dir=DATA_DIR, epochs=EPOCHS, image_size=IMAGE_SIZE,
    batch_size=BATCH_SIZE, weights=WEIGHTS, output_dir=OUTPUT_DIR, seed=SEED, folds=FOLDS, fold=FOLD,
    train_fraction=TRAIN_FRACTION, curve_point=CURVE_POINT or None,
)
print(study.describe(cfg))"""),
        md("""## Data checking

Every file is decoded once. Unreadable, empty and non-image files are skipped and named; grayscale,
RGBA, 16-bit and CMYK images are converted to RGB; exact copies and near-duplicates (the same cell turned by
any angle, flipped, zoomed, shifted, re-lit, defocused or re-compressed) are grouped. Nothing is ever written
into the dataset folder."""),
        code("report = study.check_data(cfg)"),
        code("study.show_class_examples(report)"),
        code("study.problems_table(report)"),
        md("""Duplicate groups per class: the Kaggle set holds augmented copies of fewer original cells. Copies of
one cell must never be split between training and test, or the test score measures memory."""),
        code("study.duplicate_groups_table(report)"),
        md("""How the copies were found: each image's stain around the white cell is resampled on a log-polar grid, so
a rotation, flip or zoom becomes a shift; candidate pairs are verified by their best correlation over every
rotation, flip and zoom. Left: accepted pairs (green) should sit well right of the threshold and the nearest
rejected pairs (red) well left of it. Right: most groups should hold a handful of images; a long tail would mean
distinct cells chained together (the check warns about any group larger than 3 × the median)."""),
        code("study.show_duplicate_check(report)"),
        md("The pairs scored closest to the threshold: look whether the verdicts are right."),
        code("study.show_boundary_pairs(report)"),
        md(f"""## Preprocessing

The split is stratified by class and grouped by duplicate group, and it is saved once and reused by every
model of the study. Images are decoded once, resized and cached as uint8; the training subset alone is
augmented; {title}'s own `preprocess_input` is the last step."""),
        code("""from bloodcell_lib.split import split_summary

split = study.prepare_split(cfg, report)
print(split_summary(split))"""),
        code("study.show_preprocessing(cfg, split)"),
        code("study.show_augmentation(cfg, split)"),
        md("""## Training

The recipe follows the weights. Pretrained weights are fine-tuned in two phases: phase 1 trains the new head
on a frozen base (BatchNorm in inference mode); phase 2 unfreezes the top layers (BatchNorm stays frozen) at a
lower learning rate. Without pretrained weights there is nothing to preserve: every layer, BatchNorm in training
mode, trains from the first epoch in one phase. Early stopping restores the best weights. A disconnected run
resumes from its last finished epoch when this cell is run again.

The network block by block, and how many of its parameters each phase of this run's recipe trains:"""),
        code("study.model_summary(cfg)"),
        code("result = study.train(cfg, split)"),
        code("study.show_curves(result)"),
        md("""## Evaluation

One prediction pass over the test subset, written to a predictions CSV; every number below is computed
from that file. Intervals are 95% bootstrap intervals that resample whole duplicate groups."""),
        code("""results = study.evaluate(cfg, result, split)
study.metrics_table(results)"""),
        code('study.show_figure(results, "confusion_normalised")'),
        code('study.show_figure(results, "roc")'),
        code('study.show_figure(results, "samples")'),
        code("study.classification_report_table(results)"),
        md("""## Explainability

Grad-CAM on the registry's last convolutional layer, for right and wrong predictions of every class.
*Focus* is the share of heatmap energy on the cell divided by the cell's share of the image (1 = no
better than chance); *deletion AUC* is the class probability as the most salient pixels are removed
(lower is better); *sanity* is the rank correlation with the heatmaps of a weight-randomised copy
(should be low)."""),
        code('study.show_figure(results, "gradcam")'),
        code("study.explainability_table(results)"),
        md("""Any single image: its three most probable classes, and Grad-CAM beside Grad-CAM++ for the predicted
class. `IMAGE` is a position in the test subset or the path of any image file."""),
        code("""IMAGE = 0
study.explain_image(cfg, result, split, IMAGE)"""),
        md("""## Saving

The model (`.keras`, loadable with `keras.models.load_model(path, safe_mode=True)`), its training history
(JSON, and the pickle of the original notebooks), predictions, results and figures. Every file is written
atomically: a crash never leaves half a model in place of a good one."""),
        code("study.outputs_written(cfg)"),
    ]


def comparison_cells() -> list:
    """The cells of the Comparison notebook."""
    md, code = new_markdown_cell, new_code_cell
    return [
        md("""# Comparison: which network tells the five blood-cell types apart best?

Reads every `*_results.json`, training history and predictions file in the output folder and compares the
networks on the same test images: metrics with 95% intervals, myeloblast recall, calibration,
explanation quality and cost. Models that have not been run yet are listed, not fatal.

*Research software, not a medical device.*"""),
        md("## Parameters"),
        parameters_cell("""MOUNT_DRIVE = False  # True: mount Google Drive in Colab (for an OUTPUT_DIR on Drive)
# the folder the model notebooks wrote to; auto → $BLOODCELL_OUTPUT, else the repository's Saved Models
OUTPUT_DIR = "auto"
"""),
        md(SETUP_PROSE),
        code(SETUP_CODE),
        md("""## The table

The colour-only shortcut baseline (logistic regression on background colour) is trained on the same
split: a network is only interesting by the margin it adds above it."""),
        code("""from bloodcell_lib import study

comparison = study.compare(OUTPUT_DIR)
study.comparison_table(comparison)"""),
        code("study.missing_table(comparison)"),
        md("## Metrics with interval whiskers"),
        code('study.show_metric_bars(comparison, "macro_f1")'),
        code('study.show_metric_bars(comparison, "myeloblast_recall")'),
        md("## Accuracy against cost"),
        code('study.show_cost_scatter(comparison, "flops_per_image")'),
        code('study.show_cost_scatter(comparison, "latency_ms")'),
        md("""## Are the differences real?

Every network against the best one and against the shortcut baseline, on the test images both saw: the
difference in macro-F1 (the metric that ranks them) with a 95% interval from a bootstrap that resamples
whole cells (all copies of a cell together, the same draw for both models), and a p-value from swapping
the two models' predictions cell by cell, Holm-adjusted over all rows. A difference is real only when its
paired interval excludes 0; two overlapping intervals in the table above do not mean "no difference"."""),
        code("study.show_paired_tests(comparison)"),
        md("""## Does each network read the cell? The background shortcut, tested directly

Every test image is shown twice more: with the cell masked out (filled with the image's median background
colour) and with the background masked out (neutral glass). A network that reads the cell drops to chance
without it; one whose background-only accuracy stays far above chance (the lower end of its interval more than
0.1 above chance) predicts from the slide around the cell and is marked YES; the conclusion names it."""),
        code("study.show_shortcut_test(comparison)"),
        md("""## Can the confidence be trusted? Calibration

ECE is the average gap between how sure a network says it is and how often it is right (0 = perfect).
Temperature scaling divides its logits by one number T fitted on the validation images (T > 1: it was
over-confident); the predictions stay the same, so read the T-scaled ECE as the confidence you can trust after
that one-number fix, and the interval of the change to see whether the fix helped on the test cells."""),
        code("study.show_calibration(comparison)"),
        md("""## Test-time augmentation

Each test image predicted in its 8 rotations and mirror images, the probabilities averaged (a cell has no up
or down). The difference is TTA minus the single pass on the same cells, with a paired interval: when it
includes 0, averaging over orientations does not change the score on this test set."""),
        code("study.show_tta(comparison)"),
        md("""## Do the explanations point at the cell?

Every network is explained on one set of test images chosen before any prediction (class-stratified, from the
split and the seed alone; `set` is its fingerprint and must be equal for all). *Focus*: how much of the Grad-CAM
heat lies on the cell. *Deletion ÷ random*: how fast the predicted class's probability falls when the hottest
pixels are removed first, relative to removing them in a random order — below 1 the map points at what the
prediction rests on, at 1 it does no better than chance; read the interval, not just the number. *Sanity ρ*
near 1 would mean the map hardly changes when the weights are randomised."""),
        code("study.show_explanations(comparison)"),
        md("## Grad-CAM on the same test images, side by side"),
        code("study.show_gradcam_side_by_side(OUTPUT_DIR)"),
        md("""## Shortcut and leakage

The baseline row shows what background colour alone achieves. The leakage delta (when a model was also
run on an image-level split) shows how much a random image split inflates accuracy."""),
        code("study.shortcut_and_leakage(comparison)"),
        md("""## Cross-validation

With `run_all.py --folds K [--seeds S ...]` every network is trained once per fold and seed, each fold's
cells tested by a model that never saw them (copies of one cell stay in one fold). The table above then
holds the out-of-fold scores (every image predicted once per seed; intervals resample whole cells), and this
table the spread over the fold runs: a mean ± sd much wider than the gap between two networks means one
hold-out split could not have ranked them."""),
        code("study.cross_validation_table(OUTPUT_DIR)"),
        md("""## Does transfer learning help? The learning curve

With `run_all.py --train-fractions 0.1 0.25 0.5 1.0 [--ablation scratch]` each network is trained on
shares of the training cells (whole cells, stratified by class), pretrained and from random initialisation,
and always tested on the same test cells. Read the gap between the solid (pretrained) and dashed (scratch)
lines at each size: transfer learning helps where the gap is wider than the intervals, and most with
few training cells."""),
        code("study.learning_curve(OUTPUT_DIR)"),
        code("study.show_learning_curve(OUTPUT_DIR)"),
        md("## Conclusion"),
        code("study.show_conclusion(comparison)"),
        md("""## The report

One self-contained page to send to a colleague: the table, the paired tests, these figures, the conclusion,
the run's configuration and versions, with every figure embedded (no network access needed to open it)."""),
        code("study.write_report(OUTPUT_DIR, comparison)"),
    ]


def build_notebook(cells: list):
    """A notebook with the given cells and a Python 3 kernel, no outputs."""
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": []}
    nb.metadata["accelerator"] = "GPU"
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def rendered() -> dict[str, str]:
    """Every notebook's file name and its rendered JSON text."""
    books = {f"{title}.ipynb": build_notebook(model_cells(title, arch)) for title, arch in model_notebooks().items()}
    books["Comparison.ipynb"] = build_notebook(comparison_cells())
    return {name: nbformat.writes(nb) + "\n" for name, nb in books.items()}


def main(argv: list[str] | None = None) -> int:
    """Write the notebooks, or with --check report which committed ones differ."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("Out of date (run python notebooks/render.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
