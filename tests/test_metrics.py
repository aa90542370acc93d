import math
import time

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score, roc_auc_score

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.metrics import (
    SCALAR_KEYS,
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    mcnemar_p,
    mcnemar_table,
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
