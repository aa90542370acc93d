"""Grad-CAM tests on a small CNN whose class evidence sits at a known place in each image.

Class 0 images carry a red blob, class 1 a blue blob, each at a random place; every image also carries a
green blob that says nothing about the class. A faithful explanation must point at the coloured blob.
Deletion is normalised on a fixed-weight network whose output depends on one known corner only, and the
explanation set is checked to be stratified, seeded and the same for two different models.
"""

import json
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from bloodcell_lib import explain
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.cost import compiled_forward
from bloodcell_lib.errors import ConfigError, ModelError
from bloodcell_lib.evaluation import explain_model, explanation_set
from bloodcell_lib.explain import (
    METHODS,
    SCORE_KEYS,
    default_layer,
    deletion_auc,
    explain_summary,
    explanation_scores,
    feature_grid,
    focus_score,
    gradcam_heatmaps,
    gradcam_side_by_side,
    heatmaps_by_method,
    overlay_heatmap,
    random_deletion_auc,
    random_order_heatmaps,
    randomised_copy,
    randomised_heatmaps,
    sanity_check,
    spearman_per_image,
    summarise_explanations,
)
from bloodcell_lib.model import build_model
from bloodcell_lib.pipeline import load_images
from bloodcell_lib.registry import ARCHITECTURES
from bloodcell_lib.results import PROB_COLUMNS, GradcamExamples, explanations_path, write_gradcam
from bloodcell_lib.synthetic import TINY_SET, load_manifest, make_synthetic_dataset

from _tinynet import TINYNET

SIZE, RADIUS = 32, 4


