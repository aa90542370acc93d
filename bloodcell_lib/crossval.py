"""Grouped K-fold cross-validation: out-of-fold predictions and results from the folds' own output folders.

`run_all.py --folds K [--seeds S ...]` (or a notebook with FOLDS and FOLD) trains every model once per fold and seed,
each run in its own folder `<study>/cv/seed<S>-fold<k>of<K>/` on split.make_split's fold k (its test subset is fold
k's cells; copies of one cell stay in one fold). This module turns those folders into one cross-validated study in
`<study>/cv/`, shaped like a hold-out study so compare.py reads it unchanged:

- `<run>_oof_predictions.csv`: every image's out-of-fold prediction, once per seed (columns fold, seed added);
- `<run>_results.json`: metrics of the out-of-fold predictions with group-bootstrap intervals (all seeds' rows, whole
  cells resampled with every copy and every seed of them), the per-fold scores with their mean and sd (`cv`),
  calibration (each fold's own temperature, fitted on its validation cells, applied to its test cells), TTA, the
  background shortcut (pooled over folds), Grad-CAM numbers (every fold's explanation set stacked, intervals over
  whole cells) and cost (means over folds).

The colour-only baseline is trained in every fold folder first (baseline.ensure_shortcut_baseline), so it gets
out-of-fold predictions too.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bloodcell_lib.atomic import write_text
from bloodcell_lib.baseline import RUN_NAME as BASELINE_RUN
from bloodcell_lib.baseline import ensure_shortcut_baseline
from bloodcell_lib.calibration import apply_temperature, calibration_change
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import CV_FOLDER
from bloodcell_lib.errors import BloodcellError
from bloodcell_lib.explain import METHODS, SCORE_KEYS, summarise_explanations
from bloodcell_lib.metrics import compute_metrics, scores_against
from bloodcell_lib.results import (IMAGE_SPLIT_SUFFIX, PROB_COLUMNS, TTA_VARIANT, library_versions,
                                   predictions_path, read_results_folder, run_of, utc_timestamp, write_results)
from bloodcell_lib.shortcut import chance_accuracy, reads_background
from bloodcell_lib.split import SPLIT_FILE, split_sha256

OOF_VARIANT = "oof"
FOLD_PATTERN = re.compile(r"^seed(-?\d+)-fold(\d+)of(\d+)$")
# The per-fold scores the results' `cv` block lists, with their mean and sd over folds and seeds.
CV_KEYS = ("macro_f1", "accuracy", "myeloblast_recall")
TTA_KEYS = ("macro_f1", "accuracy")


def cv_path(study_dir: str | Path) -> Path:
    """`<study>/cv`: the folds' folders and the cross-validated results."""
    return Path(study_dir) / CV_FOLDER


def fold_folders(study_dir: str | Path) -> dict[tuple[int, int, int], Path]:
    """(seed, fold, folds) → the fold's folder, for every `cv/seed<S>-fold<k>of<K>` folder, sorted."""
    root = cv_path(study_dir)
    found = {}
    if root.is_dir():
        for path in sorted(root.iterdir()):
            match = FOLD_PATTERN.match(path.name)
            if match and path.is_dir():
                seed, fold, folds = (int(g) for g in match.groups())
                found[(seed, fold, folds)] = path
    return dict(sorted(found.items()))


