"""Temperature scaling (Guo et al. 2017) and the numbers that say whether a model's confidence can be trusted.

Plain functions in scikit-learn's style. Temperature scaling divides the logits by one number T > 0 fitted
on the validation subset (never the test subset): T > 1 softens an over-confident model, T < 1 sharpens an
under-confident one, and the argmax, hence accuracy and every confusion-matrix metric, stays the same.
Our models output probabilities, not logits; log p is the logits up to a per-image constant, which the
softmax ignores, so softmax(log p / T) is exactly temperature scaling of the network's logits.

calibration_report fits T on validation predictions and scores the test predictions before and after with
the top-1 ECE, the classwise ECE, the Brier score and the log loss; with groups and n_boot it adds a paired
group-bootstrap interval and a group sign-flip p-value for each change (metrics.paired_comparison).
reliability_curve gives a reliability diagram's data; plot_reliability draws it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

from bloodcell_lib.figures import save_figure
from bloodcell_lib.metrics import (
    CALIBRATION_KEYS,
    ECE_BINS,
    calibration_scores,
    check_inputs,
    paired_comparison,
)

# The search range of T. The NLL is convex in 1/T, so an optimum on a bound means the data push T further:
# validation predictions that are all right (T → 0) or carry no information (T → ∞). The report flags it.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
# Probabilities are clipped before the log like sklearn's log_loss (and metrics' log loss): a float32 softmax
# can round a probability to exactly 0.
_EPS = np.finfo(np.float64).eps


def fit_temperature(
    y_true: Sequence[Any],
    proba: np.ndarray,
    from_logits: bool = False,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """Return the temperature T that minimises the mean negative log-likelihood of softmax(logits / T).

    y_true: labels (CLASSES positions or names); proba: N×5 probabilities (their logs are the logits),
    or logits when from_logits; bounds: the range searched for T. Fit it on validation predictions.
    """
    y, logits = _labels_and_logits(y_true, proba, from_logits)
    low, high = bounds
    if not 0 < low < high < np.inf:
        raise ValueError(f"fit_temperature: bounds must satisfy 0 < low < high < inf, got {bounds}.")
    # In the inverse temperature β = 1/T the NLL is a log-sum-exp minus a linear term, so convex: the
    # bounded one-dimensional search finds the global minimum, not a local one.
    found = minimize_scalar(lambda beta: _nll(y, logits, beta), bounds=(1.0 / high, 1.0 / low), method="bounded",
                            options={"xatol": 1e-7})
    return float(1.0 / found.x)


def apply_temperature(proba: np.ndarray, temperature: float, from_logits: bool = False) -> np.ndarray:
    """Return softmax(logits / temperature): the probabilities after temperature scaling (same argmax).

    proba: N×K probabilities (their logs are the logits), or logits when from_logits.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"apply_temperature: the temperature must be a positive number, got {temperature}.")
    return np.exp(log_softmax(_logits(proba, from_logits) / temperature, axis=1))