def blob_images(n, seed):
    """Return (float32 images, labels, bool masks of the class blob)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.25, (n, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 2, n)
    masks = np.zeros((n, SIZE, SIZE), bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        while True:  # class blob and distractor apart from each other
            c, d = rng.integers(RADIUS + 1, SIZE - RADIUS - 1, (2, 2))
            if np.abs(c - d).max() > 2 * RADIUS + 2:
                break
        masks[i] = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= RADIUS ** 2
        x[i][masks[i], 0 if y[i] == 0 else 2] += 2.0
        x[i][(yy - d[0]) ** 2 + (xx - d[1]) ** 2 <= RADIUS ** 2, 1] += 2.0
    return x, y, masks


def small_cnn(name="blobnet"):
    inp = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    h = keras.layers.Dropout(0.2)(h)
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h), name=name)


@pytest.fixture(scope="module")
def blob():
    """A small CNN trained for a few seconds on blob images, plus held-out images and their blob masks."""
    keras.utils.set_random_seed(0)
    x, y, _ = blob_images(600, seed=0)
    model = small_cnn()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    xt, yt, masks = blob_images(48, seed=1)
    accuracy = model.evaluate(xt, yt, verbose=0)[1]
    assert accuracy > 0.95, f"the blob model did not learn ({accuracy:.2f}); the Grad-CAM tests would mean nothing"
    return model, xt, yt, masks


def reference_gradcam(model, image, cls, layer):
    """Plain per-image Grad-CAM on the logit, as in the keras-io example: the batched code must agree."""
    dense = model.layers[-1]
    grad_model = keras.Model(model.inputs[0], [model.get_layer(layer).output, dense.input])
    with tf.GradientTape() as tape:
        acts, h = grad_model(image[None], training=False)
        logit = (tf.matmul(h, dense.kernel) + dense.bias)[0, cls]
    grads = tape.gradient(logit, acts)[0].numpy()
    cam = np.maximum((acts[0].numpy() * grads.mean(axis=(0, 1))).sum(axis=-1), 0)
    cam = tf.image.resize(cam[..., None], image.shape[:2], method="bilinear").numpy()[..., 0]
    return cam / cam.max() if cam.max() > 0 else cam


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmaps_peak_on_the_class_blob(blob, method):
    model, x, _, masks = blob
    heat = gradcam_heatmaps(model, x, method=method)
    assert heat.shape == x.shape[:3] and heat.dtype == np.float32
    assert heat.min() >= 0.0 and np.allclose(heat.max(axis=(1, 2)), 1.0)
    peak = heat.reshape(len(x), -1).argmax(axis=1)
    assert masks.reshape(len(x), -1)[np.arange(len(x)), peak].mean() >= 0.9
    focus = focus_score(heat, masks)
    assert np.nanmean(focus) > 4.0 and np.nanmin(focus) > 2.0


def test_batched_equals_per_image(blob):
    model, x, _, _ = blob
    classes = model.predict(x, verbose=0).argmax(axis=1)
    batched = gradcam_heatmaps(model, x, batch_size=len(x))
    one_by_one = gradcam_heatmaps(model, x, batch_size=1)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    reference = np.stack([reference_gradcam(model, img, c, "last_conv") for img, c in zip(x[:6], classes[:6])])
    np.testing.assert_allclose(batched[:6], reference, atol=1e-4)
    plus = gradcam_heatmaps(model, x, method="gradcam++", batch_size=len(x))
    np.testing.assert_allclose(plus, gradcam_heatmaps(model, x, method="gradcam++", batch_size=5), atol=1e-5)


def test_class_indices_choose_the_explained_class(blob):
    model, x, y, _ = blob
    predicted = model.predict(x, verbose=0).argmax(axis=1)
    np.testing.assert_allclose(gradcam_heatmaps(model, x, class_indices=predicted), gradcam_heatmaps(model, x))
    other = gradcam_heatmaps(model, x, class_indices=1 - predicted)
    assert not np.allclose(other, gradcam_heatmaps(model, x), atol=0.05)


def test_randomised_model_gives_uncorrelated_maps(blob):
    model, x, _, masks = blob
    result = sanity_check(model, x)
    assert result["layer"] == "last_conv" and len(result["spearman_per_image"]) == len(x)
    assert result["spearman_mean"] < 0.3
    trained = gradcam_heatmaps(model, x)
    shuffled = randomised_copy(model, seed=0)
    random_maps = gradcam_heatmaps(shuffled, x, class_indices=model.predict(x, verbose=0).argmax(axis=1))
    assert np.nanmean(focus_score(random_maps, masks)) < 0.5 * np.nanmean(focus_score(trained, masks))
    # The copy is reproducible, keeps the layer names, and leaves the trained model untouched.
    again = randomised_copy(model, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shuffled.get_weights(), again.get_weights()))
    assert not np.array_equal(shuffled.get_layer("last_conv").get_weights()[0],
                              model.get_layer("last_conv").get_weights()[0])
    np.testing.assert_allclose(gradcam_heatmaps(model, x), trained)


def test_deletion_of_salient_pixels_drops_the_probability_faster_than_random(blob):
    model, x, _, _ = blob
    classes = model.predict(x, verbose=0).argmax(axis=1)
    heat = gradcam_heatmaps(model, x)
    guided = deletion_auc(model, x, heat, classes, steps=8)
    random = deletion_auc(model, x, np.random.default_rng(0).random(heat.shape), classes, steps=8)
    assert guided.shape == (len(x),) and np.all((guided >= 0) & (guided <= 1))
    assert guided.mean() < random.mean() - 0.1
    blurred = deletion_auc(model, x, heat, classes, steps=8, baseline_value="blur")
    assert blurred.mean() < random.mean()


def test_explain_summary_is_json_ready(blob):
    model, x, _, masks = blob
    summary = explain_summary(model, x[:16], masks[:16], method="gradcam++", steps=5, n_boot=200)
    assert {"method", "layer", "focus_mean", "focus_median", "deletion_auc_mean", "sanity_spearman_mean",
            "n_images", "deletion_auc_random_mean", "bootstrap", "n_defined"} <= set(summary)
    assert all(key in summary and len(summary[f"{key}_ci"]) == 2 for key in SCORE_KEYS)
    assert summary["n_images"] == 16 and summary["layer"] == "last_conv" and summary["method"] == "gradcam++"
    assert summary["deletion_steps"] == 5 and summary["random_order"].startswith("seeded, on the layer's 16×16 grid")
    assert summary["focus_mean"] > 2 and summary["deletion_auc_mean"] < summary["deletion_auc_random_mean"]
    assert summary["deletion_auc_normalised"] == pytest.approx(summary["deletion_auc"] / summary["deletion_auc_random"])
    low, high = summary["deletion_auc_normalised_ci"]
    assert low <= summary["deletion_auc_normalised"] <= high < 1.0  # the blob maps beat a random order
    json.dumps(summary)
    # Precomputed heatmaps are used as given (explaining the predicted class); no masks → no focus number.
    heat = gradcam_heatmaps(model, x[:16], method="gradcam++")
    reused = explain_summary(model, x[:16], None, method="gradcam++", steps=5, heatmaps=heat, n_boot=0)
    assert reused["focus_mean"] is None and reused["n_defined"]["focus"] == 0
    assert reused["deletion_auc_mean"] == pytest.approx(summary["deletion_auc_mean"], abs=1e-6)
    assert reused["sanity_spearman_mean"] == pytest.approx(summary["sanity_spearman_mean"], abs=1e-6)
    assert np.isnan(reused["deletion_auc_ci"]).all()  # no resamples, no interval


REGION = 8  # the top-left REGION×REGION corner is all region_net looks at


def region_net():
    """Fixed weights: class 0's logit margin is 4·(sum of the corner's channel means) − 6, so a corner of ones gives
    p ≈ 1 and a corner replaced by the image's mean p ≈ 0; no other pixel matters."""
    inp = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Cropping2D(((0, SIZE - REGION), (0, SIZE - REGION)))(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h), name="regionnet")
    model.layers[-1].set_weights([np.array([[2.0, -2.0]] * 3), np.array([-3.0, 3.0])])
    return model