def collect_cross_validation(study_dir: str | Path) -> list[str]:
    """Write the cross-validated results of every run found in the fold folders into `<study>/cv/`; return the
    problems found (missing folds, unreadable files), never raising for one bad fold. No fold folders: []."""
    folders = fold_folders(study_dir)
    if not folders:
        return []
    problems = []
    ks = sorted({folds for _, _, folds in folders})
    if len(ks) > 1:
        problems.append(f"{cv_path(study_dir)} holds folds of different K ({', '.join(map(str, ks))}); each run's "
                        "out-of-fold predictions use the folds of the K it has most of")
    for (seed, fold, folds), folder in folders.items():
        if (folder / SPLIT_FILE).is_file():
            try:
                ensure_shortcut_baseline(folder / SPLIT_FILE, folder)
            except (BloodcellError, OSError, ValueError) as exc:
                problems.append(f"shortcut baseline of seed {seed} fold {fold}/{folds}: {exc}")
    runs: dict[str, dict[tuple[int, int, int], dict[str, Any]]] = {}
    for key, folder in folders.items():
        found, unreadable = read_results_folder(folder)
        problems += unreadable
        for results in found:
            name = run_of(results)
            if not name.endswith(IMAGE_SPLIT_SUFFIX):
                runs.setdefault(name, {})[key] = {**results, "_folder": str(folder)}
    for name, per_fold in runs.items():
        try:
            results, run_problems = cross_validated_results(name, per_fold, folders)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{name}: its folds could not be combined ({exc.__class__.__name__}: {exc})")
            continue
        write_results(cv_path(study_dir), results)
        problems += run_problems
    return problems


def cross_validated_results(name: str, per_fold: dict[tuple[int, int, int], dict[str, Any]],
                            folders: dict[tuple[int, int, int], Path]) -> tuple[dict[str, Any], list[str]]:
    """One run's cross-validated results dict (and problems), its out-of-fold predictions written beside it."""
    k = max({key[2] for key in per_fold}, key=lambda K: sum(key[2] == K for key in per_fold))
    per_fold = {key: r for key, r in sorted(per_fold.items()) if key[2] == k}
    seeds = sorted({seed for seed, _, K in folders if K == k})
    expected = [(seed, fold, k) for seed in seeds for fold in range(1, k + 1)]
    absent = [key for key in expected if key not in per_fold]
    problems = [f"{name}: no results for seed {seed} fold {fold} of {k}, so its out-of-fold predictions do not "
                "cover every image" for seed, fold, _ in absent]
    first = next(iter(per_fold.values()))
    boot = first["metrics"]["bootstrap"]
    n_boot, boot_seed = int(boot["n_boot"]), int(boot["seed"])

    frames, tta_frames, calibrated, rows = [], [], [], []
    for (seed, fold, _), results in per_fold.items():
        folder = Path(results["_folder"])
        frame = pd.read_csv(folder / results.get("predictions_file", predictions_path(folder, name).name))
        frame = frame.assign(fold=fold, seed=seed)
        frames.append(frame)
        m = results["metrics"]
        rows.append({"seed": seed, "fold": fold, "n_test": m.get("n"), **{key: m.get(key) for key in CV_KEYS}})
        temperature = (results.get("calibration") or {}).get("temperature")
        calibrated.append(apply_temperature(frame[PROB_COLUMNS].to_numpy(dtype=np.float64), temperature)
                          if temperature is not None else None)
        tta = results.get("tta") or {}
        tta_file = folder / tta.get("predictions_file", predictions_path(folder, name, TTA_VARIANT).name)
        tta_frames.append(pd.read_csv(tta_file) if tta.get("enabled") and tta_file.is_file() else None)
    oof = pd.concat(frames, ignore_index=True)
    out = cv_path(Path(first["_folder"]).parent.parent)
    oof_file = predictions_path(out, name, OOF_VARIANT)
    write_text(oof_file, oof.to_csv(index=False))

    y = oof["true_label"].map(CLASSES.index).to_numpy()
    proba = oof[PROB_COLUMNS].to_numpy(dtype=np.float64)
    groups = oof["group"].astype(str).to_numpy()
    metrics = compute_metrics(y, proba, groups=groups, n_boot=n_boot, seed=boot_seed)
    per_fold_table = pd.DataFrame(rows)
    cv = {"folds": k, "seeds": seeds, "runs": len(per_fold), "missing": [list(key[:2]) for key in absent],
          "per_fold": rows, "n_oof_rows": int(len(oof)), "n_images": int(oof["path"].nunique()),
          **{f"{key}_mean": _stat(per_fold_table, key, np.mean) for key in CV_KEYS},
          **{f"{key}_sd": _stat(per_fold_table, key, _sd) for key in CV_KEYS},
          "method": "out-of-fold predictions of every fold and seed stacked; intervals resample whole duplicate "
                    "groups (all copies and all seeds of a cell together); mean and sd over the fold runs"}
    fold_shas = sorted(split_sha256(folder / SPLIT_FILE) for key, folder in folders.items()
                       if key in per_fold and (folder / SPLIT_FILE).is_file())
    results = {
        "architecture": first["architecture"],
        "display_name": first.get("display_name", first["architecture"]),
        "run": name,
        "weights": first.get("weights"),
        "image_size": first.get("image_size"),
        "recipe": first.get("recipe"),
        "split": {"split_by": "group", "cross_validation": True, "folds": k, "seeds": seeds,
                  # one SHA-256 for the set of fold splits, so runs over the same folds compare in compare.py
                  "sha256": hashlib.sha256("\n".join(fold_shas).encode()).hexdigest(),
                  "fold_split_sha256": fold_shas,
                  "matches_training_split": _all_true((r.get("split") or {}).get("matches_training_split")
                                                      for r in per_fold.values())},
        "leakage_audit": _summed_audit(per_fold.values()),
        "metrics": metrics,
        "cv": cv,
        "calibration": _calibration(y, proba, calibrated, groups, per_fold, n_boot, boot_seed),
        "tta": _tta(oof, tta_frames, groups, n_boot, boot_seed),
        "shortcut_test": _shortcut(per_fold.values(), y),
        "explainability": _explanations(per_fold, n_boot, boot_seed),
        "cost": _mean_numbers([r.get("cost") or {} for r in per_fold.values()]),
        "predictions_file": oof_file.name,
        "output_dir": str(out),
        "versions": library_versions(),
        "created": utc_timestamp(),
    }
    if name == BASELINE_RUN:
        results = {k_: v for k_, v in results.items() if k_ not in ("calibration", "tta", "shortcut_test")}
    return results, problems


