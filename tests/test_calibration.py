"""Temperature scaling and the calibration report, on models whose right temperature is known."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy.special import softmax

from bloodcell_lib.calibration import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    calibration_report,
    fit_temperature,
    plot_reliability,
    reliability_curve,
)
from bloodcell_lib.metrics import expected_calibration_error, paired_comparison


def _calibrated(n: int, seed: int, scale: float = 2.0):
    """Logits, probabilities and labels drawn from those very probabilities: a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 5)) * scale
    p = softmax(logits, axis=1)
    y = (p.cumsum(axis=1) > rng.random(n)[:, None]).argmax(axis=1)
    return logits, p, y


def _power(p: np.ndarray, k: float) -> np.ndarray:
    """p^k renormalised: softmax(k · logits), i.e. the model at temperature 1/k."""
    q = p ** k
    return q / q.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calibrated():
    return _calibrated(20_000, seed=0)


def test_a_calibrated_model_keeps_temperature_one(calibrated):
    _, p, y = calibrated
    assert fit_temperature(y, p) == pytest.approx(1.0, abs=0.1)
    assert expected_calibration_error(y, p) < 0.02


def test_an_over_confident_model_is_cooled_by_its_known_temperature(calibrated):
    # p³ renormalised is the calibrated model's logits times 3, so the temperature that undoes it is 3.
    _, p, y = calibrated
    sharp = _power(p, 3)
    temperature = fit_temperature(y, sharp)
    assert temperature > 1 and temperature == pytest.approx(3.0, rel=0.05)
    after = apply_temperature(sharp, temperature)
    assert expected_calibration_error(y, after) < expected_calibration_error(y, sharp) / 5
    assert np.abs(after - p).max() < 0.05  # back to (nearly) the calibrated probabilities


def test_an_under_confident_model_is_sharpened(calibrated):
    _, p, y = calibrated
    soft = _power(p, 1 / 3)
    temperature = fit_temperature(y, soft)
    assert temperature < 1 and temperature == pytest.approx(1 / 3, rel=0.05)
    assert expected_calibration_error(y, apply_temperature(soft, temperature)) < expected_calibration_error(y, soft)


def test_logits_and_probabilities_give_the_same_temperature(calibrated):
    logits, p, y = calibrated
    assert fit_temperature(y, 3 * logits, from_logits=True) == pytest.approx(fit_temperature(y, _power(p, 3)), rel=1e-4)
    assert apply_temperature(3 * logits, 3.0, from_logits=True) == pytest.approx(p, abs=1e-12)


def test_temperature_keeps_the_argmax_and_one_leaves_probabilities_alone(calibrated):
    _, p, _ = calibrated
    for t in (0.1, 0.5, 2.0, 10.0):
        scaled = apply_temperature(p, t)
        assert (scaled.argmax(axis=1) == p.argmax(axis=1)).all(), t
        assert scaled.sum(axis=1) == pytest.approx(np.ones(len(p)))
    assert apply_temperature(p, 1.0) == pytest.approx(p, abs=1e-12)
    # a softmax that rounded a probability to exactly 0 is clipped, not turned into NaN
    hard = np.array([[1.0, 0.0, 0.0, 0.0, 0.0]])
    assert np.isfinite(apply_temperature(hard, 2.0)).all() and apply_temperature(hard, 2.0).argmax() == 0
    assert np.isfinite(fit_temperature([1, 0], np.vstack([hard, hard])))


def test_bad_temperatures_and_bounds_are_refused(calibrated):
    _, p, y = calibrated
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            apply_temperature(p, t)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(y, p, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="N×5"):
        fit_temperature([0, 1], np.ones((2, 3)) / 3)


def test_the_report_fits_on_validation_and_scores_the_test_subset(calibrated):
    _, p, y = calibrated
    val, test = slice(0, 10_000), slice(10_000, None)
    sharp = _power(p, 3)
    report = calibration_report(y[val], sharp[val], y[test], sharp[test])
    assert report["temperature"] == pytest.approx(3.0, rel=0.05) and not report["temperature_at_bound"]
    assert report["n_val"] == report["n_test"] == 10_000
    assert report["after"]["accuracy"] == report["before"]["accuracy"]
    for key in ("ece", "classwise_ece", "brier", "log_loss"):
        assert report["after"][key] < report["before"][key], key
        assert report["change"][key]["delta"] == pytest.approx(report["after"][key] - report["before"][key])
    assert report["after"]["ece"] < 0.03 < 0.1 < report["before"]["ece"]
    # The temperature comes from the validation subset: an over-confident validation subset makes a calibrated
    # test subset worse, which could not happen if it were fitted on the test subset.
    mixed = calibration_report(y[val], sharp[val], y[test], p[test])
    assert mixed["temperature"] == pytest.approx(3.0, rel=0.05)
    assert mixed["after"]["ece"] > mixed["before"]["ece"]