def test_deletion_normalised_by_random_order_is_low_for_the_decisive_pixels_and_one_for_a_random_map():
    model = region_net()
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.3, (96, SIZE, SIZE, 3)).astype("float32")
    x[:, :REGION, :REGION] += 1.0
    classes = np.zeros(len(x), int)
    assert model.predict(x, verbose=0)[:, 0].min() > 0.95
    decisive = np.zeros(x.shape[:3], np.float32)
    decisive[:, :REGION, :REGION] = 1.0
    decisive += 0.01 * rng.random(decisive.shape, dtype=np.float32)  # ranks the corner first, the rest at random
    reference = random_deletion_auc(model, x, classes, seed=0)
    guided = deletion_auc(model, x, decisive, classes)
    assert guided.mean() / reference.mean() < 0.25  # the corner goes in the first step: the probability collapses
    random_map = deletion_auc(model, x, rng.random(decisive.shape, dtype=np.float32), classes, seed=1)
    assert random_map.mean() / reference.mean() == pytest.approx(1.0, abs=0.1)
    # On a coarse grid (blobs deleted, as Grad-CAM's upsampled maps delete) a random map of blobs is worth 1 too.
    blobs = random_deletion_auc(model, x, classes, seed=2, grid=(8, 8))
    random_blobs = deletion_auc(model, x, random_order_heatmaps(len(x), SIZE, SIZE, (8, 8), seed=9), classes)
    assert random_blobs.mean() / blobs.mean() == pytest.approx(1.0, abs=0.15)
    # The reference takes the steps and baseline asked for, like the map's curve.
    zero = random_deletion_auc(model, x, classes, steps=4, baseline_value=0.0, seed=0)
    assert not np.allclose(zero, reference)
    assert deletion_auc(model, x, decisive, classes, steps=4, baseline_value=0.0).mean() / zero.mean() < 0.4
    np.testing.assert_array_equal(reference, random_deletion_auc(model, x, classes, seed=0))  # seeded


def test_random_order_heatmaps_are_seeded_and_follow_the_grid():
    maps = random_order_heatmaps(3, 16, 16, seed=5)
    assert maps.shape == (3, 16, 16) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    np.testing.assert_array_equal(maps, random_order_heatmaps(3, 16, 16, seed=5))
    assert not np.array_equal(maps, random_order_heatmaps(3, 16, 16, seed=6))
    coarse = random_order_heatmaps(3, 16, 16, grid=(2, 2), seed=5)
    # Bilinear from a 2×2 grid: each quadrant's corner pixel holds its grid value, and the map is smooth.
    assert np.abs(np.diff(coarse, axis=1)).max() < 0.1 and len(np.unique(coarse[:, 0, 0])) == 3
    np.testing.assert_array_equal(random_order_heatmaps(2, 8, 8, grid=(8, 8), seed=1),
                                  random_order_heatmaps(2, 8, 8, seed=1))  # a grid as fine as the image: pixels