def cv_table(results_dir: str | Path) -> pd.DataFrame:
    """Per run: folds, seeds, and mean ± sd over the fold runs of CV_KEYS (from the cross-validated results)."""
    rows = []
    for results in read_results_folder(results_dir)[0]:  # compare_results names an unreadable file
        cv = results.get("cv")
        if not cv:
            continue
        rows.append({"model": results.get("display_name", run_of(results)), "run": run_of(results),
                     "folds": cv["folds"], "seeds": ", ".join(map(str, cv["seeds"])), "fold runs": cv["runs"],
                     **{key: f"{cv[f'{key}_mean']:.3f} ± {cv[f'{key}_sd']:.3f}"
                        if cv.get(f"{key}_mean") is not None else "—" for key in CV_KEYS}})
    return pd.DataFrame(rows)


def _calibration(y: np.ndarray, proba: np.ndarray, calibrated: list[np.ndarray | None], groups: np.ndarray,
                 per_fold: dict, n_boot: int, seed: int) -> dict[str, Any]:
    if not calibrated or any(c is None for c in calibrated):
        return {"skipped": "a fold has no fitted temperature (no validation images, or not recorded)"}
    temperatures = [float((r.get("calibration") or {})["temperature"]) for r in per_fold.values()]
    return {"temperature": float(np.exp(np.mean(np.log(temperatures)))),  # geometric mean: T scales logits
            "temperatures": temperatures,
            "temperature_at_bound": any(bool((r.get("calibration") or {}).get("temperature_at_bound"))
                                        for r in per_fold.values()),
            **calibration_change(y, proba, np.concatenate(calibrated), groups=groups, n_boot=n_boot, seed=seed),
            "method": "each fold's temperature (fitted on its validation cells by NLL) applied to its test cells; "
                      "out-of-fold scores before and after, paired group bootstrap; temperature: geometric mean"}


