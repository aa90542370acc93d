"""Classification metrics with cluster-bootstrap intervals, calibration scores and paired model comparison.

Plain functions over arrays in scikit-learn's `f(y_true, y_score)` style, no hidden state.
Labels are integer positions in CLASSES (class names are accepted too); `proba` is N×len(CLASSES).

Why a *cluster* bootstrap: the Kaggle set holds several copies of one cell (rotations, re-crops).
Copies of one cell are not independent evidence, so an interval that resamples single images is too
narrow. We resample whole duplicate groups (draw groups with replacement, take all their images).

Every bootstrap resample is represented as integer weights per image (how often its group was drawn),
so all metrics of all resamples come out of a few matrix products instead of 1000 sklearn calls.
Comparing two models reuses that: the same group draws weight both models' predictions (paired), and a
weight row over the two models' predictions side by side swaps them within whole groups (the test).
Per-class precision, recall, F1 and specificity come off the same weighted confusion matrices, from the same
resamples. The calibration scores (top-1 and classwise ECE, Brier, log loss) have weighted kernels too, so
paired_comparison can test a model before and after temperature scaling (calibration.py).
McNemar's per-image test is kept for reference only; it treats copies of a cell as independent.
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

# The study's metrics: the scalars that get a `<key>_ci` interval, in the order results files, the comparison
# table and the notebooks show them. Every reader takes the list from here.
SCALAR_KEYS: tuple[str, ...] = (
    "accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "myeloblast_recall", "log_loss", "ece",
)
# The calibration scores (lower is better); classwise_ece and brier have no interval in results files, but
# paired_comparison tests every one (calibration.calibration_report: before against after temperature scaling).
CALIBRATION_KEYS: tuple[str, ...] = ("ece", "classwise_ece", "brier", "log_loss")
PAIRED_KEYS: tuple[str, ...] = tuple(dict.fromkeys((*SCALAR_KEYS, *CALIBRATION_KEYS)))
# Per-class rates with an interval in compute_metrics' `per_class_ci` (one-vs-rest for specificity).
PER_CLASS_KEYS: tuple[str, ...] = ("precision", "recall", "f1", "specificity")
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
    Besides the SCALAR_KEYS and their `_ci`, `per_class_ci` and `key_class` hold per-class rates with
    intervals from the same resamples (see per_class_metrics).
    """
    y, p = check_inputs(y_true, proba)
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
    # One set of resamples for the scalar and the per-class intervals: they agree on which cells each one holds.
    boot = _bootstrap_values(y, codes, n_boot, seed,
                             lambda w: {**_weighted_metrics(w, y, p), **_weighted_per_class(w, y, p)})

    results: dict[str, Any] = {}
    for name in SCALAR_KEYS:
        results[name] = float(point[name])
        results[f"{name}_ci"] = _percentile_interval(boot.get(name, np.empty(0)), ci)
    results["roc_auc_per_class"] = {c: float(v) for c, v in zip(CLASSES, auc)}
    results["per_class"] = classification_report(
        y, pred, labels=labels, target_names=list(CLASSES), output_dict=True, zero_division=0
    )
    results.update(_per_class_blocks(y, p, boot, ci))
    results["confusion_matrix"] = cm.tolist()
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support > 0, cm / np.maximum(support, 1), 0.0)
    results["confusion_matrix_normalised"] = normalised.tolist()
    results["n"] = int(len(y))
    results["n_groups"] = int(codes.max() + 1)
    results["bootstrap"] = _bootstrap_record(n_boot, seed, ci, groups, boot, SCALAR_KEYS)
    return results