def test_summary_values_and_group_bootstrap_intervals_by_hand():
    scores = pd.DataFrame({"focus": [2.0, 2.0, 2.0, np.nan], "deletion_auc": [0.0, 0.0, 0.0, 1.0],
                           "deletion_auc_random": [0.5, 0.5, 0.5, 0.5], "deletion_auc_normalised": [0, 0, 0, 2.0],
                           "sanity_spearman": [0.1, 0.1, 0.1, 0.1]})
    groups = ["a", "a", "a", "b"]  # three copies of one cell and one other cell
    summary = summarise_explanations(scores, groups, n_boot=2000, seed=0)
    assert summary["focus"] == 2.0 and summary["n_defined"]["focus"] == 3 and summary["focus_ci"] == [2.0, 2.0]
    assert summary["deletion_auc"] == 0.25 and summary["deletion_auc_random"] == 0.5
    assert summary["deletion_auc_normalised"] == 0.5  # ratio of the means, not the mean of the ratios (0.5 here too)
    assert summary["sanity_spearman_ci"] == pytest.approx([0.1, 0.1])
    # Resampling cells: a draws {a,a}, {a,b}, {b,b} (¼, ½, ¼) → deletion means 0, ¼, 1; the interval spans [0, 1].
    assert summary["deletion_auc_ci"] == [0.0, 1.0] and summary["bootstrap"]["unit"] == "group"
    # Resampling images as if independent: four 1s in a draw are rare (1/256), so the top stays at ¾.
    assert summarise_explanations(scores, None, n_boot=2000, seed=0)["deletion_auc_ci"] == [0.0, 0.75]
    json.dumps(summary, allow_nan=True)


def _split_frame(seed=0):
    """A split: every class 6 test images (3 cells × 2 copies) except 2 basophils, plus train and val rows."""
    rows = []
    for name in CLASSES:
        cells = 1 if name == "basophil" else 3
        rows += [(f"{name}/t{c}_{k}.jpg", name, f"{name}-t{c}", "test") for c in range(cells) for k in range(2)]
        rows += [(f"{name}/{s}{i}.jpg", name, f"{name}-{s}{i}", s) for s in ("train", "val") for i in range(4)]
    frame = pd.DataFrame(rows, columns=["path", "label", "group", "subset"])
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_explanation_set_is_stratified_seeded_and_a_function_of_the_test_rows_alone():
    split = _split_frame()
    chosen = explanation_set(split, 12, seed=3)
    counts = chosen["label"].value_counts()
    assert len(chosen) == 12 and set(chosen["subset"]) == {"test"} and chosen["path"].is_unique
    assert counts["basophil"] == 2 and sorted(counts.drop("basophil")) == [2, 2, 3, 3]  # scarce: the rest fill up
    assert list(chosen["label"]) == sorted(chosen["label"], key=CLASSES.index)  # grouped by class
    # One image per cell before any second copy: up to three picks of a class are different cells (the basophils
    # are two copies of one cell, all there is).
    assert all(chosen[chosen["label"] == c]["group"].is_unique for c in counts.index if c != "basophil")
    # Deterministic, independent of the split file's row order, changed by the seed.
    assert chosen["path"].tolist() == explanation_set(_split_frame(seed=1), 12, seed=3)["path"].tolist()
    assert chosen["path"].tolist() != explanation_set(split, 12, seed=4)["path"].tolist()
    # A smaller set is the first of each class of the larger one.
    assert set(explanation_set(split, 5, seed=3)["path"]) <= set(chosen["path"])
    assert len(explanation_set(split, 1000, seed=3)) == (split["subset"] == "test").sum()


