import math
import time

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.metrics import (
    PER_CLASS_KEYS,
    SCALAR_KEYS,
    bootstrap_ci,
    brier_score,
    calibration_scores,
    classwise_ece,
    compute_metrics,
    expected_calibration_error,
    holm_adjust,
    mcnemar_p,
    mcnemar_table,
    paired_comparison,
    per_class_metrics,
)


def _row(pred: int, confidence: float) -> list[float]:
    """A probability row: `confidence` on the predicted class, the rest shared equally by the other four."""
    row = [(1 - confidence) / 4] * 5
    row[pred] = confidence
    return row


# Hand example: 8 images, classes 0..4 = basophil, erythroblast, monocyte, myeloblast, seg_neutrophil.
# Confidences 0.45 / 0.65 / 0.85 sit inside ECE bins (edges are multiples of 1/15), others get (1-c)/4:
# 0.45 → 0.1375, 0.65 → 0.0875, 0.85 → 0.0375.
HAND_Y = [0, 0, 1, 1, 2, 3, 3, 4]
HAND_P = np.array([
    _row(0, 0.65),  # right
    _row(1, 0.45),  # wrong: basophil called erythroblast, p(true) = 0.1375
    _row(1, 0.85),  # right
    _row(1, 0.65),  # right
    _row(2, 0.65),  # right
    _row(3, 0.85),  # right
    _row(0, 0.45),  # wrong: myeloblast called basophil, p(true) = 0.1375
    _row(4, 0.65),  # right
])


@pytest.fixture(scope="module")
def hand():
    return compute_metrics(HAND_Y, HAND_P, n_boot=200, seed=0)


