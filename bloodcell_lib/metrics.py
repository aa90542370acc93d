"""Classification metrics with cluster-bootstrap intervals, calibration error and McNemar's test.

Plain functions over arrays in scikit-learn's `f(y_true, y_score)` style, no hidden state.
Labels are integer positions in CLASSES (class names are accepted too); `proba` is N×len(CLASSES).

Why a *cluster* bootstrap: the Kaggle set holds several copies of one cell (rotations, re-crops).
Copies of one cell are not independent evidence, so an interval that resamples single images is too
narrow. We resample whole duplicate groups (draw groups with replacement, take all their images).

Every bootstrap resample is represented as integer weights per image (how often its group was drawn),
so all metrics of all resamples come out of a few matrix products instead of 1000 sklearn calls.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from bloodcell_lib.classes import CLASSES, KEY_CLASS

# Scalar metrics that get a `<key>_ci` interval, in the order they appear in results files.
SCALAR_KEYS: tuple[str, ...] = (
    "accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "log_loss", "ece", "myeloblast_recall",
)
ECE_BINS = 15
# Keep the per-chunk weight matrix around a few tens of MB whatever the test-set size.
_MAX_CELLS_PER_CHUNK = 2_000_000


def compute_metrics(
    y_true: Sequence[Any],
    proba: np.ndarray,
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Return every evaluation metric of the study, each scalar with a group-bootstrap interval.

    y_true: labels (CLASSES positions or names); proba: N×5 class probabilities;
    groups: duplicate-group id per image (None → every image is its own group);
    n_boot: bootstrap resamples (0 → intervals are [nan, nan]); ci: interval coverage.
    Undefined values (e.g. ROC-AUC of a class absent from y_true) are NaN, never an exception.
    """
    y, p = _check_inputs(y_true, proba)
    codes = _group_codes(groups, len(y))
    pred = p.argmax(axis=1)
    labels = list(range(len(CLASSES)))
    key = CLASSES.index(KEY_CLASS)

    auc = _binary_aucs(y, p)
    present_auc = [v for v in auc if np.isfinite(v)]
    cm = confusion_matrix(y, pred, labels=labels)
    support = cm.sum(axis=1, keepdims=True)
    point = {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "roc_auc_macro": float(np.mean(present_auc)) if present_auc else float("nan"),
        "log_loss": _weighted_log_loss(np.ones((1, len(y))), y, p)[0],
        "ece": expected_calibration_error(y, p),
        "myeloblast_recall": float(cm[key, key] / support[key, 0]) if support[key, 0] else float("nan"),
    }
    intervals, valid = _bootstrap_all(y, p, codes, n_boot, seed, ci)

    results: dict[str, Any] = {}
    for name in SCALAR_KEYS:
        results[name] = float(point[name])
        results[f"{name}_ci"] = intervals[name]
    results["roc_auc_per_class"] = {c: float(v) for c, v in zip(CLASSES, auc)}
    results["per_class"] = classification_report(
        y, pred, labels=labels, target_names=list(CLASSES), output_dict=True, zero_division=0
    )
    results["confusion_matrix"] = cm.tolist()
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support > 0, cm / np.maximum(support, 1), 0.0)
    results["confusion_matrix_normalised"] = normalised.tolist()
    results["n"] = int(len(y))
    results["n_groups"] = int(codes.max() + 1)
    results["bootstrap"] = {
        "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci),
        "unit": "group" if groups is not None else "image",
        "method": "percentile, resampling whole duplicate groups",
        "valid_resamples": valid,
    }
    return results