def test_every_model_is_explained_on_the_same_set_whatever_it_predicts(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, TINYNET.key, TINYNET)
    manifest = load_manifest(tiny_set)
    split = pd.DataFrame({"path": manifest["file"], "label": manifest["class"], "group": manifest["cell_id"],
                          "subset": "test"})
    split.attrs["data_root"] = str(tiny_set)
    true = split["label"].map(CLASSES.index).to_numpy()
    blocks = []
    for seed, shift in ((0, 0), (1, 2)):  # two different networks, one right, one wrong on every image
        keras.utils.set_random_seed(seed)
        model = build_model("tinynet", image_size=32, weights=None)
        proba = np.eye(len(CLASSES))[(true + shift) % len(CLASSES)]
        frame = pd.DataFrame({"path": split["path"], "true_label": split["label"],
                              "pred_label": [CLASSES[i] for i in proba.argmax(axis=1)], "group": split["group"],
                              **dict(zip(PROB_COLUMNS, proba.T))})
        out = tmp_path / f"run{seed}"
        out.mkdir()
        blocks.append(explain_model(model, split, frame, out, "tinynet", 10, seed=7, make_figures=False, n_boot=50))
        per_image = pd.read_csv(explanations_path(out, "tinynet"))
        assert per_image["path"].tolist() == blocks[-1]["image_paths"]
        assert [f"gradcam_{k}" for k in SCORE_KEYS] == [c for c in per_image.columns if c.startswith("gradcam_")]
        assert (per_image["pred_label"] == frame.set_index("path").loc[per_image["path"], "pred_label"].values).all()
    first, second = blocks
    assert first["image_paths"] == second["image_paths"] and first["image_set"] == second["image_set"]
    assert first["image_set"]["per_class"] == {name: 2 for name in CLASSES} and first["image_set"]["n_groups"] == 10
    assert first["image_paths"] == explanation_set(split, 10, seed=7)["path"].tolist()
    for block in blocks:
        for method in ("gradcam", "gradcam++"):
            assert block[method]["n_images"] == 10 and block[method]["bootstrap"]["unit"] == "group"
            assert all(len(block[method][f"{key}_ci"]) == 2 for key in SCORE_KEYS)
    assert first["gradcam"]["deletion_auc_random"] == first["gradcam++"]["deletion_auc_random"]  # one reference
    assert feature_grid(model) == (32, 32)


def test_saved_and_reloaded_model_gives_the_same_maps(blob, tmp_path):
    model, x, _, _ = blob
    path = tmp_path / "blobnet.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(gradcam_heatmaps(loaded, x[:8]), gradcam_heatmaps(model, x[:8]), atol=1e-5)


# The fast paths (both methods from one pass, eager passes, one shared randomised copy, deletion batched across steps,
# a shared traced forward) must give the numbers of the path before them: one traced pass per method, a randomised
# copy per method, one deletion step per forward pass.


def separate_traced_maps(model, x, classes=None, layer=None):
    """The previous path: one traced Grad-CAM pass per method."""
    return {method: gradcam_heatmaps(model, x, classes, layer, method, eager=False) for method in METHODS}


def step_by_step_deletion_auc(model, x, heat, classes, steps=explain.DELETION_STEPS, baseline_value=None, seed=0):
    """deletion_auc as it was computed before: every image at one step per forward pass, traced forward."""
    n, h, w = x.shape[:3]
    base = explain._deletion_baseline(x, baseline_value)
    flat = np.asarray(heat, np.float32).reshape(n, -1)
    order = np.lexsort((np.random.default_rng(seed).random(flat.shape), -flat), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(h * w)[None, :].repeat(n, axis=0), axis=-1)
    rank = rank.reshape(n, h, w, 1)
    forward = compiled_forward(model, x.shape[1:])
    curve = np.stack([np.asarray(forward(np.where(rank < int(round(k * h * w / steps)), base, x)),
                                 np.float64)[np.arange(n), classes] for k in range(steps + 1)])
    return (curve[:-1] + curve[1:]).sum(axis=0) / (2.0 * steps)


@pytest.fixture
def tinynet(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, TINYNET.key, TINYNET)
    keras.utils.set_random_seed(5)
    return build_model("tinynet", image_size=SIZE, weights=None)


@pytest.mark.parametrize("net", ["blob", "tinynet"])
def test_eager_and_one_pass_heatmaps_equal_one_traced_pass_per_method(blob, tinynet, net):
    model, x = (blob[0], blob[1][:20]) if net == "blob" else (tinynet, blob_images(12, seed=4)[0] * 60.0)
    layer = default_layer(model)
    predicted = np.asarray(model(x, training=False)).argmax(axis=1)
    for classes in (None, (predicted + 1) % int(model.outputs[0].shape[-1])):
        reference = separate_traced_maps(model, x, classes, layer)
        for eager in (True, False):
            shared = heatmaps_by_method(model, x, classes, layer, eager=eager, batch_size=7)
            assert list(shared) == list(METHODS)
            for method in METHODS:
                np.testing.assert_allclose(shared[method], reference[method], atol=1e-5, err_msg=f"{method} {eager}")
                np.testing.assert_allclose(gradcam_heatmaps(model, x, classes, layer, method, eager=eager),
                                           reference[method], atol=1e-5)
    assert not np.allclose(reference["gradcam"], reference["gradcam++"], atol=1e-3)  # two methods, two answers