def test_accuracy_f1_recall_by_hand(hand):
    assert hand["accuracy"] == pytest.approx(6 / 8)
    # F1 = 2TP / (2TP + FP + FN) per class:
    # basophil 2/(2+1+1)=1/2, erythroblast 4/(4+1+0)=4/5, monocyte 1, myeloblast 2/(2+0+1)=2/3, neutrophil 1
    assert hand["macro_f1"] == pytest.approx((0.5 + 0.8 + 1 + 2 / 3 + 1) / 5)  # = 119/150
    # weighted by support 2,2,1,2,1 (of 8)
    assert hand["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 1 + 2 * 2 / 3 + 1) / 8)  # = 89/120
    assert hand["myeloblast_recall"] == pytest.approx(0.5)
    assert hand["per_class"]["erythroblast"]["precision"] == pytest.approx(2 / 3)
    assert hand["per_class"]["myeloblast"]["recall"] == pytest.approx(0.5)
    assert hand["per_class"]["basophil"]["support"] == 2
    assert hand["n"] == 8 and hand["n_groups"] == 8


def test_confusion_matrices_by_hand(hand):
    assert hand["confusion_matrix"] == [
        [1, 1, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    assert hand["confusion_matrix_normalised"][0] == pytest.approx([0.5, 0.5, 0, 0, 0])
    assert hand["confusion_matrix_normalised"][3] == pytest.approx([0.5, 0, 0, 0.5, 0])
    assert hand["confusion_matrix_normalised"][2] == pytest.approx([0, 0, 1, 0, 0])


def test_roc_auc_by_hand(hand):
    # Counting positive-over-negative pairs (ties ½):
    # basophil: positives 0.65 (beats 6) and 0.1375 (beats 5 of 6, below the 0.45) → 11/12
    # erythroblast, monocyte, neutrophil: every positive above every negative → 1
    # myeloblast: 0.85 beats 6; 0.1375 beats 5 and ties one 0.1375 → 5.5; → 11.5/12
    per_class = hand["roc_auc_per_class"]
    assert list(per_class) == list(CLASSES)
    assert per_class["basophil"] == pytest.approx(11 / 12)
    assert per_class["erythroblast"] == pytest.approx(1.0)
    assert per_class["myeloblast"] == pytest.approx(11.5 / 12)
    assert hand["roc_auc_macro"] == pytest.approx((11 / 12 + 1 + 1 + 11.5 / 12 + 1) / 5)  # = 0.975


def test_log_loss_and_ece_by_hand(hand):
    # p(true class): four 0.65, two 0.85, two 0.1375
    expected_loss = -(4 * math.log(0.65) + 2 * math.log(0.85) + 2 * math.log(0.1375)) / 8  # ≈ 0.752054
    assert hand["log_loss"] == pytest.approx(expected_loss)
    # bins: conf 0.45 (2 images, 0 right) → 2/8·0.45; conf 0.65 (4, all right) → 4/8·0.35;
    # conf 0.85 (2, all right) → 2/8·0.15; total 0.1125 + 0.175 + 0.0375
    assert hand["ece"] == pytest.approx(0.325)
    assert expected_calibration_error(HAND_Y, HAND_P) == pytest.approx(0.325)


def test_missing_class_gives_nan_auc_not_a_crash():
    keep = [i for i, label in enumerate(HAND_Y) if label != 2]  # no monocyte left
    result = compute_metrics([HAND_Y[i] for i in keep], HAND_P[keep], n_boot=100)
    auc = result["roc_auc_per_class"]
    assert math.isnan(auc["monocyte"])
    # without image 4 (a 0.0875 negative): basophil 0.65 beats 5, 0.1375 beats 4 → 9/10;
    # myeloblast 0.85 beats 5, 0.1375 beats 4 and ties 1 → 9.5/10; erythroblast, neutrophil 1
    assert auc["basophil"] == pytest.approx(0.9)
    assert auc["myeloblast"] == pytest.approx(0.95)
    assert result["roc_auc_macro"] == pytest.approx((0.9 + 1 + 0.95 + 1) / 4)
    assert all(np.isfinite(result["roc_auc_macro_ci"]))
    assert result["confusion_matrix_normalised"][2] == [0, 0, 0, 0, 0]


def test_no_myeloblast_gives_nan_recall_and_interval():
    y = [0, 1, 2, 4]
    p = np.array([_row(label, 0.7) for label in y])
    result = compute_metrics(y, p, n_boot=50)
    assert math.isnan(result["myeloblast_recall"])
    assert all(math.isnan(v) for v in result["myeloblast_recall_ci"])
    assert result["bootstrap"]["valid_resamples"]["myeloblast_recall"] == 0
    assert result["accuracy"] == 1.0


def test_class_names_are_accepted_as_labels():
    names = [CLASSES[i] for i in HAND_Y]
    assert compute_metrics(names, HAND_P, n_boot=0)["accuracy"] == pytest.approx(0.75)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="N×5"):
        compute_metrics([0, 1], np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="rows"):
        compute_metrics([0, 1, 2], HAND_P[:2])


def _noisy_classifier(n_groups: int, copies: int = 1, seed: int = 0, signal: float = 1.5, ties: bool = False):
    """Labels and probabilities for n_groups cells, each repeated `copies` times (identical copies)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n_groups)
    # integer logits give many equal scores, which exercises the ½-weight of ties in ROC-AUC
    logits = rng.integers(0, 3, size=(n_groups, 5)).astype(float) if ties else rng.normal(size=(n_groups, 5))
    logits[np.arange(n_groups), y] += signal
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    groups = np.repeat(np.arange(n_groups), copies)
    return np.repeat(y, copies), np.repeat(p, copies, axis=0), groups


def _width(interval):
    return interval[1] - interval[0]


def test_intervals_contain_the_point_estimate():
    y, p, groups = _noisy_classifier(300, copies=2)
    result = compute_metrics(y, p, groups=groups, n_boot=500, seed=3)
    for key in SCALAR_KEYS:
        low, high = result[f"{key}_ci"]
        assert low <= result[key] <= high, key
        assert low < high, key


def test_intervals_narrow_with_ten_times_more_groups():
    small = compute_metrics(*_noisy_classifier(60, seed=1)[:2], n_boot=400)
    large = compute_metrics(*_noisy_classifier(600, seed=1)[:2], n_boot=400)
    for key in ("accuracy", "macro_f1", "roc_auc_macro", "log_loss", "myeloblast_recall"):
        assert _width(large[f"{key}_ci"]) < 0.6 * _width(small[f"{key}_ci"]), key


def test_group_bootstrap_is_wider_than_image_bootstrap_for_duplicates():
    # 150 cells, each copied 4 times: 600 images but only 150 independent pieces of evidence.
    y, p, groups = _noisy_classifier(150, copies=4, seed=2)
    by_group = compute_metrics(y, p, groups=groups, n_boot=500)
    by_image = compute_metrics(y, p, groups=None, n_boot=500)
    assert by_group["n_groups"] == 150 and by_image["n_groups"] == 600
    assert by_group["bootstrap"]["unit"] == "group"
    for key in ("accuracy", "macro_f1", "roc_auc_macro", "log_loss"):
        # sqrt(4) = 2 times wider in theory
        assert _width(by_group[f"{key}_ci"]) > 1.5 * _width(by_image[f"{key}_ci"]), key


def test_vectorised_intervals_match_sklearn_per_resample():
    # The fast weighted kernels must give exactly what sklearn gives on each resampled data set.
    y, p, groups = _noisy_classifier(40, copies=2, seed=4, signal=1.0, ties=True)
    fast = compute_metrics(y, p, groups=groups, n_boot=150, seed=7)
    pred = p.argmax(axis=1)
    labels = list(range(5))

    def auc_macro(yy, pp):
        values = [roc_auc_score(yy == c, pp[:, c]) for c in labels if 0 < np.sum(yy == c) < len(yy)]
        return float(np.mean(values))

    slow = {
        "accuracy": bootstrap_ci(accuracy_score, y, pred, groups=groups, n_boot=150, seed=7),
        "macro_f1": bootstrap_ci(lambda a, b: f1_score(a, b, average="macro", zero_division=0),
                                 y, pred, groups=groups, n_boot=150, seed=7),
        "weighted_f1": bootstrap_ci(lambda a, b: f1_score(a, b, average="weighted", zero_division=0),
                                    y, pred, groups=groups, n_boot=150, seed=7),
        "roc_auc_macro": bootstrap_ci(auc_macro, y, p, groups=groups, n_boot=150, seed=7),
        "log_loss": bootstrap_ci(lambda a, b: log_loss(a, b, labels=labels), y, p, groups=groups, n_boot=150, seed=7),
        "myeloblast_recall": bootstrap_ci(lambda a, b: recall_score(a == 3, b == 3) if np.any(a == 3) else np.nan,
                                          y, pred, groups=groups, n_boot=150, seed=7),
    }
    for key, interval in slow.items():
        assert fast[f"{key}_ci"] == pytest.approx(interval, abs=1e-9), key
    assert fast["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert fast["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_bootstrap_ci_skips_undefined_resamples():
    y = np.array([0] * 19 + [1])  # one positive: most resamples lose it and AUC is undefined
    score = np.linspace(0, 1, 20)
    low, high = bootstrap_ci(roc_auc_score, y, score, n_boot=200)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_thousand_resamples_on_750_images_are_fast():
    y, p, groups = _noisy_classifier(375, copies=2, seed=5)
    start = time.perf_counter()
    compute_metrics(y, p, groups=groups, n_boot=1000)
    # ~0.2 s on 2 CPU cores; a per-resample sklearn loop would take well over a minute
    assert time.perf_counter() - start < 10


def test_ece_of_a_calibrated_and_an_overconfident_model():
    # Calibrated: 10 images at confidence 0.7 with 7 right, 20 at 0.9 with 18 right.
    y = np.zeros(30, dtype=int)
    pred = np.array([0] * 7 + [1] * 3 + [0] * 18 + [1] * 2)
    conf = np.array([0.7] * 10 + [0.9] * 20)
    p = np.array([_row(k, c) for k, c in zip(pred, conf)])
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    # Over-confident: always 0.95 sure, right half the time → gap 0.45.
    y = np.array([0, 1] * 10)
    p = np.array([_row(0, 0.95)] * 20)
    assert expected_calibration_error(y, p) == pytest.approx(0.45)
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.45)


def test_mcnemar_on_a_known_table():
    # 20 both right, 10 only A right (b), 2 only B right (c), 5 both wrong.
    y = np.zeros(37, dtype=int)
    a = np.array([0] * 20 + [0] * 10 + [1] * 2 + [1] * 5)
    b = np.array([0] * 20 + [1] * 10 + [0] * 2 + [1] * 5)
    assert mcnemar_table(y, a, b).tolist() == [[20, 10], [2, 5]]
    # exact two-sided: 2·P(X ≤ 2 | n=12, ½) = 2·(1 + 12 + 66)/4096 = 158/4096 ≈ 0.0386
    assert mcnemar_p(y, a, b) == pytest.approx(158 / 4096)
    assert mcnemar_p(y, b, a) == pytest.approx(158 / 4096)
    assert mcnemar_p(y, a, a) == 1.0  # no discordant pairs


def test_mcnemar_accepts_class_names():
    y = ["basophil", "monocyte", "monocyte"]
    assert mcnemar_table(y, ["basophil", "monocyte", "basophil"], y).tolist() == [[2, 0], [1, 0]]


# --- paired comparison of two models --------------------------------------------------------------


def _one_hot_ish(pred: np.ndarray) -> np.ndarray:
    """Probabilities with 0.8 on the predicted class and 0.05 on each other class."""
    p = np.full((len(pred), 5), 0.05)
    p[np.arange(len(pred)), pred] = 0.8
    return p


def _copied_cells(rng, acc_a: float, acc_b: float, rho: float = 0.0, n_cells: int = 150, copy_flip: float = 0.05):
    """A simulated test set: n_cells cells of 5 classes, each with 1–5 copies (uniform).

    Each model is right on a cell when the cell's latent difficulty u is below its accuracy; with
    probability rho both models see the same u (they find the same cells hard), else independent ones.
    All copies of a cell share the cell's outcome, except that each copy flips it with probability
    copy_flip ("nearly so"). Wrong predictions name a random other class.
    Returns y, proba_a, proba_b, groups.
    """
    copies = rng.integers(1, 6, n_cells)
    groups = np.repeat(np.arange(n_cells), copies)
    y_cell = rng.integers(0, 5, n_cells)
    y = y_cell[groups]
    u_a = rng.random(n_cells)
    u_b = np.where(rng.random(n_cells) < rho, u_a, rng.random(n_cells))

    def predictions(right_cell: np.ndarray) -> np.ndarray:
        wrong_cell = (y_cell + rng.integers(1, 5, n_cells)) % 5
        pred = np.where(right_cell, y_cell, wrong_cell)[groups]
        flip = rng.random(len(y)) < copy_flip
        other = (y + rng.integers(1, 5, len(y))) % 5
        return _one_hot_ish(np.where(flip, np.where(pred == y, other, y), pred))

    return y, predictions(u_a < acc_a), predictions(u_b < acc_b), groups


def _null_sets(n_sets: int = 200):
    """200 simulated test sets with two equally good models (per-cell accuracy 0.85): half of them
    with independent outcomes, half with outcomes shared on half the cells."""
    rng = np.random.default_rng(2024)
    return [_copied_cells(rng, 0.85, 0.85, rho=0.0 if i % 2 else 0.5) for i in range(n_sets)]


def test_paired_delta_is_the_difference_of_the_two_models_metrics():
    y, pa, pb, groups = _copied_cells(np.random.default_rng(1), 0.9, 0.8)
    ma, mb = compute_metrics(y, pa, n_boot=0), compute_metrics(y, pb, n_boot=0)
    for key in SCALAR_KEYS:
        result = paired_comparison(y, pa, pb, groups, metric=key, n_boot=50, seed=0)
        assert result["delta"] == pytest.approx(ma[key] - mb[key]), key
        assert result["metric_a"] == pytest.approx(ma[key]) and result["metric_b"] == pytest.approx(mb[key])
        assert result["ci"][0] <= result["ci"][1] and 0 < result["p_value"] <= 1, key
    assert result["n"] == len(y) and result["n_groups"] == 150 and result["unit"] == "group"


def test_paired_bootstrap_uses_the_draws_of_compute_metrics():
    # Model b is wrong on every image, so each resample's delta is model a's accuracy in that resample:
    # the paired interval must be compute_metrics' interval for a, draw for draw.
    y, pa, _, groups = _copied_cells(np.random.default_rng(2), 0.85, 0.85)
    always_wrong = _one_hot_ish((y + 1) % 5)
    paired = paired_comparison(y, pa, always_wrong, groups, metric="accuracy", n_boot=300, seed=11)
    marginal = compute_metrics(y, pa, groups=groups, n_boot=300, seed=11)
    assert paired["ci"] == pytest.approx(marginal["accuracy_ci"], abs=1e-12)
    assert paired["valid_resamples"] == 300


def test_paired_interval_separates_models_whose_marginal_intervals_overlap():
    # b equals a except that it is also wrong on 10 of 200 cells that a gets right: a small but
    # consistent lead that the marginal intervals (each ±0.05 or so) cannot see.
    rng = np.random.default_rng(3)
    y, pa, _, groups = _copied_cells(rng, 0.85, 0.85, n_cells=200, copy_flip=0.0)
    first = np.unique(groups, return_index=True)[1]  # one image per cell; copies share the outcome here
    right_cells = groups[first][pa.argmax(axis=1)[first] == y[first]]
    spoiled = np.isin(groups, rng.choice(right_cells, 10, replace=False))
    pb = np.where(spoiled[:, None], _one_hot_ish((y + 1) % 5), pa)
    ma = compute_metrics(y, pa, groups=groups, n_boot=500)
    mb = compute_metrics(y, pb, groups=groups, n_boot=500)
    assert ma["macro_f1_ci"][0] < mb["macro_f1_ci"][1]  # the marginal intervals overlap
    result = paired_comparison(y, pa, pb, groups, n_boot=500)
    assert result["delta"] > 0 and result["ci"][0] > 0 and result["p_value"] < 0.01


def test_identical_models_and_swapped_models():
    y, pa, pb, groups = _copied_cells(np.random.default_rng(4), 0.9, 0.8)
    same = paired_comparison(y, pa, pa, groups, n_boot=100)
    assert same["delta"] == 0 and same["ci"] == [0, 0] and same["p_value"] == 1
    ab = paired_comparison(y, pa, pb, groups, n_boot=200, seed=5)
    ba = paired_comparison(y, pb, pa, groups, n_boot=200, seed=5)
    assert ba["delta"] == pytest.approx(-ab["delta"]) and ba["p_value"] == pytest.approx(ab["p_value"])
    assert ba["ci"] == pytest.approx([-ab["ci"][1], -ab["ci"][0]])


def test_paired_comparison_without_groups_treats_images_as_independent():
    y, pa, pb, _ = _copied_cells(np.random.default_rng(5), 0.9, 0.8)
    result = paired_comparison(y, pa, pb, None, n_boot=50)
    assert result["unit"] == "image" and result["n_groups"] == len(y)


def test_paired_comparison_counts_undefined_resamples():
    # One myeloblast cell (3 copies): resamples that miss it have no myeloblast recall.
    y = np.array([3, 3, 3] + [0, 1, 2, 4] * 10)
    groups = np.array([0, 0, 0] + list(range(1, 41)))
    pa, pb = _one_hot_ish(y), _one_hot_ish(np.where(np.arange(len(y)) % 2, y, 0))
    result = paired_comparison(y, pa, pb, groups, metric="myeloblast_recall", n_boot=300, seed=2)
    expected = compute_metrics(y, pa, groups=groups, n_boot=300, seed=2)["bootstrap"]["valid_resamples"]
    assert 0 < result["valid_resamples"] == expected["myeloblast_recall"] < 300


def test_paired_comparison_refuses_bad_inputs():
    y, pa, pb, groups = _copied_cells(np.random.default_rng(6), 0.9, 0.8, n_cells=20)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_comparison(y, pa, pb, groups, metric="auc")
    with pytest.raises(ValueError, match="proba_b"):
        paired_comparison(y, pa, pb[:-1], groups)
    with pytest.raises(ValueError, match="groups"):
        paired_comparison(y, pa, pb, groups[:-1])
    with pytest.raises(ValueError, match="ci"):
        paired_comparison(y, pa, pb, groups, ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        paired_comparison(y, pa, pb, groups, n_boot=-1)


def test_holm_adjust_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.2 → ×4, ×3, ×2, ×1 = 0.04, 0.09, 0.08, 0.2 → running max 0.04, 0.09, 0.09, 0.2
    assert holm_adjust([0.04, 0.01, 0.2, 0.03]) == pytest.approx([0.09, 0.04, 0.2, 0.09])
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]  # capped
    adjusted = holm_adjust([0.01, float("nan"), 0.02])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm_adjust([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_adjust([0.5, 1.5])


@pytest.mark.slow
def test_paired_test_holds_its_level_on_copied_cells():
    """Under the null (equally good models) it rejects at about 5%, for macro-F1 and accuracy; ~20 s."""
    sets = _null_sets()
    for metric in ("macro_f1", "accuracy"):
        results = [paired_comparison(*s, metric=metric, n_boot=400, seed=i) for i, s in enumerate(sets)]
        rejected = np.mean([r["p_value"] < 0.05 for r in results])
        interval_excludes_0 = np.mean([not r["ci"][0] <= 0 <= r["ci"][1] for r in results])
        print(f"{metric}: null rejection {rejected:.3f}, interval excludes 0 in {interval_excludes_0:.3f}")
        assert rejected <= 0.08, metric
        assert interval_excludes_0 <= 0.10, metric  # the conclusion reads the interval too


def test_per_image_mcnemar_rejects_far_too_often_on_copied_cells():
    """Why McNemar was replaced: on the same null sets it treats copies as independent evidence."""
    rejected = np.mean([mcnemar_p(y, pa.argmax(axis=1), pb.argmax(axis=1)) < 0.05 for y, pa, pb, _ in _null_sets()])
    print(f"per-image McNemar null rejection {rejected:.3f}")
    assert rejected > 0.12


def test_paired_test_finds_a_real_difference():
    """Per-cell accuracies 0.92 vs 0.78 on 150 cells are found in at least 80% of test sets; ~8 s."""
    rng = np.random.default_rng(77)
    sets = [_copied_cells(rng, 0.92, 0.78, rho=0.5) for _ in range(100)]
    for metric in ("macro_f1", "accuracy"):
        power = np.mean([paired_comparison(*s, metric=metric, n_boot=400, seed=i)["p_value"] < 0.05
                         for i, s in enumerate(sets)])
        print(f"{metric}: power {power:.2f}")
        assert power >= 0.8, metric


# --- per-class rates with intervals --------------------------------------------------------------------


def test_per_class_rates_by_hand(hand):
    # HAND's confusion matrix (rows true, columns predicted) is in test_confusion_matrices_by_hand; 8 images.
    # (precision, recall, F1, specificity = true negatives / negatives):
    expected = {
        "basophil": (1 / 2, 1 / 2, 1 / 2, 5 / 6),  # predicted twice (once for a myeloblast); 6 negatives, 1 FP
        "erythroblast": (2 / 3, 1, 4 / 5, 5 / 6),  # predicted 3 times (once for a basophil); 6 negatives, 1 FP
        "monocyte": (1, 1, 1, 1),
        "myeloblast": (1, 1 / 2, 2 / 3, 1),  # predicted once, right; one myeloblast called basophil
        "seg_neutrophil": (1, 1, 1, 1),
    }
    block = hand["per_class_ci"]
    for name, values in expected.items():
        assert [block[name][k] for k in PER_CLASS_KEYS] == pytest.approx(values), name
        assert block[name]["support"] == hand["per_class"][name]["support"]
        for key in ("precision", "recall", "f1"):  # what scikit-learn's report says where both are defined
            assert block[name][key] == pytest.approx(hand["per_class"][name][key if key != "f1" else "f1-score"])
    assert hand["key_class"]["class"] == "myeloblast"
    assert hand["key_class"]["sensitivity"] == pytest.approx(0.5) and hand["key_class"]["specificity"] == 1.0


def test_a_perfect_classifier_scores_one_everywhere_with_degenerate_intervals():
    y, _, groups = _noisy_classifier(80, copies=2, seed=8)
    result = per_class_metrics(y, _one_hot_ish(y), groups=groups, n_boot=300, seed=1)
    for name in CLASSES:
        for key in PER_CLASS_KEYS:
            assert result["per_class_ci"][name][key] == 1.0, (name, key)
            assert result["per_class_ci"][name][f"{key}_ci"] == [1.0, 1.0], (name, key)
            assert 0 < result["per_class_ci"][name]["valid_resamples"][key] <= 300
    key_class = result["key_class"]
    assert key_class["sensitivity_ci"] == [1.0, 1.0] and key_class["specificity_ci"] == [1.0, 1.0]
    assert result["bootstrap"]["n_boot"] == 300 and result["bootstrap"]["unit"] == "group"


def test_per_class_intervals_share_the_draws_of_compute_metrics():
    y, p, groups = _noisy_classifier(120, copies=2, seed=9, signal=1.0)
    full = compute_metrics(y, p, groups=groups, n_boot=250, seed=4)
    alone = per_class_metrics(y, p, groups=groups, n_boot=250, seed=4)
    assert alone["per_class_ci"] == full["per_class_ci"] and alone["key_class"] == full["key_class"]
    assert full["per_class_ci"]["myeloblast"]["recall_ci"] == full["myeloblast_recall_ci"]
    assert full["key_class"]["sensitivity_ci"] == full["myeloblast_recall_ci"]
    assert full["key_class"]["sensitivity"] == full["myeloblast_recall"]
    # existing keys are unchanged by the new blocks
    assert set(SCALAR_KEYS) | {"per_class", "confusion_matrix", "bootstrap"} <= set(full)
    assert set(full["bootstrap"]["valid_resamples"]) == set(SCALAR_KEYS)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_per_class_intervals_match_sklearn_per_resample():
    y, p, groups = _noisy_classifier(40, copies=2, seed=10, signal=1.0)
    fast = per_class_metrics(y, p, groups=groups, n_boot=60, seed=3)["per_class_ci"]
    pred = p.argmax(axis=1)
    for c, name in enumerate(CLASSES):
        slow = {
            "precision": bootstrap_ci(lambda a, b: precision_score(a == c, b == c, zero_division=np.nan),
                                      y, pred, groups=groups, n_boot=60, seed=3),
            "recall": bootstrap_ci(lambda a, b: recall_score(a == c, b == c, zero_division=np.nan),
                                   y, pred, groups=groups, n_boot=60, seed=3),
            "f1": bootstrap_ci(lambda a, b: f1_score(a == c, b == c, zero_division=np.nan),
                               y, pred, groups=groups, n_boot=60, seed=3),
            "specificity": bootstrap_ci(lambda a, b: recall_score(a != c, b != c, zero_division=np.nan),
                                        y, pred, groups=groups, n_boot=60, seed=3),
        }
        for key, interval in slow.items():
            assert fast[name][f"{key}_ci"] == pytest.approx(interval, abs=1e-12), (name, key)


def test_undefined_per_class_rates_are_nan_not_zero():
    y = np.array([0, 0, 1, 1, 2, 4])  # no myeloblast; nothing predicted as monocyte
    pred = np.array([0, 1, 1, 1, 0, 4])
    result = per_class_metrics(y, _one_hot_ish(pred), n_boot=50)["per_class_ci"]
    assert math.isnan(result["myeloblast"]["recall"]) and math.isnan(result["myeloblast"]["precision"])
    assert math.isnan(result["myeloblast"]["f1"]) and result["myeloblast"]["specificity"] == 1.0
    assert math.isnan(result["monocyte"]["precision"]) and result["monocyte"]["recall"] == 0.0
    assert result["monocyte"]["f1"] == 0.0  # a present class never found: F1 is 0, as macro-F1 counts it
    assert all(math.isnan(v) for v in result["myeloblast"]["recall_ci"])
    assert result["myeloblast"]["valid_resamples"]["recall"] == 0


# --- Brier score and classwise ECE --------------------------------------------------------------------------


def test_brier_score_by_hand_and_against_sklearn():
    assert brier_score([0, 1], np.eye(5)[[0, 1]]) == 0.0
    assert brier_score([0], np.eye(5)[[1]]) == pytest.approx(2.0)  # sure and wrong: 1 + 1
    assert brier_score([2], np.full((1, 5), 0.2)) == pytest.approx(0.8)  # 0.8² + 4 · 0.2²
    # HAND: right at c → 1.25·(1 − c)²; wrong at 0.45 → (1 − 0.1375)² + 0.45² + 3 · 0.1375² = 1.003125
    expected = (4 * 1.25 * 0.35 ** 2 + 2 * 1.25 * 0.15 ** 2 + 2 * 1.003125) / 8  # = 0.334375
    assert brier_score(HAND_Y, HAND_P) == pytest.approx(expected)
    assert brier_score(HAND_Y, HAND_P) == pytest.approx(brier_score_loss(HAND_Y, HAND_P, labels=list(range(5))))


def test_classwise_ece_by_hand():
    # Two images, labels 0 and 1, both predicted [0.62, 0.095, 0.095, 0.095, 0.095]: each column sits in one bin.
    # class 0: |½ − 0.62| = 0.12; class 1: |½ − 0.095| = 0.405; classes 2-4: |0 − 0.095| each → mean 0.81 / 5
    p = np.array([[0.62, 0.095, 0.095, 0.095, 0.095]] * 2)
    assert classwise_ece([0, 1], p) == pytest.approx(0.162)
    assert expected_calibration_error([0, 1], p) == pytest.approx(0.12)
    # Uniform predictions on one image of each class are calibrated in every column (and top-1: argmax 0, 1 in 5)
    assert classwise_ece(list(range(5)), np.full((5, 5), 0.2)) == pytest.approx(0.0, abs=1e-12)
    assert classwise_ece([0, 1], p, n_bins=1) == pytest.approx(0.162)


def test_calibration_scores_and_their_paired_kernels():
    y, pa, pb, groups = _copied_cells(np.random.default_rng(12), 0.9, 0.7)
    scores = calibration_scores(y, pa)
    assert scores == pytest.approx({"ece": expected_calibration_error(y, pa), "classwise_ece": classwise_ece(y, pa),
                                    "brier": brier_score(y, pa), "log_loss": log_loss(y, pa, labels=list(range(5))),
                                    "accuracy": accuracy_score(y, pa.argmax(axis=1))})
    for key, score in (("brier", brier_score), ("classwise_ece", classwise_ece)):
        result = paired_comparison(y, pa, pb, groups, metric=key, n_boot=120, seed=6, n_perm=0)
        assert result["delta"] == pytest.approx(score(y, pa) - score(y, pb))
        # the weighted kernel equals the plain function on every resampled data set
        slow = bootstrap_ci(lambda yy, a, b: score(yy, a) - score(yy, b), y, pa, pb, groups=groups, n_boot=120, seed=6)
        assert result["ci"] == pytest.approx(slow, abs=1e-12), key
