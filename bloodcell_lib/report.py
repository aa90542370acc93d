"""The comparison as one self-contained HTML page: `comparison.html` beside the results it was made from.

The page holds what the Comparison notebook shows (the table with intervals, the paired tests, the leakage
delta, the figures, the conclusion) plus each run's configuration and library versions. It opens in any
browser without a network: figures are embedded as base64 PNGs, the style sheet is inline, and nothing on the
page points at a URL. It is rendered by Jinja2 from `templates/comparison.html.j2` with autoescaping on, because
run names, notes and paths come from files on disk.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import bloodcell_lib
from bloodcell_lib.atomic import write_text
from bloodcell_lib.compare import (
    BASELINE_RUN,
    ENSEMBLE_RUN,
    READ_CALIBRATION,
    READ_EXPLANATIONS,
    READ_SHORTCUT,
    READ_TTA,
    Comparison,
    compare_results,
    display_calibration,
    display_explanations,
    display_paired,
    display_shortcut,
    display_table,
    display_tta,
)
from bloodcell_lib.crossval import cv_table
from bloodcell_lib.errors import OutputError
from bloodcell_lib.figures import figure_png, plot_bars_with_intervals, plot_scatter
from bloodcell_lib.learning_curve import CURVE_FIGURE, display_learning_curve, learning_curve_table
from bloodcell_lib.results import figure_path, read_results, results_files, run_of, utc_timestamp

REPORT_FILE = "comparison.html"
TEMPLATE = "comparison.html.j2"
TITLE = "Which pretrained CNN best tells five blood-cell types apart, and can we trust it?"
PURPOSE = ("Five ImageNet-pretrained Keras networks fine-tuned on single blood-cell images and compared on the same "
           "test cells: metrics with 95% intervals, paired tests, a colour-only shortcut baseline, Grad-CAM and "
           "cost.")
# The same line when no network of the folder started from pretrained weights (the demo offline, a scratch ablation).
PURPOSE_SCRATCH = ("Keras networks trained from random initialisation — no pretrained weights in these runs, so they "
                   "say nothing yet about transfer learning — on single blood-cell images and compared on the same "
                   "test cells: metrics with 95% intervals, paired tests, a colour-only shortcut baseline, Grad-CAM "
                   "and cost.")
PURPOSE_MIXED = ("Keras networks, some fine-tuned from pretrained weights and some trained from random "
                 "initialisation (the weights column says which), on single blood-cell images and compared on the "
                 "same test cells: metrics with 95% intervals, paired tests, a colour-only shortcut baseline, "
                 "Grad-CAM and cost.")
MISSING = "—"  # a missing or non-finite number, as compare's display tables print it (never "nan")
# The Comparison notebook's figures, in its order: (table column, what the figure shows).
METRIC_BARS = (("macro_f1", "Macro-F1 with 95% interval whiskers"),
               ("myeloblast_recall", "Myeloblast recall with 95% interval whiskers"))
COST_SCATTERS = (("flops_per_image", "Accuracy against FLOPs per image"),
                 ("latency_ms", "Accuracy against latency (batch 1, median ms)"))
# The figures evaluation writes for each run (`<run>_<kind>.png`) that the report shows side by side.
MODEL_FIGURES = (("confusion_normalised", "normalised confusion matrix"), ("gradcam", "Grad-CAM on test images"),
                 ("reliability", "reliability before and after temperature scaling"))


def write_comparison_report(results_dir: str | Path, comparison: Comparison | None = None) -> Path:
    """Write `comparison.html` into the results folder (atomically) and return its path.

    comparison: the folder's comparison when the caller already built it; None → compare_results(results_dir).
    A folder without results gives a report that says so; a folder that does not exist is an OutputError.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise OutputError(f"Cannot write {results_dir / REPORT_FILE}: {results_dir} is not a folder. Give the output "
                          "folder the model notebooks or run_all.py wrote their *_results.json files to.")
    if comparison is None:
        comparison = compare_results(results_dir)
    return write_text(results_dir / REPORT_FILE, render_report(results_dir, comparison))