def test_one_randomised_copy_for_both_methods_gives_the_sanity_numbers_of_one_copy_each(blob):
    model, x, _, _ = blob
    x = x[:16]
    classes = model.predict(x, verbose=0).argmax(axis=1)
    maps = heatmaps_by_method(model, x, classes)
    shared = randomised_heatmaps(model, x, classes, seed=3)
    for method in METHODS:
        before = spearman_per_image(maps[method], gradcam_heatmaps(randomised_copy(model, seed=3), x, classes,
                                                                   method=method, eager=False))
        scores = explanation_scores(model, x, None, classes, method=method, seed=3, steps=4, heatmaps=maps[method],
                                    random_heatmaps=shared[method])
        own_copy = explanation_scores(model, x, None, classes, method=method, seed=3, steps=4, heatmaps=maps[method])
        np.testing.assert_allclose(scores["sanity_spearman"], before, atol=1e-4)
        pd.testing.assert_frame_equal(scores, own_copy)
    assert sanity_check(model, x, seed=3)["spearman_mean"] == pytest.approx(
        float(np.nanmean(spearman_per_image(maps["gradcam"], shared["gradcam"]))), abs=1e-4)
    with pytest.raises(ValueError, match="randomised maps"):
        explanation_scores(model, x, None, classes, heatmaps=maps["gradcam"], random_heatmaps=shared["gradcam"][:3])


@pytest.mark.parametrize("baseline", [None, "blur", 0.5])
def test_deletion_batched_across_steps_equals_one_step_per_pass(blob, baseline):
    model, x, _, _ = blob
    x = x[:13]
    classes = model.predict(x, verbose=0).argmax(axis=1)
    heat = gradcam_heatmaps(model, x)
    before = step_by_step_deletion_auc(model, x, heat, classes, steps=5, baseline_value=baseline, seed=2)
    traced = compiled_forward(model)
    for batch_size, forward in ((1, None), (6, traced), (1000, lambda b: model(b, training=False))):
        np.testing.assert_allclose(deletion_auc(model, x, heat, classes, 5, baseline, batch_size, seed=2,
                                                forward=forward), before, atol=1e-6)
    assert traced.experimental_get_tracing_count() == 1


def test_explain_model_gives_the_numbers_of_the_one_method_at_a_time_path(tiny_set, tmp_path, tinynet, monkeypatch):
    manifest = load_manifest(tiny_set)
    split = pd.DataFrame({"path": manifest["file"], "label": manifest["class"], "group": manifest["cell_id"],
                          "subset": "test"})
    split.attrs["data_root"] = str(tiny_set)
    model = tinynet
    rows = explanation_set(split, 10, seed=7)
    images, _, paths = load_images(rows, "test", SIZE)
    x = TINYNET.network_input(images)
    proba = np.asarray(model(TINYNET.network_input(load_images(split, "test", SIZE)[0]), training=False))
    frame = pd.DataFrame({"path": split["path"], "true_label": split["label"], "group": split["group"],
                          "pred_label": [CLASSES[i] for i in proba.argmax(axis=1)], **dict(zip(PROB_COLUMNS, proba.T))})
    copies = []
    monkeypatch.setattr(explain, "randomised_copy", lambda *a, **k: copies.append(1) or randomised_copy(*a, **k))
    forward = compiled_forward(model)
    block = explain_model(model, split, frame, tmp_path, "tinynet", 10, seed=7, make_figures=False, n_boot=20,
                          forward=forward)
    assert len(copies) == 1 and forward.experimental_get_tracing_count() == 1  # one copy; the shared graph reused
    per_image = pd.read_csv(explanations_path(tmp_path, "tinynet"))
    assert per_image["path"].tolist() == paths == block["image_paths"]
    pred = per_image["pred_label"].map(CLASSES.index).to_numpy()
    random_maps = random_order_heatmaps(len(x), SIZE, SIZE, feature_grid(model), seed=7)
    random_auc = step_by_step_deletion_auc(model, x, random_maps, pred, seed=7)
    for method, heat in separate_traced_maps(model, x, pred).items():
        deletion = step_by_step_deletion_auc(model, x, heat, pred, seed=7)
        rho = spearman_per_image(heat, gradcam_heatmaps(randomised_copy(model, seed=7), x, pred, method=method,
                                                        eager=False))
        for key, before in (("deletion_auc", deletion), ("deletion_auc_random", random_auc), ("sanity_spearman", rho)):
            np.testing.assert_allclose(per_image[f"{method}_{key}"], before, atol=1e-5, err_msg=f"{method} {key}")


