"""The learning curve and the transfer-vs-scratch ablation: test macro-F1 against the number of training cells.

`run_all.py --train-fractions 0.1 0.25 0.5 1.0 [--ablation scratch]` trains each network on stratified shares of the
study split's training *cells* (split.subsample_training: whole duplicate groups, nested draws) — with the study's
weights, and from random initialisation with `--ablation scratch` — each point in its own folder
`<study>/learning_curve/<init>-frac<f>/`, always tested on the study's test subset. The study's own run is the
point at fraction 1.0 of its initialisation. This module gathers every point into `learning_curve.csv` and
`learning_curve.png` in the study's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bloodcell_lib.atomic import write_text
from bloodcell_lib.baseline import RUN_NAME as BASELINE_RUN
from bloodcell_lib.config import CURVE_FOLDER, curve_init
from bloodcell_lib.figures import plot_learning_curve
from bloodcell_lib.results import IMAGE_SPLIT_SUFFIX, read_results_folder, run_of
from bloodcell_lib.split import SPLIT_FILE, sidecar_path

CURVE_FILE = "learning_curve.csv"
CURVE_FIGURE = "learning_curve.png"
CURVE_COLUMNS = ["model", "architecture", "init", "weights", "train_fraction", "train_cells", "train_images",
                 "n_test", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "folder"]


def curve_folders(study_dir: str | Path) -> list[Path]:
    """The study's folder (its runs are the points at fraction 1.0) and every `learning_curve/*` folder."""
    root = Path(study_dir) / CURVE_FOLDER
    return [Path(study_dir), *(sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])]


def learning_curve_table(study_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per (network, initialisation, training fraction) tested on the study's test images; and the
    problems (points tested on other images are left out and named). Empty without learning-curve folders."""
    study_dir = Path(study_dir)
    folders = curve_folders(study_dir)
    if len(folders) == 1 or not (study_dir / SPLIT_FILE).is_file():
        return pd.DataFrame(columns=CURVE_COLUMNS), []
    study_test = _test_paths(_read_split(study_dir / SPLIT_FILE))
    rows, problems = [], []
    for folder in folders:
        split_file = folder / SPLIT_FILE
        if not split_file.is_file():
            continue
        split = _read_split(split_file)
        if _test_paths(split) != study_test:
            problems.append(f"{folder}: tested on other images than the study's test subset; left out")
            continue
        train = split[split["subset"] == "train"]
        fraction = _fraction(folder, study_dir)
        found, unreadable = read_results_folder(folder)
        problems += [f"{problem}; left out of the learning curve" for problem in unreadable]
        for results in found:
            run = run_of(results)
            if run == BASELINE_RUN or run.endswith(IMAGE_SPLIT_SUFFIX):
                continue
            m = results["metrics"]
            ci = m.get("macro_f1_ci") or [None, None]
            weights = results.get("weights")
            rows.append({"model": results.get("display_name", run), "architecture": results["architecture"],
                         "init": curve_init(None if weights is None or str(weights).startswith("none") else weights),
                         "weights": weights, "train_fraction": fraction, "train_cells": int(train["group"].nunique()),
                         "train_images": int(len(train)), "n_test": m.get("n"), "macro_f1": m.get("macro_f1"),
                         "macro_f1_ci_low": ci[0], "macro_f1_ci_high": ci[1], "accuracy": m.get("accuracy"),
                         "folder": str(folder.relative_to(study_dir))})
    table = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    if not table.empty:
        table = table.sort_values(["architecture", "init", "train_fraction"], kind="stable").reset_index(drop=True)
    return table, problems


def write_learning_curve(study_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Write `learning_curve.csv` and `learning_curve.png` into the study's folder when there are learning-curve
    points; return (the table, problems)."""
    table, problems = learning_curve_table(study_dir)
    if not table.empty:
        write_text(Path(study_dir) / CURVE_FILE, table.to_csv(index=False))
        plot_learning_curve(table, path=Path(study_dir) / CURVE_FIGURE)
    return table, problems


def display_learning_curve(table: pd.DataFrame) -> pd.DataFrame:
    """The table as a person reads it: macro-F1 with its interval as text."""
    if table.empty:
        return pd.DataFrame({"learning curve": ["none: no learning-curve runs in this output folder "
                                                "(run_all.py --train-fractions ... [--ablation scratch])"]})
    out = table[["model", "init", "train_fraction", "train_cells", "train_images", "n_test"]].copy()
    out["macro_f1 [95% CI]"] = [f"{r.macro_f1:.3f} [{r.macro_f1_ci_low:.3f}, {r.macro_f1_ci_high:.3f}]"
                                if pd.notna(r.macro_f1_ci_low) else f"{r.macro_f1:.3f}" for r in table.itertuples()]
    return out


def _read_split(split_file: Path) -> pd.DataFrame:
    return pd.read_csv(split_file, dtype=str, keep_default_na=False)


def _test_paths(split: pd.DataFrame) -> frozenset[str]:
    return frozenset(split.loc[split["subset"] == "test", "path"])


def _fraction(folder: Path, study_dir: Path) -> float:
    """The training fraction a point's split sidecar records (the study's own split: 1.0)."""
    if folder == study_dir:
        return 1.0
    try:
        recorded = json.loads(sidecar_path(folder / SPLIT_FILE).read_text(encoding="utf-8")).get("train_fraction")
    except (OSError, ValueError):
        recorded = None
    return float(recorded) if recorded is not None else 1.0