def render_report(results_dir: str | Path, comparison: Comparison) -> str:
    """The report's HTML text for a results folder and its comparison."""
    return _environment().get_template(TEMPLATE).render(**report_context(Path(results_dir), comparison))


@dataclass(frozen=True)
class HtmlTable:
    """A table as text cells, ready for the template's loops (which escape every cell)."""

    columns: list[str]
    rows: list[list[str]]

    @property
    def empty(self) -> bool:
        return not self.rows


@dataclass(frozen=True)
class EmbeddedFigure:
    """One figure as a data: URI, with the caption shown under it."""

    caption: str
    uri: str


def purpose(table: pd.DataFrame) -> str:
    """The report's opening line, true to the networks' weights: pretrained and fine-tuned (the study), trained
    from random initialisation (the demo offline), or a mix."""
    weights = table.loc[~table["run"].isin([BASELINE_RUN, ENSEMBLE_RUN]), "weights"]
    scratch = [pd.isna(w) or str(w).startswith("none") for w in weights]
    if scratch and all(scratch):
        return PURPOSE_SCRATCH
    return PURPOSE_MIXED if any(scratch) else PURPOSE


def report_context(results_dir: Path, comparison: Comparison) -> dict[str, Any]:
    """Everything the template shows, as text, tables and embedded figures."""
    found = read_runs(results_dir)
    # The table's order (registry order, the baseline last), then any run the table does not hold.
    runs = {run: found[run] for run in [*comparison.table["run"], *found] if run in found}
    table = display_table(comparison.table)
    table["size"] = comparison.table["image_size"].map(_int_text)  # an int column with a gap turns float
    config_shared, config_diff = settings_tables({name: r.get("config") for name, r in runs.items()})
    versions_shared, versions_diff = settings_tables({name: r.get("versions") for name, r in runs.items()},
                                                     label="library", unrecorded_differs=False)
    figures, figures_absent = embedded_figures(comparison)
    return {
        "title": TITLE,
        "purpose": purpose(comparison.table),
        "folder": str(results_dir.resolve()),
        "created": utc_timestamp(),
        "library_version": bloodcell_lib.__version__,
        "has_results": not comparison.table.empty,
        "conclusion": comparison.conclusion(),
        "models": html_table(table),
        "missing": [*comparison.missing, *comparison.problems],
        "figures": figures,
        "figures_absent": figures_absent,
        "paired": html_table(display_paired(comparison.paired)),
        "leakage": html_table(leakage_display(comparison.leakage)),
        "checks": [{"title": title, "note": note, "table": html_table(frame), "absent": absent}
                   for title, note, frame, absent in (
            ("Does the model read the cell? The background shortcut, tested directly", READ_SHORTCUT,
             display_shortcut(comparison.table), NOT_RECORDED),
            ("Can its confidence be trusted? Calibration", READ_CALIBRATION, display_calibration(comparison.table),
             NOT_RECORDED),
            ("Test-time augmentation", READ_TTA, display_tta(comparison.table), NOT_RECORDED),
            ("Do the explanations point at the cell? Grad-CAM numbers", READ_EXPLANATIONS,
             display_explanations(comparison.table), NOT_RECORDED),
            ("Cross-validation: the spread over the fold runs", READ_CV, cv_table(results_dir),
             "No cross-validation in this folder (run_all.py --folds K writes one into OUTPUT/cv)."),
            ("Does transfer learning help? The learning curve", READ_CURVE, curve_rows(results_dir),
             "No learning-curve runs in this folder (run_all.py --train-fractions ... [--ablation scratch]).")
        )],
        "curve_figure": curve_figure(results_dir),
        "mcnemar": html_table(mcnemar_display(comparison.mcnemar)),
        "model_figures": model_figures(results_dir, comparison.table),
        "runs": html_table(runs_table(comparison.table, runs)),
        "config_shared": config_shared,
        "config_diff": config_diff,
        "versions_shared": versions_shared,
        "versions_diff": versions_diff,
    }


NOT_RECORDED = "No model in this folder recorded it (evaluated before it was measured, or switched off)."
READ_CV = ("With run_all.py --folds K every network is trained once per fold (and seed), each fold's cells tested by a "
           "model that never saw them; the table above then holds the out-of-fold scores and this one the mean ± sd "
           "over the fold runs. A spread wider than the gap between two networks means one hold-out split could not "
           "have ranked them.")