def calibration_report(
    y_val: Sequence[Any],
    proba_val: np.ndarray,
    y_test: Sequence[Any],
    proba_test: np.ndarray,
    groups: Sequence[Any] | None = None,
    n_boot: int = 0,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Fit T on the validation predictions and score the test predictions before and after scaling.

    groups: duplicate-group id per test image; n_boot, seed: the study's bootstrap (0 → no intervals).
    Returns temperature, temperature_at_bound, n_val, n_test, n_groups, `before` and `after` (ece,
    classwise_ece, brier, log_loss and accuracy, which scaling leaves unchanged), `change` (per calibration
    score: after − before with a paired group-bootstrap interval and a group sign-flip p-value; negative =
    better calibrated) and n_boot, seed, unit.
    """
    y_v, logits_val = _labels_and_logits(y_val, proba_val, from_logits=False)
    y_t, p_test = check_inputs(y_test, proba_test)
    temperature = fit_temperature(y_v, proba_val)
    # On a bound, or anywhere on a plateau that reaches one (all validation images right and confident: the NLL
    # keeps falling as T → 0, below float resolution), the data only say T is at most (least) the bound.
    fitted = _nll(y_v, logits_val, 1.0 / temperature)
    at_bound = any(_nll(y_v, logits_val, 1.0 / bound) <= fitted + 1e-12 for bound in TEMPERATURE_BOUNDS)
    p_after = apply_temperature(p_test, temperature)
    return {
        "temperature": temperature,
        "temperature_at_bound": bool(at_bound),
        "n_val": int(len(y_v)),
        **calibration_change(y_t, p_test, p_after, groups=groups, n_boot=n_boot, seed=seed, ci=ci),
    }


def calibration_change(
    y_test: Sequence[Any],
    proba_before: np.ndarray,
    proba_after: np.ndarray,
    groups: Sequence[Any] | None = None,
    n_boot: int = 0,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Score test probabilities before and after a calibration: n_test, n_groups, `before`, `after` (ece,
    classwise_ece, brier, log_loss, accuracy), `change` (after − before per calibration score with a paired
    group-bootstrap interval and a group sign-flip p-value; negative = better calibrated), n_boot, seed, unit,
    method. Used by calibration_report and by the out-of-fold scores of a cross-validation (each fold's own T)."""
    y_t, p_test = check_inputs(y_test, proba_before)
    change: dict[str, dict[str, Any]] = {}
    paired: dict[str, Any] = {}
    for key in CALIBRATION_KEYS:
        # a = after, b = before: the same resamples for both, swaps within whole groups for the p-value.
        paired = paired_comparison(y_t, proba_after, p_test, groups=groups, metric=key, n_boot=n_boot, seed=seed,
                                   ci=ci)
        change[key] = {"delta": paired["delta"], "ci": paired["ci"], "p_value": paired["p_value"]}
    return {
        "n_test": int(len(y_t)),
        "n_groups": int(paired["n_groups"]),
        "before": calibration_scores(y_t, p_test),
        "after": calibration_scores(y_t, proba_after),
        "change": change,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "unit": paired["unit"],
        "method": "temperature scaling (Guo et al. 2017) fitted on validation by NLL; paired group bootstrap",
    }


def reliability_curve(
    y_true: Sequence[Any], proba: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (mean confidence, accuracy, count) per confidence bin: a reliability diagram's data.

    Bins are those of the top-1 ECE ((lo, hi] of width 1/n_bins), so Σ count/N·|accuracy − confidence|
    over non-empty bins is expected_calibration_error; empty bins have count 0 and NaN confidence and accuracy.
    """
    y, p = check_inputs(y_true, proba)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.digitize(confidence, np.linspace(0.0, 1.0, n_bins + 1)[1:-1], right=True)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return mean_confidence, accuracy, count


def plot_reliability(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path | None = None,
    title: str = "",
) -> Figure:
    """Reliability diagram: accuracy against confidence per bin for each named curve (e.g. before, after).

    curves: {label: reliability_curve(...)}; marker area follows each bin's share of images.
    """
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for label, (confidence, accuracy, count) in curves.items():
        shown = count > 0
        share = count[shown] / max(count.sum(), 1)
        line, = ax.plot(confidence[shown], accuracy[shown], "-", label=label)
        ax.scatter(confidence[shown], accuracy[shown], s=20 + 400 * share, color=line.get_color(), alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=title or "Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def _nll(y: np.ndarray, logits: np.ndarray, beta: float) -> float:
    """Mean negative log-likelihood of softmax(beta · logits) at the true labels."""
    z = beta * logits
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def _labels_and_logits(y_true: Sequence[Any], proba: np.ndarray, from_logits: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (int labels, N×K logits), checked like every metric's inputs."""
    y, scores = check_inputs(y_true, proba)
    return y, _logits(scores, from_logits)


def _logits(proba: np.ndarray, from_logits: bool) -> np.ndarray:
    """Return logits: the input itself, or the log of the clipped probabilities."""
    scores = np.asarray(proba, dtype=np.float64)
    if scores.ndim != 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"Expected a finite N×K array of {'logits' if from_logits else 'probabilities'}, "
                         f"got shape {scores.shape}{'' if np.all(np.isfinite(scores)) else ' with NaN or inf'}.")
    return scores if from_logits else np.log(np.clip(scores, _EPS, 1.0))
