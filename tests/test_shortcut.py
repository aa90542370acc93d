"""The background shortcut test: known answers from two tiny Keras models, one reading the border, one the cell."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.shortcut import (
    GLASS_RGB,
    SHORTCUT_MARGIN,
    background_only,
    cell_only,
    chance_accuracy,
    grow_masks,
    grow_pixels,
    reads_background,
    shortcut_test,
)

SIDE = 32
# Each class has its own slide (background) colour and its own cell colour. The first class's cell is much the
# lightest, so a model that reads the cell calls any empty glass that class: chance, not the slide's class.
BACKGROUNDS = np.array([(225, 200, 210), (200, 225, 210), (210, 200, 230), (230, 225, 195), (205, 215, 220)])
CELLS = np.array([(150, 140, 160), (60, 20, 110), (110, 30, 60), (30, 60, 130), (80, 70, 20)])


@pytest.fixture(scope="module")
def smears():
    """40 images per class: a class-coloured slide with a class-coloured round cell near the centre."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), 40)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    images, masks = [], []
    for k in labels:
        img = np.clip(BACKGROUNDS[k] + rng.normal(0, 3, (SIDE, SIDE, 3)), 0, 255)
        cy, cx = SIDE / 2 + rng.uniform(-2, 2, 2)
        cell = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(7, 10) ** 2
        img[cell] = np.clip(CELLS[k] + rng.normal(0, 3, (cell.sum(), 3)), 0, 255)
        images.append(img.astype(np.uint8))
        masks.append(cell)
    return np.stack(images), labels, np.stack(masks)


def _colour_reader(region: np.ndarray, centroids: np.ndarray) -> keras.Model:
    """A Keras model that averages the pixels of one fixed region and names the nearest class colour."""
    weight = (region / region.sum()).astype("float32")[None, :, :, None]
    inputs = keras.Input((SIDE, SIDE, 3))
    mean = keras.ops.sum(inputs * weight, axis=(1, 2))
    scale = 100.0  # distances of thousands of squared levels become near one-hot probabilities
    head = keras.layers.Dense(len(CLASSES), activation="softmax")
    outputs = head(mean)
    # -|x - c|² = 2 c·x - |c|² - |x|², and the softmax ignores the last term, shared by every class.
    head.set_weights([(2 * centroids.T / scale).astype("float32"),
                      (-(centroids ** 2).sum(axis=1) / scale).astype("float32")])
    return keras.Model(inputs, outputs)


def _predictor(model: keras.Model):
    return lambda images: np.asarray(model.predict_on_batch(images.astype("float32")), dtype=np.float64)


@pytest.fixture(scope="module")
def readers():
    border = np.ones((SIDE, SIDE), bool)
    border[3:-3, 3:-3] = False
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    centre = (yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 <= 16
    return {"border": _predictor(_colour_reader(border, BACKGROUNDS)),
            "cell": _predictor(_colour_reader(centre, CELLS))}


def test_a_model_that_reads_the_background_is_flagged(smears, readers):
    images, labels, masks = smears
    block, proba = shortcut_test(readers["border"], images, labels, masks, n_boot=200, seed=0)
    assert block["original"]["accuracy"] == 1.0
    assert block["background_only"]["accuracy"] == 1.0  # the cell is gone, the slide still names the class
    assert block["background_only"]["accuracy_ci"][0] > block["chance"] + SHORTCUT_MARGIN
    assert block["cell_only"]["accuracy"] == pytest.approx(0.2)  # on neutral glass it names one class for all
    assert block["flagged"] is True
    assert block["chance"] == pytest.approx(0.2) and block["empty_masks"] == 0
    assert set(proba) == {"background_only", "cell_only"} and proba["cell_only"].shape == (len(labels), 5)


def test_a_model_that_reads_the_cell_is_not_flagged(smears, readers):
    images, labels, masks = smears
    block, _ = shortcut_test(readers["cell"], images, labels, masks, n_boot=200, seed=0)
    assert block["original"]["accuracy"] == 1.0 and block["cell_only"]["accuracy"] == 1.0
    assert block["background_only"]["accuracy"] == pytest.approx(0.2)  # chance: the cell was all it read
    assert block["background_only"]["accuracy_ci"][0] <= block["chance"] + SHORTCUT_MARGIN
    assert block["flagged"] is False


def test_the_original_accuracy_can_come_from_the_test_pass(smears, readers):
    images, labels, masks = smears
    known = np.eye(5)[(labels + 1) % 5]  # a test pass that was always wrong
    block, _ = shortcut_test(readers["cell"], images, labels, masks, original_proba=known, n_boot=0, seed=0)
    assert block["original"]["accuracy"] == 0.0 and block["cell_only"]["accuracy"] == 1.0


def test_background_only_leaves_nothing_of_the_cell_and_cell_only_nothing_of_the_slide(smears):
    images, _, masks = smears
    bg, cell = background_only(images[:10], masks[:10]), cell_only(images[:10], masks[:10])
    grown = grow_masks(masks[:10], grow_pixels(SIDE))
    for img, b, c, m, g in zip(images[:10], bg, cell, masks[:10], grown):
        fill = np.median(img[~g], axis=0).round()
        assert np.all(b[g] == fill) and np.array_equal(b[~g], img[~g])
        assert np.all(c[~m] == GLASS_RGB) and np.array_equal(c[m], img[m])
    assert grown.sum() > masks[:10].sum()  # grown over the cell's rim


def test_an_image_without_a_cell_is_left_as_it_is():
    images = np.random.default_rng(1).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    empty = np.zeros((2, 8, 8), bool)
    assert np.array_equal(background_only(images, empty), images)
    assert np.array_equal(cell_only(images, empty), images)


def test_chance_is_the_share_of_the_most_common_class_and_the_flag_reads_the_lower_bound():
    assert chance_accuracy([0, 1, 2, 3, 4]) == pytest.approx(0.2)
    assert chance_accuracy([0, 0, 0, 1]) == pytest.approx(0.75)
    assert reads_background({"accuracy": 0.6, "accuracy_ci": [0.31, 0.8]}, 0.2)
    assert not reads_background({"accuracy": 0.6, "accuracy_ci": [0.29, 0.8]}, 0.2)
    assert reads_background({"accuracy": 0.6, "accuracy_ci": [float("nan")] * 2}, 0.2)  # no interval: the value


def test_masks_of_another_shape_are_refused(smears, readers):
    images, labels, masks = smears
    with pytest.raises(ValueError, match="masks"):
        shortcut_test(readers["cell"], images, labels, masks[:, :16], n_boot=0)