def expected_calibration_error(y_true: Sequence[Any], proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Return the top-1 expected calibration error over `n_bins` equal-width confidence bins."""
    y, p = _check_inputs(y_true, proba)
    return float(_weighted_ece(np.ones((1, len(y))), y, p, n_bins)[0])


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Sequence[Any],
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> list[float]:
    """Return a [low, high] percentile interval of statistic(*arrays) under a group bootstrap.

    Resamples draw whole groups with replacement (the same draws as compute_metrics with the same
    seed); resamples where the statistic is NaN or raises ValueError (undefined) are skipped.
    """
    arrays_np = [np.asarray(a) for a in arrays]
    n = len(arrays_np[0])
    if any(len(a) != n for a in arrays_np):
        raise ValueError(f"bootstrap_ci: all arrays must have the same length, got {[len(a) for a in arrays_np]}.")
    statistic(*arrays_np)  # a statistic broken on the full data is a bug, not an undefined resample
    codes = _group_codes(groups, n)
    counts = _draw_group_counts(int(codes.max()) + 1, n_boot, seed)
    values = np.full(n_boot, np.nan)
    for b in range(n_boot):
        idx = np.repeat(np.arange(n), counts[b, codes])
        try:
            values[b] = statistic(*(a[idx] for a in arrays_np))
        except ValueError:
            pass
    return _percentile_interval(values, ci)


def mcnemar_table(y_true: Sequence[Any], pred_a: Sequence[Any], pred_b: Sequence[Any]) -> np.ndarray:
    """Return the 2×2 table [[both right, only A right], [only B right, both wrong]]."""
    y, a, b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"mcnemar_table: lengths differ (y_true {len(y)}, pred_a {len(a)}, pred_b {len(b)}).")
    right_a, right_b = a == y, b == y
    return np.array(
        [[np.sum(right_a & right_b), np.sum(right_a & ~right_b)],
         [np.sum(~right_a & right_b), np.sum(~right_a & ~right_b)]],
        dtype=int,
    )


def mcnemar_p(y_true: Sequence[Any], pred_a: Sequence[Any], pred_b: Sequence[Any]) -> float:
    """Return the two-sided exact McNemar p-value (binomial test on the discordant pairs).

    Always the exact test: scipy's binomtest is exact and fast for any count, so the chi-square
    approximation buys nothing. Assumes the paired images are independent (copies of one cell are not).
    """
    table = mcnemar_table(y_true, pred_a, pred_b)
    only_a, only_b = int(table[0, 1]), int(table[1, 0])
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


# --- inputs -------------------------------------------------------------------------------------


def _check_inputs(y_true: Sequence[Any], proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (int labels, float64 N×K probabilities) or raise ValueError saying what is wrong."""
    p = np.asarray(proba, dtype=np.float64)
    k = len(CLASSES)
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"proba must be N×{k} (one column per class in CLASSES order), got shape {p.shape}.")
    y = np.asarray(y_true)
    if y.dtype.kind in "USO":
        unknown = sorted({str(v) for v in y} - set(CLASSES))
        if unknown:
            raise ValueError(f"Unknown class label(s) {unknown}; expected names from {list(CLASSES)}.")
        y = np.array([CLASSES.index(str(v)) for v in y], dtype=int)
    y = y.astype(int).ravel()
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} labels but proba has {len(p)} rows.")
    if len(y) == 0:
        raise ValueError("No samples: y_true and proba are empty.")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"Labels must be class positions 0..{k - 1}, got values {sorted(set(y.tolist()))}.")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or infinite values; check the model's outputs.")
    return y, p


def _group_codes(groups: Sequence[Any] | None, n: int) -> np.ndarray:
    """Return a dense group index 0..G-1 per image; missing group ids become groups of one."""
    if groups is None:
        return np.arange(n)
    codes, _ = pd.factorize(pd.Series(list(groups)))
    if len(codes) != n:
        raise ValueError(f"groups has {len(codes)} entries but there are {n} samples.")
    missing = codes < 0
    if missing.any():
        codes = codes.copy()
        codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.sum())
    return codes.astype(np.int64)


# --- bootstrap ----------------------------------------------------------------------------------