def test_the_report_gives_paired_group_intervals_for_each_change():
    _, p, y = _calibrated(2000, seed=3)
    sharp = _power(p, 3)
    groups = np.arange(1000) // 2
    report = calibration_report(y[:1000], sharp[:1000], y[1000:], sharp[1000:], groups=groups, n_boot=200, seed=5)
    assert report["n_groups"] == 500 and report["unit"] == "group" and report["n_boot"] == 200
    after = apply_temperature(sharp[1000:], report["temperature"])
    for key in ("ece", "log_loss"):
        direct = paired_comparison(y[1000:], after, sharp[1000:], groups, metric=key, n_boot=200, seed=5)
        assert report["change"][key]["ci"] == pytest.approx(direct["ci"])
        assert report["change"][key]["p_value"] == pytest.approx(direct["p_value"])
        assert report["change"][key]["ci"][1] < 0 and report["change"][key]["p_value"] < 0.01
    without = calibration_report(y[:1000], sharp[:1000], y[1000:], sharp[1000:])
    assert np.isnan(without["change"]["ece"]["ci"]).all() and np.isnan(without["change"]["ece"]["p_value"])


def test_a_validation_subset_without_errors_hits_the_bound_and_says_so():
    # Every validation image right: the likelihood keeps growing as T shrinks, so T stops at the lower bound.
    y = np.arange(50) % 5
    p = np.full((50, 5), 0.05)
    p[np.arange(50), y] = 0.8
    report = calibration_report(y, p, y, p)
    assert report["temperature"] < 0.1 and report["temperature_at_bound"]
    # mildly confident and all right: the optimum is the lower bound itself
    p = np.full((50, 5), 0.15)
    p[np.arange(50), y] = 0.4
    assert calibration_report(y, p, y, p)["temperature"] == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    # one error is enough for a finite optimum inside the range
    p[0] = np.roll(p[0], 1)
    assert not calibration_report(y, p, y, p)["temperature_at_bound"]


def test_reliability_curve_adds_up_to_the_ece(calibrated):
    _, p, y = calibrated
    sharp = _power(p, 3)
    confidence, accuracy, count = reliability_curve(y, sharp)
    assert len(count) == 15 and count.sum() == len(y)
    shown = count > 0
    ece = np.sum(count[shown] / len(y) * np.abs(accuracy[shown] - confidence[shown]))
    assert ece == pytest.approx(expected_calibration_error(y, sharp))
    assert (confidence[shown] >= accuracy[shown]).mean() > 0.8  # over-confident: below the diagonal
    # Hand example: confidences 0.7 (2 images, one right) and 0.95 (one image, right) in 4 bins
    p = np.array([[0.7, 0.1, 0.1, 0.05, 0.05], [0.7, 0.1, 0.1, 0.05, 0.05], [0.95, 0.02, 0.01, 0.01, 0.01]])
    confidence, accuracy, count = reliability_curve([0, 1, 0], p, n_bins=4)
    assert count.tolist() == [0, 0, 2, 1]
    assert confidence[2:] == pytest.approx([0.7, 0.95]) and accuracy[2:] == pytest.approx([0.5, 1.0])
    assert np.isnan(confidence[:2]).all() and np.isnan(accuracy[:2]).all()


def test_reliability_diagram_is_drawn_and_saved(calibrated, tmp_path):
    _, p, y = calibrated
    sharp = _power(p, 3)
    fig = plot_reliability({"before": reliability_curve(y, sharp),
                            "after": reliability_curve(y, apply_temperature(sharp, 3.0))},
                           path=tmp_path / "reliability.png", title="VGG16")
    assert isinstance(fig, Figure)
    assert (tmp_path / "reliability.png").stat().st_size > 1000