@pytest.mark.slow  # a full ResNet50
def test_flat_keras_applications_model_before_and_after_saving(tmp_path):
    """Built like model.py builds it: the base takes input_tensor, so its conv layers are the model's own."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((64, 64, 3))
    base = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=inp)
    h = keras.layers.Dropout(0.3)(keras.layers.GlobalAveragePooling2D()(base.output))
    model = keras.Model(inp, keras.layers.Dense(5, activation="softmax")(h), name="resnet50")
    assert default_layer(model) == "conv5_block3_out"
    x = np.random.default_rng(0).normal(0, 50, (4, 64, 64, 3)).astype("float32")
    heat = gradcam_heatmaps(model, x, layer="conv5_block3_out", method="gradcam++")
    assert heat.shape == (4, 64, 64) and 0 <= heat.min() and heat.max() <= 1
    model.save(tmp_path / "resnet50.keras")
    loaded = keras.models.load_model(tmp_path / "resnet50.keras", safe_mode=True)
    again = gradcam_heatmaps(loaded, x, layer="conv5_block3_out", method="gradcam++")
    np.testing.assert_allclose(again, heat, atol=1e-4)


def test_missing_layer_and_unknown_method_are_clear_errors(blob):
    model, x, _, _ = blob
    with pytest.raises(ModelError, match="no layer 'conv5_block3_out'.*last_conv"):
        gradcam_heatmaps(model, x[:2], layer="conv5_block3_out")
    with pytest.raises(ModelError, match="not a 4-D"):
        gradcam_heatmaps(model, x[:2], layer="pool")
    with pytest.raises(ValueError, match="0..1"):
        gradcam_heatmaps(model, x[:2], class_indices=[0, 2])
    with pytest.raises(ConfigError, match="gradcam, gradcam\\+\\+"):
        gradcam_heatmaps(model, x[:2], method="lime")
    assert default_layer(model) == "last_conv"
    pooled = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"),
                               keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(2)])
    assert default_layer(pooled) == "conv"  # a 4-D pooling output is not a feature map to explain
    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")], name="mlp")
    with pytest.raises(ModelError, match="no 4-D"):
        default_layer(dense_only)


def test_focus_score_by_hand():
    mask = np.zeros((10, 10), bool)
    mask[:5, :4] = True  # a fifth of the image
    inside = np.where(mask, 1.0, 0.0)
    half = np.where(mask, 1.0, 0.0) + np.where(~mask, 0.25, 0.0)  # energy 20 inside, 20 outside
    maps = np.stack([np.ones((10, 10)), inside, half, np.zeros((10, 10))])
    np.testing.assert_allclose(focus_score(maps, mask), [1.0, 5.0, 2.5, np.nan])
    assert np.isnan(focus_score(np.ones((1, 10, 10)), np.zeros((1, 10, 10), bool))[0])
    with pytest.raises(ValueError, match="do not match"):
        focus_score(maps, np.zeros((2, 10, 10), bool))


def test_spearman_per_image():
    a = np.arange(16.0).reshape(1, 4, 4)
    maps = np.concatenate([a, a, a])
    np.testing.assert_allclose(spearman_per_image(maps, np.concatenate([a ** 3, -a, np.ones_like(a)])),
                               [1.0, -1.0, np.nan])


def test_overlay_heatmap_is_rgb_with_hot_in_red():
    image = np.full((20, 30, 3), 128, np.uint8)
    heat = np.zeros((10, 15), np.float32)
    heat[:, 8:] = 1.0  # smaller than the image: resized
    out = overlay_heatmap(image, heat, alpha=0.6)
    assert out.shape == image.shape and out.dtype == np.uint8
    hot, cold = out[10, 25].astype(int), out[10, 2].astype(int)
    assert hot[0] > hot[2] + 30 and cold[2] > cold[0] + 30
    assert np.array_equal(overlay_heatmap(image, heat, alpha=0.0), image)
    with pytest.raises(ValueError, match="uint8"):
        overlay_heatmap(image.astype(np.float32), heat)


def _saved_examples(folder, run, name, data, order, size=40):
    """Write `<run>_gradcam.npz` for the manifest rows at `order`: true class, a wrong prediction for odd rows."""
    rows = load_manifest(data).iloc[order]
    true = rows["class"].map(CLASSES.index).to_numpy()
    pred = np.where(np.arange(len(rows)) % 2, (true + 1) % len(CLASSES), true)
    heat = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (len(rows), 16, 1))
    write_gradcam(folder, GradcamExamples(run=run, display_name=name, data_root=str(data), paths=list(rows["file"]),
                                          true=true, pred=pred, heatmaps=heat, image_size=size, layer="conv",
                                          method="gradcam"))
    return dict(zip(rows["file"], zip(true, pred)))


def test_side_by_side_draws_the_saved_examples_every_model_shares(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic_dataset(data, seed=1, **TINY_SET)
    out.mkdir()
    assert isinstance(gradcam_side_by_side(out), str)  # nothing saved yet: a sentence, not a figure
    per_class = TINY_SET["per_class"] * (1 + TINY_SET["duplicates"])
    firsts = [k * per_class + i for k in range(len(CLASSES)) for i in range(3)]  # three of each class
    vgg = _saved_examples(out, "vgg16", "VGG16", data, firsts)
    _saved_examples(out, "resnet50", "ResNet50", data, [i for i in firsts[::-1] if i != firsts[2]], size=32)
    fig = gradcam_side_by_side(out, per_class=2)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 2 * 2 * len(CLASSES)  # registry order: VGG16's row, then ResNet50's
    assert [ax.get_title().split("\n")[0] for ax in shown] == ["VGG16"] * 10 + ["ResNet50"] * 10
    assert shown[0].images[0].get_array().shape[:2] == (40, 40)  # each model's own image size
    assert shown[10].images[0].get_array().shape[:2] == (32, 32)
    # VGG16's first two of each class, all of which ResNet50 explained too; right in green, wrong in red.
    expected = [v for k in range(len(CLASSES)) for v in list(vgg.values())[3 * k:3 * k + 2]]
    for ax, (true, pred) in zip(shown[:10], expected):
        assert ax.get_title().endswith(f"true {CLASSES[true]}\npred {CLASSES[pred]}")
        assert ax.title.get_color() == ("green" if true == pred else "red")
    # ResNet50 (another order) lacks VGG16's third basophil: the figure shows only images both explained.
    three = gradcam_side_by_side(out, per_class=3, runs=["vgg16", "resnet50"])
    assert len([ax for ax in three.axes if ax.images]) == 2 * (3 * len(CLASSES) - 1)
    # Images that moved since evaluation are found with data_dir.
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    assert len(gradcam_side_by_side(out, runs=["vgg16"], data_dir=moved).axes) >= len(CLASSES)


@pytest.mark.parametrize("pool, defined", [(SIZE, False), (SIZE // 2, True)])
def test_a_map_of_one_cell_is_marked_undefined_not_scored(pool, defined):
    # DenseNet201 at 48 px explains a 1×1 layer: one value per image, a flat map. Its focus (1 by construction) and
    # deletion ÷ random (1: both orders are the pixels' index order) would read as findings; they are not defined.
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    h = keras.layers.AveragePooling2D(pool, name="last_conv")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h), name="onecell")
    x, y, masks = blob_images(6, seed=3)
    scores = explanation_scores(model, x, masks, y, layer="last_conv", steps=4)
    assert np.isfinite(scores["deletion_auc"]).all() and np.isfinite(scores["deletion_auc_random"]).all()
    undefined = ["focus", "deletion_auc_normalised", "sanity_spearman"]
    if defined:
        # a 2×2 map is scored (its focus may be NaN by itself: an untrained net's map can be all zero)
        assert np.isfinite(scores["deletion_auc_normalised"]).all() and "undefined" not in scores.attrs
    else:
        assert scores[undefined].isna().all().all()
        assert "1×1" in scores.attrs["undefined"]
        summary = summarise_explanations(scores, n_boot=50)
        assert summary["focus"] is None and summary["deletion_auc_normalised"] is None
        assert "1×1" in summary["undefined"]
