"""The cross-model comparison: one table from every `*_results.json` in a folder, McNemar tests, leakage delta."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bloodcell_lib.atomic import write_text

BASELINE_RUN = "shortcut_baseline"
INTERVAL_KEYS = ("accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "myeloblast_recall", "log_loss", "ece")


@dataclass
class Comparison:
    """The comparison table and what goes with it; every part is plain data a person can open."""

    table: pd.DataFrame
    mcnemar: pd.DataFrame
    leakage: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def best_and_runner_up(self) -> tuple[pd.Series | None, pd.Series | None]:
        """The CNN rows with the highest and second-highest macro-F1 (None when absent)."""
        t = self.table
        cnns = t[(t["run"] != BASELINE_RUN) & (t["split_by"] != "image")].sort_values("macro_f1", ascending=False)
        rows = [cnns.iloc[i] if len(cnns) > i else None for i in (0, 1)]
        return rows[0], rows[1]

    def conclusion(self) -> str:
        """A few sentences written from the numbers: the best model and whether its lead is real."""
        best, second = self.best_and_runner_up()
        if best is None:
            return "No trained model was found, so there is nothing to conclude yet."
        text = [f"Best by macro-F1: {best['model']} ({_fmt_ci(best, 'macro_f1')})."]
        if second is not None:
            overlap = _overlaps(best.get("macro_f1_ci"), second.get("macro_f1_ci"))
            text.append(
                f"Runner-up: {second['model']} ({_fmt_ci(second, 'macro_f1')}); the intervals "
                + ("overlap, so this test set does not separate the two." if overlap
                   else "do not overlap, so the lead is larger than the sampling noise of this test set.")
            )
            p = _lookup(self.mcnemar, best["run"], second["run"])
            if p is not None and np.isfinite(p):
                text.append(f"McNemar p = {p:.3g} for the same test images.")
        baseline = self.table[self.table["run"] == BASELINE_RUN]
        if not baseline.empty:
            b = baseline.iloc[0]
            text.append(f"The colour-only shortcut baseline reaches accuracy {_fmt_ci(b, 'accuracy')}; "
                        "a CNN is only interesting by the margin it adds above that.")
        if not self.leakage.empty:
            worst = self.leakage.sort_values("accuracy_delta", ascending=False).iloc[0]
            text.append(f"An image-level split inflates {worst['architecture']}'s accuracy by "
                        f"{worst['accuracy_delta']:+.3f} (leakage through near-duplicate copies).")
        if self.missing:
            text.append("Not in this comparison: " + ", ".join(self.missing) + ".")
        return " ".join(text)

    def to_markdown(self) -> str:
        """The table, the McNemar matrix, the leakage table and the conclusion as Markdown."""
        parts = ["## Models", markdown_table(display_table(self.table))]
        if not self.mcnemar.empty:
            parts += ["## McNemar p-values (same test images)", markdown_table(self.mcnemar.reset_index())]
        if not self.leakage.empty:
            parts += ["## Leakage delta (image-level split minus group split)", markdown_table(self.leakage)]
        if self.missing or self.problems:
            parts += ["## Missing or partial", "\n".join(f"- {m}" for m in [*self.missing, *self.problems])]
        parts += ["## Conclusion", self.conclusion()]
        return "\n\n".join(parts) + "\n"

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """Write comparison.csv (full table), comparison.md and mcnemar.csv; return the paths."""
        out = Path(output_dir)
        paths = {"csv": out / "comparison.csv", "markdown": out / "comparison.md", "mcnemar": out / "mcnemar.csv"}
        write_text(paths["csv"], self.table.to_csv(index=False))
        write_text(paths["markdown"], self.to_markdown())
        write_text(paths["mcnemar"], self.mcnemar.to_csv())
        return paths


def compare_results(results_dir: str | Path, expected: list[str] | None = None) -> Comparison:
    """Build the comparison from a folder; missing or broken files are listed, never fatal."""
    from bloodcell_lib.registry import ARCHITECTURES

    results_dir = Path(results_dir)
    expected = list(ARCHITECTURES) if expected is None else expected
    rows, problems, runs = [], [], {}
    for path in sorted(results_dir.glob("*_results.json")):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
            rows.append(table_row(results))
            runs[results.get("run", results["architecture"])] = results
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name}: unreadable or incomplete ({exc.__class__.__name__}: {exc})")
    order = {key: i for i, key in enumerate(ARCHITECTURES)}
    # Registry order, image-split runs after their group-split twins, the baseline last.
    rows.sort(key=lambda r: (r["run"] == BASELINE_RUN, order.get(r["architecture"], len(order)), r["run"]))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    present = {r["architecture"] for r in runs.values()}
    missing = [f"{key} (no results file)" for key in expected if key not in present]
    group_runs = {name: r for name, r in runs.items() if r.get("split", {}).get("split_by", "group") != "image"}
    mcnemar, mc_problems = mcnemar_matrix(results_dir, group_runs)
    return Comparison(table=table, mcnemar=mcnemar, leakage=leakage_table(runs), missing=missing,
                      problems=problems + mc_problems)


TABLE_COLUMNS = [
    "model", "run", "architecture", "split_by", "weights", "image_size", "n_test",
    *[c for k in INTERVAL_KEYS for c in (k, f"{k}_ci")],
    "gradcam_focus", "gradcam_deletion_auc", "gradcam_sanity_spearman",
    "params_total", "params_trainable", "flops_per_image", "keras_file_mb", "training_seconds", "epochs",
    "latency_ms", "throughput_batch32", "device",
]


def table_row(results: dict[str, Any]) -> dict[str, Any]:
    """One table row from a results dict (a model's or the baseline's)."""
    m = results["metrics"]
    cost = results.get("cost") or {}
    cam = (results.get("explainability") or {}).get("gradcam") or {}
    split_by = (results.get("split") or {}).get("split_by", "group")
    name = results.get("display_name", results["architecture"])
    row: dict[str, Any] = {
        "model": f"{name} (image-level split, leaks)" if split_by == "image" else name,
        "run": results.get("run", results["architecture"]),
        "architecture": results["architecture"],
        "split_by": split_by,
        "weights": results.get("weights"),
        "image_size": results.get("image_size"),
        "n_test": m.get("n"),
        "gradcam_focus": cam.get("focus_mean"),
        "gradcam_deletion_auc": cam.get("deletion_auc_mean"),
        "gradcam_sanity_spearman": cam.get("sanity_spearman_mean"),
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
    for key in INTERVAL_KEYS:
        row[key] = m.get(key)
        row[f"{key}_ci"] = m.get(f"{key}_ci")
    return row


def mcnemar_matrix(results_dir: Path, runs: dict[str, dict]) -> tuple[pd.DataFrame, list[str]]:
    """Pairwise McNemar p-values over the test images two runs share."""
    from bloodcell_lib.evaluation import read_predictions

    preds, problems = {}, []
    for name, results in runs.items():
        path = results_dir / results.get("predictions_file", f"{name}_predictions.csv")
        try:
            _, proba, frame = read_predictions(path)
            preds[name] = frame.assign(pred=proba.argmax(axis=1)).set_index("path")
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{path.name}: predictions unreadable, left out of McNemar ({exc.__class__.__name__})")
    names = sorted(preds)
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for a, b in itertools.combinations(names, 2):
        shared = preds[a].index.intersection(preds[b].index)
        if len(shared) == 0:
            problems.append(f"{a} and {b} share no test image; were they evaluated on the same split?")
            continue
        p = _mcnemar_on(preds[a].loc[shared], preds[b].loc[shared])
        matrix.loc[a, b] = matrix.loc[b, a] = p
    for n in names:
        matrix.loc[n, n] = 1.0
    return matrix, problems


def _mcnemar_on(a: pd.DataFrame, b: pd.DataFrame) -> float:
    from bloodcell_lib.classes import CLASSES
    from bloodcell_lib.metrics import mcnemar_p

    y = a["true_label"].map(CLASSES.index).to_numpy()
    return float(mcnemar_p(y, a["pred"].to_numpy(), b["pred"].to_numpy()))


def leakage_table(runs: dict[str, dict]) -> pd.DataFrame:
    """For each architecture run on both kinds of split: accuracy on image split minus on group split."""
    rows = []
    for name, r in runs.items():
        if r.get("split", {}).get("split_by") != "image":
            continue
        group = next((g for g in runs.values() if g["architecture"] == r["architecture"]
                      and g.get("split", {}).get("split_by", "group") == "group"), None)
        if group is None:
            continue
        a_img, a_grp = r["metrics"]["accuracy"], group["metrics"]["accuracy"]
        rows.append({"architecture": r["architecture"], "accuracy_group_split": a_grp,
                     "accuracy_image_split": a_img, "accuracy_delta": a_img - a_grp})
    return pd.DataFrame(rows, columns=["architecture", "accuracy_group_split", "accuracy_image_split", "accuracy_delta"])


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A compact, human-readable version of the table: values with their intervals as text."""
    out = pd.DataFrame({"model": table["model"], "weights": table["weights"], "size": table["image_size"]})
    for key in ("accuracy", "macro_f1", "roc_auc_macro", "myeloblast_recall", "ece"):
        out[key] = [_fmt_ci(row, key) for _, row in table.iterrows()]
    out["focus"] = table["gradcam_focus"].map(_fmt_num)
    out["sanity ρ"] = table["gradcam_sanity_spearman"].map(_fmt_num)
    out["params (M)"] = table["params_total"].map(lambda v: _fmt_num(v / 1e6 if _is_num(v) else None, 2))
    out["GFLOPs"] = table["flops_per_image"].map(lambda v: _fmt_num(v / 1e9 if _is_num(v) else None, 2))
    out["latency ms"] = table["latency_ms"].map(lambda v: _fmt_num(v, 1))
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a DataFrame as a GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return _fmt_num(v)
    return "" if v is None else str(v).replace("|", "/")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and np.isfinite(v)


def _fmt_num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _is_num(v) else "—"


def _fmt_ci(row: Any, key: str) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci")
    if not _is_num(value):
        return "—"
    if ci is not None and len(ci) == 2 and all(_is_num(c) for c in ci):
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def _overlaps(a: Any, b: Any) -> bool:
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def _lookup(matrix: pd.DataFrame, a: str, b: str) -> float | None:
    try:
        return float(matrix.loc[a, b])
    except KeyError:
        return None