def _tta(oof: pd.DataFrame, tta_frames: list[pd.DataFrame | None], groups: np.ndarray, n_boot: int,
         seed: int) -> dict[str, Any]:
    if not tta_frames or any(f is None for f in tta_frames):
        return {"enabled": False, "why": "TTA was off (or its predictions are missing) in at least one fold"}
    tta = pd.concat(tta_frames, ignore_index=True)
    if not (tta["path"].to_numpy() == oof["path"].to_numpy()).all():
        return {"enabled": False, "why": "the folds' TTA predictions are not row for row their plain predictions"}
    y = oof["true_label"].map(CLASSES.index).to_numpy()
    return {"enabled": True, **scores_against(y, tta[PROB_COLUMNS].to_numpy(dtype=np.float64),
                                              oof[PROB_COLUMNS].to_numpy(dtype=np.float64), groups=groups,
                                              keys=TTA_KEYS, n_boot=n_boot, seed=seed),
            "method": "out-of-fold TTA predictions against the plain ones, paired group bootstrap"}


def _shortcut(per_fold: Any, y: np.ndarray) -> dict[str, Any]:
    blocks = [r.get("shortcut_test") or {} for r in per_fold]
    if not blocks or any(not b.get("background_only") for b in blocks):
        return {}
    n = np.array([b.get("n") or 0 for b in blocks], dtype=np.float64)
    pooled = {}
    for variant in ("original", "background_only", "cell_only"):
        acc = np.array([b[variant]["accuracy"] for b in blocks], dtype=np.float64)
        pooled[variant] = {"accuracy": float((acc * n).sum() / n.sum()), "accuracy_ci": None,
                           "fold_accuracy": acc.tolist()}
    chance = chance_accuracy(y)
    return {**pooled, "chance": chance, "margin": blocks[0].get("margin"),
            "flagged": reads_background(pooled["background_only"], chance, blocks[0].get("margin")),
            "n": int(n.sum()),
            "method": "accuracies pooled over folds (weighted by test images; no interval); flagged when the "
                      "pooled background-only accuracy exceeds chance + margin"}


def _explanations(per_fold: dict, n_boot: int, seed: int) -> dict[str, Any]:
    """Grad-CAM numbers over every fold's explanation set (each fold explains its own test cells): the folds'
    per-image scores stacked, summarised per method with intervals that resample whole duplicate groups."""
    frames = []
    for results in per_fold.values():
        block = results.get("explainability") or {}
        if not block.get("scores_file"):
            return {}
        frames.append(pd.read_csv(Path(results["_folder"]) / block["scores_file"]))
    scores = pd.concat(frames, ignore_index=True)
    out: dict[str, Any] = {"n_images": int(len(scores)), "scores_from": "every fold's explanation set, stacked"}
    for method in METHODS:
        columns = {f"{method}_{key}": key for key in SCORE_KEYS}
        if set(columns) <= set(scores.columns):
            out[method] = summarise_explanations(scores[list(columns)].rename(columns=columns),
                                                 groups=scores["group"].astype(str), n_boot=n_boot, seed=seed)
    return out


def _summed_audit(per_fold: Any) -> dict[str, Any] | None:
    audits = [r.get("leakage_audit") for r in per_fold]
    if not audits or any(not a for a in audits):
        return None
    return {"n_test": int(sum(a["n_test"] for a in audits)),
            "test_images_with_match_in_train": int(sum(a["test_images_with_match_in_train"] for a in audits))}


def _mean_numbers(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over blocks of every numeric value all of them have; text the same in all of them kept; the rest
    (lists, differing text) left out."""
    if not blocks:
        return {}
    out: dict[str, Any] = {}
    for key, value in blocks[0].items():
        values = [b.get(key) for b in blocks]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.mean(values))
        elif isinstance(value, str) and all(v == value for v in values):
            out[key] = value
    return out


def _all_true(values: Any) -> bool | None:
    values = list(values)
    if any(v is False for v in values):
        return False
    return True if values and all(v is True for v in values) else None


def _stat(table: pd.DataFrame, key: str, fn: Any) -> float | None:
    values = pd.to_numeric(table.get(key), errors="coerce").dropna() if key in table else pd.Series(dtype=float)
    return float(fn(values.to_numpy())) if len(values) else None


def _sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