READ_CURVE = ("With run_all.py --train-fractions ... [--ablation scratch] each network is trained on shares of the "
              "training cells, pretrained and from scratch, and tested on the same test cells: transfer learning "
              "helps where the pretrained score stays above the scratch one by more than the intervals.")


def curve_rows(results_dir: Path) -> pd.DataFrame:
    """The learning-curve table of the folder (empty without curve points)."""
    table, _ = learning_curve_table(results_dir)
    return display_learning_curve(table) if not table.empty else table


def curve_figure(results_dir: Path) -> EmbeddedFigure | None:
    """The learning-curve figure compare wrote (learning_curve.png), embedded; None without one."""
    path = results_dir / CURVE_FIGURE
    if not path.is_file():
        return None
    return EmbeddedFigure("Macro-F1 against training cells: pretrained (solid) and from scratch (dashed)",
                          png_uri(path.read_bytes()))


def read_runs(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every readable `*_results.json` in the folder by run name (unreadable ones are already in the
    comparison's problems list)."""
    runs = {}
    for path in results_files(results_dir):
        try:
            results = read_results(path)
            runs[run_of(results)] = results
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return runs


# --- Figures ---------------------------------------------------------------------------------------


def metric_bars(comparison: Comparison, metric: str) -> Figure | str:
    """One metric per model with its interval as whiskers, or a sentence saying why there is none."""
    t = comparison.table.dropna(subset=[metric])
    if t.empty:
        return f"No model has a {metric} yet."
    return plot_bars_with_intervals(t["model"], t[metric].astype(float), t[f"{metric}_ci"].tolist(), metric)


def cost_scatter(comparison: Comparison, cost_column: str) -> Figure | str:
    """Accuracy against a cost column (FLOPs, latency, parameters), or a sentence saying why there is none."""
    t = comparison.table.dropna(subset=[cost_column])
    if t.empty:
        return f"No model has a measured {cost_column} yet."
    return plot_scatter(t[cost_column].astype(float), t["accuracy"].astype(float), t["model"], cost_column,
                        "accuracy", logx=cost_column == "flops_per_image")


def comparison_figures(comparison: Comparison) -> Iterator[tuple[str, Figure | str]]:
    """The Comparison notebook's figures that the table alone can draw: (caption, Figure or why it is absent).

    A generator, so each figure can be rendered and dropped before the next one is drawn.
    """
    for metric, caption in METRIC_BARS:
        yield caption, metric_bars(comparison, metric)
    for column, caption in COST_SCATTERS:
        yield caption, cost_scatter(comparison, column)


def embedded_figures(comparison: Comparison) -> tuple[list[EmbeddedFigure], list[str]]:
    """(the comparison figures embedded as PNGs, the sentences for those that could not be drawn)."""
    shown, absent = [], []
    for caption, fig in comparison_figures(comparison):
        if isinstance(fig, Figure):
            shown.append(embed_figure(caption, fig))
        else:
            absent.append(fig)
    return shown, absent


def embed_figure(caption: str, fig: Figure) -> EmbeddedFigure:
    """Render a Figure to an embedded PNG and free it (our Figures are pyplot-free: nothing else holds them)."""
    try:
        return EmbeddedFigure(caption, png_uri(figure_png(fig)))
    finally:
        fig.clear()


def png_uri(data: bytes) -> str:
    """A `data:image/png;base64,...` URI for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def model_figures(results_dir: Path, table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per run in table order: its model name and the PNGs evaluation wrote for it, read from disk and embedded."""
    shown = []
    for run, model in zip(table["run"], table["model"]):
        figs = [EmbeddedFigure(caption, png_uri(path.read_bytes()))
                for kind, caption in MODEL_FIGURES
                if (path := figure_path(results_dir, run, kind)).is_file()]
        if figs:
            shown.append({"model": model, "run": run, "figures": figs})
    return shown


# --- Tables ----------------------------------------------------------------------------------------


def html_table(frame: pd.DataFrame) -> HtmlTable:
    """A DataFrame as text cells, numbers printed as in comparison.md ("—" when missing or not finite)."""
    return HtmlTable(columns=[str(c) for c in frame.columns],
                     rows=[[cell_text(v) for v in row] for row in frame.itertuples(index=False)])


def cell_text(value: Any, digits: int = 3) -> str:
    """One table cell as text: floats to `digits` decimals, missing and non-finite numbers as "—"."""
    if value is None or value is pd.NA or value is pd.NaT:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}" if math.isfinite(value) else MISSING
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def leakage_display(leakage: pd.DataFrame) -> pd.DataFrame:
    """The leakage table with readable headers and a signed delta."""
    return pd.DataFrame({
        "architecture": leakage["architecture"],
        "accuracy, group split": leakage["accuracy_group_split"].map(cell_text),
        "accuracy, image split": leakage["accuracy_image_split"].map(cell_text),
        "inflation (image − group)": leakage["accuracy_delta"].map(
            lambda v: f"{v:+.3f}" if _finite(v) else MISSING),
    })


def mcnemar_display(matrix: pd.DataFrame) -> pd.DataFrame:
    """The McNemar p-value matrix with the run names as its first column, p to 3 significant digits."""
    shown = matrix.apply(lambda col: col.map(lambda v: f"{v:.3g}" if _finite(v) else MISSING))
    return shown.reset_index(names="run") if not shown.empty else pd.DataFrame(columns=["run"])


def runs_table(table: pd.DataFrame, runs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per results file, in table order: when it was evaluated, on which split, weights, test size.

    Rows the comparison computes itself (a soft-vote ensemble) have no results file and no row here.
    """
    rows = []
    for run, model in zip(table["run"], table["model"]):
        if run not in runs:
            continue
        r = runs[run]
        split = r.get("split") or {}
        rows.append({"model": model, "run": run, "evaluated (UTC)": r.get("created"),
                     "split": split.get("split_by"), "split SHA-256": (split.get("sha256") or "")[:12] or None,
                     "trained on this split": split.get("matches_training_split"),
                     "weights": r.get("weights") if run != BASELINE_RUN else "none (logistic regression)",
                     "test images": (r.get("metrics") or {}).get("n")})
    return pd.DataFrame(rows, columns=["model", "run", "evaluated (UTC)", "split", "split SHA-256",
                                       "trained on this split", "weights", "test images"])


def settings_tables(per_run: dict[str, dict[str, Any] | None], label: str = "setting",
                    unrecorded_differs: bool = True) -> tuple[HtmlTable, HtmlTable]:
    """(settings the runs agree on, settings that differ: one column per run); label heads the first column.

    Only runs that record a dict take part (the baseline has no training configuration). Nested dicts (the
    configuration's `extra`) are flattened to dotted names. A setting some of those runs do not record differs
    when unrecorded_differs (configurations: a setting only one run has is not shared), else those runs abstain
    (versions: the baseline uses no TensorFlow, which does not make the CNNs' TensorFlow differ).
    """
    flat = {run: _flatten(values) for run, values in per_run.items() if isinstance(values, dict) and values}
    keys = list(dict.fromkeys(k for values in flat.values() for k in values))
    shared, differ = [], []
    for key in keys:
        texts = {cell_text(values[key]) for values in flat.values() if key in values}
        recorded_by_all = all(key in values for values in flat.values())
        (shared if len(texts) == 1 and (recorded_by_all or not unrecorded_differs) else differ).append(key)
    shared_table = HtmlTable([label, "value"],
                             [[k, cell_text(next(v[k] for v in flat.values() if k in v))] for k in shared])
    differ_table = HtmlTable([label, *flat],
                             [[k, *(cell_text(values.get(k)) for values in flat.values())] for k in differ])
    return shared_table, differ_table


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _int_text(value: Any) -> str:
    return str(int(value)) if _finite(value) else cell_text(value)


def _environment() -> jinja2.Environment:
    # PackageLoader reads the template from the installed package, so a non-editable install finds it too.
    return jinja2.Environment(loader=jinja2.PackageLoader("bloodcell_lib", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