def _draw_group_counts(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """Return n_boot × n_groups counts: how often each group is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)


def _percentile_interval(values: np.ndarray, ci: float) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def _bootstrap_all(
    y: np.ndarray, p: np.ndarray, codes: np.ndarray, n_boot: int, seed: int, ci: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Return ({key: [low, high]}, {key: number of resamples where it was defined})."""
    if n_boot <= 0:
        return {k: [float("nan"), float("nan")] for k in SCALAR_KEYS}, {k: 0 for k in SCALAR_KEYS}
    counts = _draw_group_counts(int(codes.max()) + 1, n_boot, seed)
    chunk = max(1, _MAX_CELLS_PER_CHUNK // len(y))
    parts = [_weighted_metrics(counts[i:i + chunk][:, codes].astype(np.float64), y, p)
             for i in range(0, n_boot, chunk)]
    values = {k: np.concatenate([part[k] for part in parts]) for k in SCALAR_KEYS}
    intervals = {k: _percentile_interval(v, ci) for k, v in values.items()}
    valid = {k: int(np.isfinite(v).sum()) for k, v in values.items()}
    return intervals, valid


def _weighted_metrics(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Return each scalar metric for every row of the B×N weight matrix (weights = copies of an image).

    With all weights 1 these equal scikit-learn's accuracy, f1 (macro over classes present in y_true
    or y_pred, as sklearn's default) and roc_auc; tests check that.
    """
    k = len(CLASSES)
    pred = p.argmax(axis=1)
    cells = np.zeros((len(y), k * k))
    cells[np.arange(len(y)), y * k + pred] = 1.0
    cm = (w @ cells).reshape(-1, k, k)
    total = w.sum(axis=1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    key = CLASSES.index(KEY_CLASS)

    auc = np.stack([_weighted_auc(w, y == c, p[:, c]) for c in range(k)], axis=1)
    auc_defined = np.isfinite(auc)
    n_auc = auc_defined.sum(axis=1)
    auc_sum = np.where(auc_defined, auc, 0.0).sum(axis=1)

    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": tp.sum(axis=1) / total,
            "macro_f1": (f1 * present).sum(axis=1) / present.sum(axis=1),
            "weighted_f1": (f1 * support).sum(axis=1) / support.sum(axis=1),
            "roc_auc_macro": np.where(n_auc > 0, auc_sum / np.maximum(n_auc, 1), np.nan),
            "log_loss": _weighted_log_loss(w, y, p),
            "ece": _weighted_ece(w, y, p, ECE_BINS),
            "myeloblast_recall": np.where(support[:, key] > 0, tp[:, key] / np.maximum(support[:, key], 1), np.nan),
        }


def _weighted_log_loss(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Return weighted mean −log p(true class) per row of w; clipped like sklearn's log_loss (float64 eps)."""
    eps = np.finfo(np.float64).eps
    nll = -np.log(np.clip(p[np.arange(len(y)), y], eps, 1 - eps))
    return (w @ nll) / w.sum(axis=1)


def _weighted_ece(w: np.ndarray, y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    """Return weighted top-1 ECE per row of w; bins are (lo, hi] of width 1/n_bins (0 falls in the first)."""
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.digitize(confidence, edges[1:-1], right=True)
    gap = np.zeros((len(y), n_bins))
    gap[np.arange(len(y)), bins] = correct - confidence
    # |Σ_bin w·(correct − conf)| / Σ w  ==  Σ_bin (bin share) · |accuracy_bin − confidence_bin|
    return np.abs(w @ gap).sum(axis=1) / w.sum(axis=1)


def _weighted_auc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Return the one-vs-rest ROC-AUC per row of w (Mann-Whitney with weights, ties count ½); NaN if undefined."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    pos = positive[order]
    w_sorted = w[:, order]
    w_neg = w_sorted * ~pos
    cum = np.zeros((w.shape[0], len(s) + 1))
    np.cumsum(w_neg, axis=1, out=cum[:, 1:])
    pos_at = np.flatnonzero(pos)
    lo = np.searchsorted(s, s[pos_at], side="left")
    hi = np.searchsorted(s, s[pos_at], side="right")
    below = cum[:, lo]
    tied = cum[:, hi] - below
    w_pos = w_sorted[:, pos_at]
    numerator = (w_pos * (below + 0.5 * tied)).sum(axis=1)
    denominator = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _binary_aucs(y: np.ndarray, p: np.ndarray) -> list[float]:
    """Return sklearn's one-vs-rest ROC-AUC per class; NaN for a class absent from (or alone in) y."""
    values = []
    for c in range(len(CLASSES)):
        positive = y == c
        if positive.all() or not positive.any():
            values.append(float("nan"))
        else:
            values.append(float(roc_auc_score(positive, p[:, c])))
    return values