def per_class_metrics(
    y_true: Sequence[Any],
    proba: np.ndarray,
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Return precision, recall, F1 and specificity of every class, each with a group-bootstrap interval.

    Returns `per_class_ci` ({class: {precision, precision_ci, recall, ..., support, valid_resamples}}),
    `key_class` (the myeloblast's sensitivity and specificity with intervals) and `bootstrap`: exactly the
    blocks compute_metrics returns for the same arguments, from the same resamples (so the myeloblast's
    sensitivity interval is compute_metrics' myeloblast_recall_ci). A rate whose denominator is empty
    (precision of a class never predicted, recall of a class absent) is NaN, and so is a resample where it
    is; intervals use the resamples where it is defined. (scikit-learn's report in `per_class` writes 0.)
    """
    y, p = check_inputs(y_true, proba)
    codes = _group_codes(groups, len(y))
    boot = _bootstrap_values(y, codes, n_boot, seed, lambda w: _weighted_per_class(w, y, p))
    return {**_per_class_blocks(y, p, boot, ci), "bootstrap": _bootstrap_record(n_boot, seed, ci, groups, boot, ())}


def expected_calibration_error(y_true: Sequence[Any], proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Return the top-1 expected calibration error over `n_bins` equal-width confidence bins."""
    y, p = check_inputs(y_true, proba)
    return float(_weighted_ece(np.ones((1, len(y))), y, p, n_bins)[0])


def classwise_ece(y_true: Sequence[Any], proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Return the classwise ECE (Kull et al. 2019): the mean over classes of each class's probability ECE.

    For class k, p[:, k] is binned into `n_bins` equal-width bins and each bin's |share of class k −
    mean p[:, k]| is weighted by the bin's share of images; unlike the top-1 ECE it sees every column.
    """
    y, p = check_inputs(y_true, proba)
    return float(_weighted_classwise_ece(np.ones((1, len(y))), y, p, n_bins)[0])


def brier_score(y_true: Sequence[Any], proba: np.ndarray) -> float:
    """Return the multiclass Brier score: the mean over images of Σ_k (p_k − [y = k])², between 0 and 2."""
    y, p = check_inputs(y_true, proba)
    return float(_weighted_brier(np.ones((1, len(y))), y, p)[0])


def calibration_scores(y_true: Sequence[Any], proba: np.ndarray) -> dict[str, float]:
    """Return the CALIBRATION_KEYS scores (top-1 ECE, classwise ECE, Brier, log loss) and accuracy; no intervals."""
    y, p = check_inputs(y_true, proba)
    ones = np.ones((1, len(y)))
    scores = _weighted_metrics(ones, y, p, (*CALIBRATION_KEYS, "accuracy"))
    return {key: float(values[0]) for key, values in scores.items()}


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


def paired_comparison(
    y_true: Sequence[Any],
    proba_a: np.ndarray,
    proba_b: np.ndarray,
    groups: Sequence[Any] | None = None,
    metric: str = "macro_f1",
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    n_perm: int | None = None,
) -> dict[str, Any]:
    """Return metric(a) − metric(b) on the same images with a paired group-bootstrap interval and a p-value.

    metric: a key of PAIRED_KEYS (SCALAR_KEYS and CALIBRATION_KEYS; for the calibration scores lower is
    better, so a negative delta favours a);
    groups: duplicate-group id per image (None → every image is its own group);
    n_perm: group swaps for the p-value (None → n_boot).
    Returns delta, ci [low, high], p_value, metric_a, metric_b, metric, n, n_groups, valid_resamples,
    n_boot, n_perm, seed, unit and method.

    Interval: the percentile interval of the deltas over resamples that draw whole groups with
    replacement, the SAME draw for both models (the draws of compute_metrics with the same seed).
    Resamples where the delta is undefined (NaN) are left out and valid_resamples says how many remain.

    p-value: a two-sided group sign-flip (permutation) test. Its null hypothesis is that the two
    models are interchangeable cell by cell: swapping a's and b's predictions on all copies of a cell
    leaves the distribution of the data unchanged. Under it every pattern of swaps is equally likely, so
    p = (1 + #{|swapped delta| ≥ |delta|}) / (1 + swaps) never rejects more often than its level, at any
    number of cells and for any metric, and copies move together so they never count as independent
    evidence. A test of the centred bootstrap distribution would only be valid asymptotically
    (anti-conservative with few cells). tests/test_metrics.py checks the level and the power by
    simulation. Interval and test answer slightly different questions, so right at the boundary one may
    exclude 0 while the other does not.
    """
    if metric not in PAIRED_KEYS:
        raise ValueError(f"paired_comparison: unknown metric {metric!r}; choose one of {list(PAIRED_KEYS)}.")
    n_perm = n_boot if n_perm is None else n_perm
    if n_boot < 0 or n_perm < 0:
        raise ValueError(f"paired_comparison: n_boot and n_perm must be ≥ 0, got {n_boot} and {n_perm}.")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"paired_comparison: ci is the interval's coverage in (0, 1), got {ci}.")
    y, p_a = check_inputs(y_true, proba_a)
    try:
        _, p_b = check_inputs(y, proba_b)
    except ValueError as exc:
        raise ValueError(f"proba_b does not match y_true and proba_a: {exc}") from exc
    codes = _group_codes(groups, len(y))
    n_groups = int(codes.max()) + 1

    ones = np.ones((1, len(y)))
    score_a = float(_weighted_metrics(ones, y, p_a, (metric,))[metric][0])
    score_b = float(_weighted_metrics(ones, y, p_b, (metric,))[metric][0])
    delta = score_a - score_b
    boot = _paired_bootstrap_deltas(y, p_a, p_b, codes, metric, n_boot, seed)
    swapped = _group_swap_deltas(y, p_a, p_b, codes, metric, n_perm, seed)
    finite = swapped[np.isfinite(swapped)]
    if np.isfinite(delta) and finite.size:
        # 1e-12 absorbs rounding, so a swap that reproduces |delta| exactly counts as extreme.
        p_value = float((1 + np.sum(np.abs(finite) >= abs(delta) - 1e-12)) / (1 + finite.size))
    else:
        p_value = float("nan")
    return {
        "metric": metric, "delta": delta, "ci": _percentile_interval(boot, ci), "p_value": p_value,
        "metric_a": score_a, "metric_b": score_b, "n": int(len(y)), "n_groups": n_groups,
        "valid_resamples": int(np.isfinite(boot).sum()), "n_boot": int(n_boot), "n_perm": int(n_perm),
        "seed": int(seed), "ci_level": float(ci), "unit": "group" if groups is not None else "image",
        "method": "paired percentile bootstrap over whole groups; two-sided group sign-flip permutation test",
    }


def scores_against(
    y_true: Sequence[Any],
    proba: np.ndarray,
    reference: np.ndarray,
    groups: Sequence[Any] | None,
    keys: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Each metric in keys for `proba` with its interval, beside `reference`'s (the same images, row for row): the
    value `<key>`, `<key>_ci`, the reference's `<key>_plain`, and the paired difference proba − reference
    `<key>_delta`, `<key>_delta_ci`, `<key>_delta_p` (same group resamples, group sign-flip p); n, n_boot, seed.
    Used for test-time augmentation against the plain pass."""
    values = compute_metrics(y_true, proba, groups=groups, n_boot=n_boot, seed=seed)
    block: dict[str, Any] = {}
    for key in keys:
        paired = paired_comparison(y_true, proba, reference, groups=groups, metric=key, n_boot=n_boot, seed=seed)
        block.update({key: values[key], f"{key}_ci": values.get(f"{key}_ci"), f"{key}_plain": paired["metric_b"],
                      f"{key}_delta": paired["delta"], f"{key}_delta_ci": paired["ci"],
                      f"{key}_delta_p": paired["p_value"]})
    return {**block, "n": int(len(np.asarray(y_true))), "n_boot": int(n_boot), "seed": int(seed)}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Return Holm–Bonferroni step-down adjusted p-values in the input order (monotone, at most 1).

    NaN entries (comparisons that could not be tested) stay NaN and do not count in the family.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm_adjust: expected a flat list of p-values, got shape {p.shape}.")
    finite = np.flatnonzero(np.isfinite(p))
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError(f"holm_adjust: p-values must lie in [0, 1], got {p[finite].tolist()}.")
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    adjusted = np.full(p.shape, np.nan)
    # The k-th smallest p (0-based) is multiplied by m − k; the running maximum keeps the order monotone.
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted.tolist()


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
    approximation buys nothing. Assumes the paired images are independent; copies of one cell are not,
    and with them it rejects far too often (simulated in tests/test_metrics.py). Secondary output only:
    compare models with paired_comparison.
    """
    table = mcnemar_table(y_true, pred_a, pred_b)
    only_a, only_b = int(table[0, 1]), int(table[1, 0])
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


# --- inputs -------------------------------------------------------------------------------------


def check_inputs(y_true: Sequence[Any], proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (int labels, float64 N×K probabilities) or raise ValueError saying what is wrong.

    The one home of "labels are CLASSES positions or names, proba is N×len(CLASSES) and finite".
    """
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


def _paired_bootstrap_deltas(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, codes: np.ndarray, metric: str, n_boot: int, seed: int
) -> np.ndarray:
    """Return metric(a) − metric(b) for each group-bootstrap resample, one draw shared by both models."""
    counts = _draw_group_counts(int(codes.max()) + 1, n_boot, seed)
    chunk = max(1, _MAX_CELLS_PER_CHUNK // len(y))
    parts = [np.empty(0)]
    for i in range(0, n_boot, chunk):
        w = counts[i:i + chunk][:, codes].astype(np.float64)
        parts.append(_weighted_metrics(w, y, p_a, (metric,))[metric] - _weighted_metrics(w, y, p_b, (metric,))[metric])
    return np.concatenate(parts)


def _group_swap_deltas(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, codes: np.ndarray, metric: str, n_perm: int, seed: int
) -> np.ndarray:
    """Return the delta after swapping a's and b's predictions on a random half of the groups, n_perm times.

    Both models' predictions sit side by side (2N images); a 0/1 weight row picks, per image, whose
    prediction the swapped "model a" uses, so one weighted kernel scores any metric for every swap.
    """
    rng = np.random.default_rng([seed, 1])  # its own stream: independent of the bootstrap draws
    flips = rng.integers(0, 2, size=(n_perm, int(codes.max()) + 1))
    y2, p2 = np.concatenate([y, y]), np.concatenate([p_a, p_b])
    chunk = max(1, _MAX_CELLS_PER_CHUNK // (2 * len(y)))
    parts = [np.empty(0)]
    for i in range(0, n_perm, chunk):
        swap = flips[i:i + chunk][:, codes].astype(np.float64)
        keep = 1.0 - swap
        as_a = _weighted_metrics(np.hstack([keep, swap]), y2, p2, (metric,))[metric]
        as_b = _weighted_metrics(np.hstack([swap, keep]), y2, p2, (metric,))[metric]
        parts.append(as_a - as_b)
    return np.concatenate(parts)


def _percentile_interval(values: np.ndarray, ci: float) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def _bootstrap_values(
    y: np.ndarray, codes: np.ndarray, n_boot: int, seed: int,
    kernels: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Return {key: value in each of the n_boot group-bootstrap resamples} of kernels(B×N weights).

    The first axis of every array is the resample; n_boot ≤ 0 gives {} (no resamples, NaN intervals).
    """
    if n_boot <= 0:
        return {}
    counts = _draw_group_counts(int(codes.max()) + 1, n_boot, seed)
    chunk = max(1, _MAX_CELLS_PER_CHUNK // len(y))
    parts = [kernels(counts[i:i + chunk][:, codes].astype(np.float64)) for i in range(0, n_boot, chunk)]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _bootstrap_record(n_boot: int, seed: int, ci: float, groups: Sequence[Any] | None,
                      boot: dict[str, np.ndarray], keys: Sequence[str]) -> dict[str, Any]:
    """The `bootstrap` block of a results dict: how the intervals were drawn and how many resamples were valid."""
    return {
        "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci),
        "unit": "group" if groups is not None else "image",
        "method": "percentile, resampling whole duplicate groups",
        "valid_resamples": {k: int(np.isfinite(boot[k]).sum()) if k in boot else 0 for k in keys},
    }


def _per_class_blocks(y: np.ndarray, p: np.ndarray, boot: dict[str, np.ndarray], ci: float) -> dict[str, Any]:
    """Return `per_class_ci` and `key_class` from the full-data rates and the resampled ones (B×K per key)."""
    point = _weighted_per_class(np.ones((1, len(y))), y, p)
    support = np.bincount(y, minlength=len(CLASSES))
    k_of = {c: i for i, c in enumerate(CLASSES)}

    def rate(key: str, k: int) -> tuple[float, list[float], int]:
        values = boot[key][:, k] if key in boot else np.empty(0)
        return float(point[key][0, k]), _percentile_interval(values, ci), int(np.isfinite(values).sum())

    per_class: dict[str, Any] = {}
    for name, k in k_of.items():
        entry: dict[str, Any] = {}
        valid: dict[str, int] = {}
        for key in PER_CLASS_KEYS:
            entry[key], entry[f"{key}_ci"], valid[key] = rate(key, k)
        per_class[name] = {**entry, "support": int(support[k]), "valid_resamples": valid}
    key = per_class[KEY_CLASS]
    key_class = {
        "class": KEY_CLASS,
        "sensitivity": key["recall"], "sensitivity_ci": key["recall_ci"],
        "specificity": key["specificity"], "specificity_ci": key["specificity_ci"],
        "valid_resamples": {"sensitivity": key["valid_resamples"]["recall"],
                            "specificity": key["valid_resamples"]["specificity"]},
    }
    return {"per_class_ci": per_class, "key_class": key_class}


def _weighted_metrics(
    w: np.ndarray, y: np.ndarray, p: np.ndarray, keys: Sequence[str] = SCALAR_KEYS
) -> dict[str, np.ndarray]:
    """Return each metric in `keys` for every row of the B×N weight matrix (weights = copies of an image).

    With all weights 1 these equal scikit-learn's accuracy, f1 (macro over classes present in y_true
    or y_pred, as sklearn's default) and roc_auc; tests check that. Only the kernels `keys` need run.
    """
    out: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in out:
            out.update(_WEIGHTED_KERNELS[key](w, y, p))
    return {key: out[key] for key in keys}


def _weighted_confusion(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Return the B×K×K confusion matrices (rows true, columns predicted), one per row of w."""
    k = len(CLASSES)
    cells = np.zeros((len(y), k * k))
    cells[np.arange(len(y)), y * k + p.argmax(axis=1)] = 1.0
    return (w @ cells).reshape(-1, k, k)


def _weighted_per_class(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Return B×K precision, recall, F1 and one-vs-rest specificity; NaN where the denominator is empty."""
    cm = _weighted_confusion(w, y, p)
    total = cm.sum(axis=(1, 2))[:, None]
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    negatives = total - support
    true_negatives = negatives - (predicted - tp)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)

    return {"precision": ratio(tp, predicted), "recall": ratio(tp, support),
            "f1": ratio(2 * tp, support + predicted), "specificity": ratio(true_negatives, negatives)}


def _weighted_confusion_metrics(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Return the metrics read off the weighted confusion matrix: accuracy, F1s, myeloblast recall."""
    cm = _weighted_confusion(w, y, p)
    total = w.sum(axis=1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    key = CLASSES.index(KEY_CLASS)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": tp.sum(axis=1) / total,
            "macro_f1": (f1 * present).sum(axis=1) / present.sum(axis=1),
            "weighted_f1": (f1 * support).sum(axis=1) / support.sum(axis=1),
            "myeloblast_recall": np.where(support[:, key] > 0, tp[:, key] / np.maximum(support[:, key], 1), np.nan),
        }


def _weighted_auc_macro(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Return the macro one-vs-rest ROC-AUC over the classes where it is defined, per row of w."""
    auc = np.stack([_weighted_auc(w, y == c, p[:, c]) for c in range(len(CLASSES))], axis=1)
    defined = np.isfinite(auc)
    n_auc = defined.sum(axis=1)
    auc_sum = np.where(defined, auc, 0.0).sum(axis=1)
    return {"roc_auc_macro": np.where(n_auc > 0, auc_sum / np.maximum(n_auc, 1), np.nan)}


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


def _weighted_classwise_ece(w: np.ndarray, y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    """Return the weighted classwise ECE per row of w: every class's column binned like _weighted_ece."""
    n, k = p.shape
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.digitize(p, edges[1:-1], right=True)  # N×K
    # One column per (class, bin); an image adds ([y = k] − p_k) to its bin of every class.
    gap = np.zeros((n, k * n_bins))
    gap[np.repeat(np.arange(n), k), (np.arange(k) * n_bins + bins).ravel()] = (
        (y[:, None] == np.arange(k)) - p).ravel()
    return np.abs(w @ gap).sum(axis=1) / (k * w.sum(axis=1))


def _weighted_brier(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Return the weighted mean over images of Σ_k (p_k − [y = k])², per row of w."""
    squared = ((p - (y[:, None] == np.arange(p.shape[1]))) ** 2).sum(axis=1)
    return (w @ squared) / w.sum(axis=1)


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


# Which weighted kernel computes each scalar metric (one kernel may return several).
_WEIGHTED_KERNELS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]] = {
    "accuracy": _weighted_confusion_metrics,
    "macro_f1": _weighted_confusion_metrics,
    "weighted_f1": _weighted_confusion_metrics,
    "myeloblast_recall": _weighted_confusion_metrics,
    "roc_auc_macro": _weighted_auc_macro,
    "log_loss": lambda w, y, p: {"log_loss": _weighted_log_loss(w, y, p)},
    "ece": lambda w, y, p: {"ece": _weighted_ece(w, y, p, ECE_BINS)},
    "classwise_ece": lambda w, y, p: {"classwise_ece": _weighted_classwise_ece(w, y, p, ECE_BINS)},
    "brier": lambda w, y, p: {"brier": _weighted_brier(w, y, p)},
}
