"""Grad-CAM and Grad-CAM++ heatmaps, overlays, and explanation quality as numbers (focus, deletion, sanity).

Models are shown side by side from the examples each evaluation saved (gradcam_side_by_side), never recomputed.
The numbers come per image (explanation_scores: focus on the cell, deletion AUC, the same with a random deletion
order, their ratio, sanity correlation) and as means with group-bootstrap intervals (summarise_explanations).

Heatmaps are computed for whole batches: one forward and one backward pass per batch, never a Python
loop per image. This is correct because in inference mode every image's class score depends only on
its own activations, so the gradient of the *sum* of the batch's scores is each image's own gradient.
The class score is the pre-softmax logit (recovered from the final Dense layer): gradients of a
saturated softmax probability vanish and give empty maps for confidently classified cells.

Grad-CAM and Grad-CAM++ weight the same activations and gradients differently, so every method asked for comes from
one pass (heatmaps_by_method); the sanity test's randomised copy is made once and explains every method
(randomised_heatmaps). Eager or traced: tracing the Grad-CAM or forward graph of a deep network costs 5-10 s
(DenseNet201) and pays off only over many calls; an eager call costs a second or two of Python per pass. So a pass
runs eagerly when its images hold at most EAGER_MAX_PIXELS pixels in all (images × height × width: one batch of 32
images of 96×96 — the smoke and demo profiles) and is traced above that (the paper profile: 100 images at 224-300
px, as before); `eager=` overrides the rule. Deletion curves run on a forward pass the caller may share
(`forward=`, e.g. cost.compiled_forward, which evaluation traces once for the cost and the curves alike).
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.figure import Figure
from scipy.stats import rankdata

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import DEFAULT_BOOTSTRAP
from bloodcell_lib.cost import compiled_forward
from bloodcell_lib.errors import ConfigError, ModelError
from bloodcell_lib.figures import plot_image_grid
from bloodcell_lib.metrics import bootstrap_ci
from bloodcell_lib.pipeline import load_images
from bloodcell_lib.quiet import quiet_tensorflow
from bloodcell_lib.registry import ARCHITECTURES, get_arch
from bloodcell_lib.results import GradcamExamples, gradcam_path, load_gradcam

METHODS = ("gradcam", "gradcam++")
# The per-image explanation scores (explanation_scores), in the order results files and `<run>_explanations.csv`
# show them. Higher focus is better; lower is better for the deletion AUCs and the sanity correlation.
SCORE_KEYS: tuple[str, ...] = ("focus", "deletion_auc", "deletion_auc_random", "deletion_auc_normalised",
                               "sanity_spearman")
# Deletion curves remove the pixels in this many equal shares (the random order uses the same).
DELETION_STEPS = 10
# The random deletion order draws from its own stream of the seed, apart from deletion_auc's tie-breaking.
_RANDOM_ORDER_STREAM = 1
# A pass over at most this many pixels in all (images × height × width) runs eagerly, a larger one is traced
# (see the module docstring): one batch of 32 images of 96×96.
EAGER_MAX_PIXELS = 32 * 96 * 96


def gradcam_heatmaps(model, images: np.ndarray, class_indices: Sequence[int] | np.ndarray | None = None,
                     layer: str | None = None, method: str = "gradcam", batch_size: int = 32,
                     eager: bool | None = None) -> np.ndarray:
    """Return float32 N×H×W heatmaps in [0, 1], upsampled (bilinear) to the image size.

    images: preprocessed float32 N×H×W×3 (what the model takes). class_indices: the class explained per
    image; None → the predicted class. layer: a 4-D layer of the model; None → `default_layer(model)`.
    eager: True/False forces an eager or a traced pass; None → by EAGER_MAX_PIXELS (module docstring).
    """
    return heatmaps_by_method(model, images, class_indices, layer, (method,), batch_size, eager)[method]


def heatmaps_by_method(model, images: np.ndarray, class_indices: Sequence[int] | np.ndarray | None = None,
                       layer: str | None = None, methods: Sequence[str] = METHODS, batch_size: int = 32,
                       eager: bool | None = None) -> dict[str, np.ndarray]:
    """method → gradcam_heatmaps(..., method) for each of methods, all from one forward and backward pass per batch."""
    heat, _ = _heatmaps_and_classes(model, images, class_indices, layer, methods, batch_size, eager)
    return heat


def randomised_heatmaps(model, images: np.ndarray, class_indices: Sequence[int] | np.ndarray,
                        layer: str | None = None, methods: Sequence[str] = METHODS, seed: int = 0,
                        batch_size: int = 32, eager: bool | None = None) -> dict[str, np.ndarray]:
    """method → the heatmaps of randomised_copy(model, seed) for the given classes: the sanity test's reference.

    One copy explains every method (the copy is a function of the model and seed alone). class_indices: the classes
    the trained model's maps explain, so both explain the same class. layer None → default_layer(model).
    """
    layer = layer or default_layer(model)
    return heatmaps_by_method(randomised_copy(model, seed), images, class_indices, layer, methods, batch_size, eager)


def overlay_heatmap(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
                    colormap: int | None = None) -> np.ndarray:
    """Blend a colour-mapped heatmap over an RGB uint8 image and return RGB uint8 (JET by default)."""
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay_heatmap needs an H×W×3 uint8 RGB image, got {image.dtype} {image.shape}.")
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if heat.shape != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat8 = np.uint8(np.clip(heat, 0.0, 1.0) * 255.0 + 0.5)
    colour = cv2.cvtColor(cv2.applyColorMap(heat8, cv2.COLORMAP_JET if colormap is None else colormap),
                          cv2.COLOR_BGR2RGB)  # OpenCV colour maps are BGR; our images are RGB
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def gradcam_side_by_side(output_dir: str | Path, per_class: int = 1, runs: Sequence[str] | None = None,
                         data_dir: str | Path | None = None) -> Figure | str:
    """Figure: each evaluated model's Grad-CAM on the same test images (per_class of each class), a row per model.

    Drawn from the `<run>_gradcam.npz` files evaluation saved: no model is loaded and no heatmap recomputed.
    runs: None → every registry architecture with a saved file, in registry order. data_dir: where the images
    are now, when they moved since evaluation. Without any saved examples, a sentence saying so.
    """
    output_dir = Path(output_dir)
    runs = [run for run in (ARCHITECTURES if runs is None else runs) if gradcam_path(output_dir, run).is_file()]
    if not runs:
        return "No model in this folder has saved Grad-CAM examples yet (evaluation writes <run>_gradcam.npz)."
    saved = [load_gradcam(output_dir, run) for run in runs]
    paths = _shared_examples(saved, per_class)
    if not paths:
        return "The models' saved Grad-CAM examples share no test image; evaluate them on one split with one seed."
    images, titles, colours = [], [], []
    for examples in saved:
        rows = [examples.paths.index(path) for path in paths]
        chosen = pd.DataFrame({"path": paths, "label": [CLASSES[examples.true[i]] for i in rows], "subset": "test"})
        pictures, _, _ = load_images(chosen, "test", examples.image_size, data_root=data_dir or examples.data_root)
        for picture, i in zip(pictures, rows):
            true, pred = examples.true[i], examples.pred[i]
            images.append(overlay_heatmap(picture, examples.heatmaps[i].astype(np.float32)))
            titles.append(f"{examples.display_name}\ntrue {CLASSES[true]}\npred {CLASSES[pred]}")
            colours.append("green" if true == pred else "red")
    return plot_image_grid(images, titles, ncols=len(paths), title="Grad-CAM, same test images", colours=colours)


@dataclass(frozen=True)
class ImageExplanation:
    """One image explained: the uint8 image the model saw, its class probabilities and a heatmap per method."""

    image: np.ndarray  # uint8 S×S×3, at the model's input size
    probabilities: np.ndarray  # one per class of CLASSES
    heatmaps: dict[str, np.ndarray]  # method → float32 S×S in [0, 1], for the predicted class
    true_label: str | None = None

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The k most probable classes with their probabilities, most probable first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(CLASSES[i], float(self.probabilities[i])) for i in order]


def explain_image(model, image_uint8: np.ndarray, true_label: str | None = None,
                  layer: str | None = None) -> ImageExplanation:
    """Probabilities and every METHODS heatmap of the predicted class for one uint8 RGB image at the model's size."""
    image = np.asarray(image_uint8)
    spec = _registry_spec(model.name)
    batch = image[None]
    x = spec.network_input(batch) if spec is not None else batch.astype(np.float32)
    proba = _run_batched(_forward_pass(model, x, None), x, 1)[0]
    predicted = [int(np.argmax(proba))]
    heatmaps = {method: heat[0] for method, heat in heatmaps_by_method(model, x, predicted, layer).items()}
    return ImageExplanation(image, proba, heatmaps, true_label)


def plot_explanation(explanation: ImageExplanation, k: int = 3) -> Figure:
    """Figure: the image with its top-k classes, then each method's heatmap over it, side by side."""
    top = "\n".join(f"{name} {p:.2f}" for name, p in explanation.top(k))
    truth = f"true {explanation.true_label}\n" if explanation.true_label else ""
    predicted = explanation.top(1)[0][0]
    images = [explanation.image] + [overlay_heatmap(explanation.image, heat) for heat in explanation.heatmaps.values()]
    titles = [f"{truth}{top}"] + [f"{method}: {predicted}" for method in explanation.heatmaps]
    colour = "black" if explanation.true_label is None else ("green" if predicted == explanation.true_label else "red")
    return plot_image_grid(images, titles, ncols=len(images), colours=[colour] * len(images))


def focus_score(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: share of positive heatmap energy inside the mask ÷ the mask's share of the image.

    1 means no better than a uniform map, above 1 that the map concentrates on the cell. NaN when the
    map has no positive energy or the mask is empty. A single H×W mask applies to every image.
    """
    heat = np.maximum(np.asarray(heatmaps, dtype=np.float64), 0.0)
    if heat.ndim == 2:
        heat = heat[None]
    masks = np.asarray(masks, dtype=bool)
    masks = np.broadcast_to(masks, heat.shape) if masks.ndim == 2 else masks
    if masks.shape != heat.shape:
        raise ValueError(f"focus_score: masks {masks.shape} do not match heatmaps {heat.shape}; "
                         "resize the masks to the heatmap size (nearest neighbour) first.")
    total = heat.reshape(len(heat), -1).sum(axis=1)
    inside = (heat * masks).reshape(len(heat), -1).sum(axis=1)
    share = masks.reshape(len(masks), -1).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (inside / total) / share
    score[(total <= 0) | (share <= 0)] = np.nan
    return score


def deletion_auc(model, images: np.ndarray, heatmaps: np.ndarray, class_indices: Sequence[int] | np.ndarray,
                 steps: int = DELETION_STEPS, baseline_value: float | str | None = None, batch_size: int = 32,
                 seed: int = 0, forward=None) -> np.ndarray:
    """Per image: area under the class probability as the most salient pixels are removed (lower = better).

    Pixels are removed in `steps` equal shares, most salient first (ties in random order), and replaced
    by baseline_value: None → the image's per-channel mean, "blur" → a Gaussian-blurred copy, or a number.
    The curve runs over removed fractions 0..1; the (steps + 1) × N deleted images go through the model
    batch_size at a time. forward: the model's inference pass to use (e.g. cost.compiled_forward, shared by the
    caller); None → one eager or traced by EAGER_MAX_PIXELS.
    """
    x = np.asarray(images, dtype=np.float32)
    heat = np.asarray(heatmaps, dtype=np.float32)
    n, h, w = x.shape[:3]
    if heat.shape != (n, h, w):
        raise ValueError(f"deletion_auc: heatmaps {heat.shape} must be N×H×W = {(n, h, w)} like the images.")
    classes = np.asarray(class_indices, dtype=np.int64).reshape(-1)
    if len(classes) != n:
        raise ValueError(f"deletion_auc: {len(classes)} class indices for {n} images.")
    if steps < 1:
        raise ConfigError(f"deletion_auc: steps must be at least 1, got {steps}.")
    base = _deletion_baseline(x, baseline_value)
    rng = np.random.default_rng(seed)
    flat = heat.reshape(n, -1)
    order = np.lexsort((rng.random(flat.shape), -flat), axis=-1)  # most salient first, ties shuffled
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(h * w)[None, :].repeat(n, axis=0), axis=-1)
    rank = rank.reshape(n, h, w, 1)
    cuts = np.array([int(round(k * h * w / steps)) for k in range(steps + 1)])
    # Entry j of the flattened curve is step j // n of image j % n: batches run across steps, not one step at a time.
    curve = np.empty((steps + 1) * n, dtype=np.float64)
    forward = forward if forward is not None else _forward_pass(model, x, None, repeat=steps + 1)
    step = max(1, batch_size)
    with quiet_tensorflow():
        for start in range(0, len(curve), step):
            j = np.arange(start, min(start + step, len(curve)))
            k, i = j // n, j % n
            removed = rank[i] < cuts[k][:, None, None, None]
            deleted = np.where(removed, base[i] if len(base) == n else base, x[i])
            curve[j] = np.asarray(forward(deleted), dtype=np.float64)[np.arange(len(j)), classes[i]]
    curve = curve.reshape(steps + 1, n)
    return (curve[:-1] + curve[1:]).sum(axis=0) / (2.0 * steps)  # trapezoid rule over fractions 0..1


def random_order_heatmaps(n: int, height: int, width: int, grid: tuple[int, int] | None = None,
                          seed: int = 0) -> np.ndarray:
    """Float32 N×H×W maps in [0, 1] whose pixel ranking is a seeded random order: the reference deletion order.

    grid None → every pixel drawn on its own. grid (h, w) → uniform noise on an h×w grid, upsampled bilinearly as
    Grad-CAM upsamples its feature map: random deletion then removes blobs of the size Grad-CAM deletion removes,
    not scattered pixels (which a CNN tolerates differently), so the two curves differ only in where they delete.
    """
    rng = np.random.default_rng([seed, _RANDOM_ORDER_STREAM])
    if grid is None or (grid[0] >= height and grid[1] >= width):
        return rng.random((n, height, width), dtype=np.float32)
    coarse = rng.random((n, int(grid[0]), int(grid[1]), 1), dtype=np.float32)
    return tf.image.resize(coarse, (height, width), method="bilinear").numpy()[..., 0]


def random_deletion_auc(model, images: np.ndarray, class_indices: Sequence[int] | np.ndarray,
                        steps: int = DELETION_STEPS, baseline_value: float | str | None = None, batch_size: int = 32,
                        seed: int = 0, grid: tuple[int, int] | None = None, forward=None) -> np.ndarray:
    """Per image: deletion_auc with the pixels removed in a seeded random order (random_order_heatmaps).

    Same steps, baseline and explained class as the map's deletion: the AUC of a map that knows nothing, which
    deletion_auc_normalised divides by. grid: the explained layer's grid (feature_grid), None → pixel by pixel.
    forward: as for deletion_auc.
    """
    x = np.asarray(images, dtype=np.float32)
    maps = random_order_heatmaps(len(x), x.shape[1], x.shape[2], grid, seed)
    return deletion_auc(model, x, maps, class_indices, steps, baseline_value, batch_size, seed, forward)


def feature_grid(model, layer: str | None = None) -> tuple[int, int] | None:
    """(rows, columns) of the feature map Grad-CAM explains (layer None → default_layer); None when not fixed."""
    shape = _output_shape(_check_layer(model, layer or default_layer(model)))
    return None if shape[1] is None or shape[2] is None else (int(shape[1]), int(shape[2]))


def randomised_copy(model, seed: int = 0):
    """Return a clone of the model with every layer re-initialised from its own (seeded) initialisers.

    All layers are randomised at once, the last step of Adebayo et al.'s cascading randomisation.
    Re-initialising (not shuffling) keeps BatchNorm statistics consistent, so deep randomised networks
    stay numerically finite; seeding each layer from (seed, layer name) makes the copy reproducible.
    """
    def reinitialised(layer):
        config = layer.get_config()
        layer_seed = zlib.crc32(f"{seed}:{layer.name}".encode()) & 0x7FFFFFFF
        for key, value in config.items():
            if key.endswith("_initializer") and isinstance(value, dict) and "seed" in value.get("config", {}):
                value["config"]["seed"] = layer_seed
        return type(layer).from_config(config)

    return keras.models.clone_model(model, clone_function=reinitialised, recursive=True)


def sanity_check(model, images: np.ndarray, layer: str | None = None,
                 class_indices: Sequence[int] | np.ndarray | None = None, method: str = "gradcam",
                 heatmaps: np.ndarray | None = None, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """Model-randomisation test: Spearman correlation of the trained model's maps with a randomised copy's.

    A faithful explainer depends on the learned weights, so the correlation should be LOW. The randomised
    copy explains the same classes as the trained model (its predicted ones unless class_indices given).
    """
    layer = layer or default_layer(model)
    heatmaps, class_indices = _maps_and_classes(model, images, class_indices, heatmaps, layer, method, batch_size)
    rho = _randomisation_rho(model, images, heatmaps, class_indices, layer, method, seed, batch_size)
    return {
        "method": method,
        "layer": layer,
        "randomisation": "all layers re-initialised",
        "spearman_mean": _nan_stat(np.nanmean, rho),
        "spearman_median": _nan_stat(np.nanmedian, rho),
        "spearman_per_image": [None if np.isnan(r) else float(r) for r in rho],
    }


def explanation_scores(model, images: np.ndarray, masks: np.ndarray | None = None,
                       class_indices: Sequence[int] | np.ndarray | None = None, layer: str | None = None,
                       method: str = "gradcam", seed: int = 0, steps: int = DELETION_STEPS,
                       baseline_value: float | str | None = None, batch_size: int = 32,
                       heatmaps: np.ndarray | None = None, random_auc: np.ndarray | None = None,
                       random_heatmaps: np.ndarray | None = None, forward=None) -> pd.DataFrame:
    """One row per image: the SCORE_KEYS of one method's maps; the settings they were made with in `.attrs`.

    focus: focus_score on the masks (NaN without masks). deletion_auc: the class probability's area as the map's
    most salient pixels are removed. deletion_auc_random: the same with the pixels removed in a seeded random order
    on the explained layer's grid, same steps, baseline and class (random_deletion_auc; random_auc passes one
    computed for the same images and classes, e.g. shared by Grad-CAM and Grad-CAM++). deletion_auc_normalised:
    deletion_auc ÷ deletion_auc_random, 1 when the map finds the decisive pixels no faster than chance, lower is
    better (NaN when the random AUC is 0). sanity_spearman: rank correlation with a randomised copy's maps
    (random_heatmaps passes that copy's maps of the same images and classes, e.g. one copy's randomised_heatmaps
    shared by the methods). forward: the model's inference pass for the deletion curves (see deletion_auc).
    """
    layer = layer or default_layer(model)
    x = np.asarray(images, dtype=np.float32)
    forward = forward if forward is not None else _forward_pass(model, x, None, repeat=steps + 1)
    heatmaps, classes = _maps_and_classes(model, x, class_indices, heatmaps, layer, method, batch_size, forward)
    grid = feature_grid(model, layer)
    deletion = deletion_auc(model, x, heatmaps, classes, steps, baseline_value, batch_size, seed, forward)
    if random_auc is None:
        random_auc = random_deletion_auc(model, x, classes, steps, baseline_value, batch_size, seed, grid, forward)
    random_auc = np.asarray(random_auc, dtype=np.float64)
    if random_auc.shape != deletion.shape:
        raise ValueError(f"explanation_scores: {random_auc.shape} random-order AUCs for {len(x)} images.")
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = np.where(random_auc > 0, deletion / random_auc, np.nan)
    scores = pd.DataFrame({
        "focus": focus_score(heatmaps, masks) if masks is not None else np.full(len(x), np.nan),
        "deletion_auc": deletion,
        "deletion_auc_random": random_auc,
        "deletion_auc_normalised": normalised,
        "sanity_spearman": _randomisation_rho(model, x, heatmaps, classes, layer, method, seed, batch_size,
                                              random_heatmaps),
    }, columns=list(SCORE_KEYS))
    scores.attrs = {
        "method": method, "layer": layer, "deletion_steps": int(steps),
        "deletion_baseline": "per-image channel mean" if baseline_value in (None, "mean") else baseline_value,
        "random_order": (f"seeded, on the layer's {grid[0]}×{grid[1]} grid upsampled like Grad-CAM" if grid
                         else "seeded, pixel by pixel"),
    }
    if grid == (1, 1):
        # One value per image: the map is flat, so it points at no region. Its focus (1 by construction), its
        # deletion order (the pixels' index order, the same as the "random" one) and its rank correlation would
        # read as numbers about where the network looks; they are not defined.
        scores[["focus", "deletion_auc_normalised", "sanity_spearman"]] = np.nan
        scores.attrs["undefined"] = (f"the layer {layer} is 1×1 at {x.shape[1]}×{x.shape[2]} px: Grad-CAM gives one "
                                     f"value per image and cannot point at a region (a larger input size can)")
    return scores


def summarise_explanations(scores: pd.DataFrame, groups: Sequence[Any] | None = None,
                           n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """JSON-ready summary of explanation_scores: each SCORE_KEYS `<key>` with `<key>_ci`, a group-bootstrap interval.

    `<key>` is the mean over the images where the score is defined, except deletion_auc_normalised: the mean
    deletion AUC ÷ the mean random-order AUC (a ratio of means, not a mean of per-image ratios, because an image
    whose probability collapses at the first step whatever is removed has a random AUC near 0 and a per-image ratio
    that would swamp the mean; the per-image ratios stay in the scores). 1.0: the map removes the decisive pixels
    no faster than a random order does; lower is better; 0: the probability vanished at the first step.
    Intervals come from metrics.bootstrap_ci, resampling whole duplicate groups (groups: one id per image; None →
    every image its own), the same draws for every score. The legacy `*_mean`/`*_median` keys are kept for readers.
    """
    groups = None if groups is None else list(groups)
    summary: dict[str, Any] = {**scores.attrs, "n_images": int(len(scores))}
    columns = {key: scores[key].to_numpy(dtype=np.float64) for key in SCORE_KEYS}
    if scores.attrs.get("undefined"):  # a flat map (explanation_scores): its ratio of means is not defined either
        columns["deletion_auc_random"] = np.full(len(scores), np.nan)
    for key in SCORE_KEYS:
        arrays = ((columns["deletion_auc"], columns["deletion_auc_random"]) if key == "deletion_auc_normalised"
                  else (columns[key],))
        statistic = _ratio_of_means if key == "deletion_auc_normalised" else _mean_defined
        value = statistic(*arrays)
        summary[key] = None if np.isnan(value) else float(value)
        summary[f"{key}_ci"] = (bootstrap_ci(statistic, *arrays, groups=groups, n_boot=n_boot, seed=seed, ci=ci)
                                if len(scores) else [float("nan")] * 2)
    summary["n_defined"] = {key: int(np.isfinite(columns[key]).sum()) for key in SCORE_KEYS}
    summary["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "ci": float(ci),
                            "unit": "group" if groups is not None else "image",
                            "method": "percentile, resampling whole duplicate groups"}
    summary.update({  # the keys results files held before the intervals; compare and notebooks read them
        "focus_mean": summary["focus"], "focus_median": _nan_stat(np.nanmedian, columns["focus"]),
        "deletion_auc_mean": summary["deletion_auc"], "deletion_auc_random_mean": summary["deletion_auc_random"],
        "sanity_spearman_mean": summary["sanity_spearman"],
        "sanity_spearman_median": _nan_stat(np.nanmedian, columns["sanity_spearman"]),
    })
    return summary


def explain_summary(model, images: np.ndarray, masks: np.ndarray | None = None,
                    class_indices: Sequence[int] | np.ndarray | None = None, layer: str | None = None,
                    method: str = "gradcam", seed: int = 0, steps: int = DELETION_STEPS, batch_size: int = 32,
                    heatmaps: np.ndarray | None = None, groups: Sequence[Any] | None = None,
                    n_boot: int = DEFAULT_BOOTSTRAP, baseline_value: float | str | None = None,
                    random_auc: np.ndarray | None = None) -> dict[str, Any]:
    """Focus, deletion AUC (raw, random-order, normalised) and sanity correlation of one method, with intervals.

    summarise_explanations(explanation_scores(...)): see those two. masks: bool N×H×W cell masks (None → no focus
    score). heatmaps: pass them to skip recomputing. groups: the images' duplicate groups, for the intervals.
    """
    scores = explanation_scores(model, images, masks, class_indices, layer, method, seed, steps, baseline_value,
                                batch_size, heatmaps, random_auc)
    return summarise_explanations(scores, groups, n_boot, seed)


def default_layer(model) -> str:
    """Return the registry's last conv layer for model.name, else the model's last 4-D (non-pooling) layer."""
    spec = _registry_spec(model.name)
    if spec is not None:
        _check_layer(model, spec.last_conv_layer)
        return spec.last_conv_layer
    for candidate in reversed(model.layers):
        if "Pooling" in type(candidate).__name__ or "Input" in type(candidate).__name__:
            continue
        if len(_output_shape(candidate)) == 4:
            return candidate.name
    raise ModelError(f"Model {model.name!r} has no 4-D (image-shaped) layer to compute Grad-CAM on; "
                     "pass layer= with the name of its last convolutional layer.")


def spearman_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (ties get average ranks; NaN if a map is constant)."""
    ra = rankdata(np.asarray(a, dtype=np.float64).reshape(len(a), -1), axis=1)
    rb = rankdata(np.asarray(b, dtype=np.float64).reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (ra * rb).sum(axis=1) / denom
    rho[denom == 0] = np.nan
    return rho


# ---------------------------------------------------------------------------------------------------------
# Internals


def _heatmaps_and_classes(model, images, class_indices, layer, methods, batch_size,
                          eager=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(method → N×H×W maps, the explained classes), every method from one pass per batch."""
    methods = tuple(methods)
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"Unknown explanation method {unknown[0] if unknown else methods!r}; "
                          f"choose one of: {', '.join(METHODS)}.")
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"gradcam_heatmaps needs images as N×H×W×C, got shape {x.shape}.")
    n = len(x)
    if class_indices is None:
        wanted = np.full(n, -1, dtype=np.int32)  # -1: explain the predicted class
    else:
        wanted = np.asarray(class_indices, dtype=np.int32).reshape(-1)
        if len(wanted) != n:
            raise ValueError(f"gradcam_heatmaps: {len(wanted)} class indices for {n} images.")
        n_classes = int(model.outputs[0].shape[-1])
        if n and (wanted.min() < 0 or wanted.max() >= n_classes):
            raise ValueError(f"gradcam_heatmaps: class indices must lie in 0..{n_classes - 1} for model "
                             f"{model.name!r}, got {wanted.min()}..{wanted.max()}.")
    layer = layer or default_layer(model)
    fn = _cam_function(model, layer, methods, x.shape[1:], _is_small(x) if eager is None else eager)
    heat = {method: np.empty(x.shape[:3], dtype=np.float32) for method in methods}
    classes = np.empty(n, dtype=np.int64)
    step = max(1, batch_size)
    with quiet_tensorflow():
        for start in range(0, n, step):
            maps, chosen = fn(tf.constant(x[start:start + step]), tf.constant(wanted[start:start + step]))
            for method, batch_maps in zip(methods, maps):
                heat[method][start:start + step] = batch_maps.numpy()
            classes[start:start + step] = chosen.numpy()
    return heat, classes


def _maps_and_classes(model, images, class_indices, heatmaps, layer, method, batch_size, forward=None):
    """Heatmaps and explained classes, computing only what the caller did not pass."""
    if heatmaps is None:
        heat, classes = _heatmaps_and_classes(model, images, class_indices, layer, (method,), batch_size)
        return heat[method], classes
    if class_indices is None:
        x = np.asarray(images, dtype=np.float32)
        forward = forward if forward is not None else _forward_pass(model, x, None)
        class_indices = _run_batched(forward, x, batch_size).argmax(axis=1)
    return np.asarray(heatmaps, dtype=np.float32), np.asarray(class_indices, dtype=np.int64)


def _shared_examples(saved: list[GradcamExamples], per_class: int) -> list[str]:
    """The first per_class paths of each class, in the first run's order, among the paths every run explained."""
    common = set.intersection(*(set(examples.paths) for examples in saved))
    taken: Counter = Counter()
    picked = []
    for path, true in zip(saved[0].paths, saved[0].true):
        if path in common and taken[true] < per_class:
            picked.append(path)
            taken[true] += 1
    return picked


def _cam_function(model, layer: str, methods: tuple[str, ...], image_shape: tuple[int, ...], eager: bool):
    """The batch Grad-CAM function (x, wanted) → (one map batch per method, explained classes), eager or traced.

    Traced: once per call of this function; the unknown batch size lets every batch reuse it. Not cached across
    calls on purpose: a cache keyed by the model would keep every model alive.
    """
    grad_model, to_scores = _grad_model(model, layer)
    height, width = image_shape[0], image_shape[1]

    def batch_cam(x, wanted):
        with tf.GradientTape() as tape:
            acts, head = grad_model(x, training=False)
            acts = tf.cast(acts, tf.float32)
            scores = to_scores(head)
            chosen = tf.where(wanted < 0, tf.cast(tf.argmax(scores, axis=1), tf.int32), wanted)
            target = tf.reduce_sum(tf.gather(scores, chosen, axis=1, batch_dims=1))
        grads = tf.cast(tape.gradient(target, acts), tf.float32)
        return tuple(_cam(acts, _channel_weights(method, acts, grads), height, width) for method in methods), chosen

    if eager:
        return batch_cam
    signature = [tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int32)]
    return tf.function(batch_cam, input_signature=signature, autograph=False)


def _channel_weights(method: str, acts, grads):
    """Per image and channel: Grad-CAM's mean gradient, or Grad-CAM++'s weights from the same gradients."""
    return tf.reduce_mean(grads, axis=(1, 2)) if method == "gradcam" else _gradcam_pp_weights(acts, grads)


def _cam(acts, weights, height: int, width: int):
    """ReLU of the weighted channel sum, upsampled bilinearly to height × width, divided by its peak per image."""
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", acts, weights))
    cam = tf.where(tf.math.is_finite(cam), cam, tf.zeros_like(cam))  # an overflowing random model
    cam = tf.image.resize(cam[..., None], (height, width), method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return tf.math.divide_no_nan(cam, peak)


def _gradcam_pp_weights(acts, grads):
    """Grad-CAM++ channel weights (Chattopadhay et al. 2018), closed form with the exponential score.

    With S = exp(logit), the 2nd and 3rd derivatives are exp(logit)·g² and exp(logit)·g³; exp(logit)
    cancels in alpha and only scales the weights, which the per-image normalisation removes.
    """
    g2 = tf.square(grads)
    g3 = g2 * grads
    act_sum = tf.reduce_sum(acts, axis=(1, 2), keepdims=True)
    denom = 2.0 * g2 + act_sum * g3
    alpha = g2 / tf.where(tf.not_equal(denom, 0.0), denom, tf.ones_like(denom))
    return tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2))


def _grad_model(model, layer: str):
    """A model giving (layer activations, head input) and a function mapping the head input to class logits."""
    target = _check_layer(model, layer)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if isinstance(last, keras.layers.Dense) and activation == "softmax":
        kernel, bias = last.kernel, last.bias

        def logits(h):
            z = tf.matmul(tf.cast(h, tf.float32), tf.cast(kernel, tf.float32))
            return z + tf.cast(bias, tf.float32) if bias is not None else z

        return keras.Model(inputs, [target.output, last.input]), logits
    if isinstance(last, keras.layers.Activation) and activation == "softmax":
        return keras.Model(inputs, [target.output, last.input]), lambda h: tf.cast(h, tf.float32)
    # No softmax to undo: explain whatever the model outputs.
    return keras.Model(inputs, [target.output, model.output]), lambda h: tf.cast(h, tf.float32)


def _check_layer(model, layer: str):
    try:
        target = model.get_layer(layer)
    except ValueError:
        shaped = [lay.name for lay in model.layers if len(_output_shape(lay)) == 4][-5:]
        raise ModelError(
            f"Model {model.name!r} has no layer {layer!r} (the Grad-CAM layer). Its last 4-D layers are "
            f"{shaped}. Models must be flat functional graphs (base built with input_tensor); "
            "rebuild with bloodcell_lib.model.build_model or pass layer= explicitly."
        ) from None
    if len(_output_shape(target)) != 4:
        raise ModelError(f"Layer {layer!r} of model {model.name!r} outputs shape {_output_shape(target)}, "
                         "not a 4-D feature map; Grad-CAM needs a convolutional layer.")
    return target


def _output_shape(layer) -> tuple:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return ()


def _registry_spec(name: str):
    try:
        return get_arch(name)
    except ConfigError:
        return None


def _is_small(x: np.ndarray, repeat: int = 1) -> bool:
    """Whether a pass over x (repeat times) is small enough to run eagerly: at most EAGER_MAX_PIXELS in all."""
    return repeat * x.shape[0] * x.shape[1] * x.shape[2] <= EAGER_MAX_PIXELS


def _forward_pass(model, x: np.ndarray, eager: bool | None, repeat: int = 1):
    """The model's inference pass for x (repeat times): eager, or cost.compiled_forward; eager None → by _is_small."""
    if _is_small(x, repeat) if eager is None else eager:
        return lambda batch: model(batch, training=False)
    return compiled_forward(model, tuple(x.shape[1:]))


def _run_batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    step = max(1, batch_size)
    with quiet_tensorflow():
        parts = [np.asarray(fn(x[i:i + step]), dtype=np.float64) for i in range(0, len(x), step)]
    return np.concatenate(parts)


def _deletion_baseline(x: np.ndarray, baseline_value: float | str | None) -> np.ndarray:
    if baseline_value is None or baseline_value == "mean":
        return x.mean(axis=(1, 2), keepdims=True)
    if baseline_value == "blur":
        sigma = max(x.shape[1:3]) / 16.0
        return np.stack([cv2.GaussianBlur(img, (0, 0), sigmaX=sigma) for img in x]).reshape(x.shape)
    if isinstance(baseline_value, (int, float)):
        return np.full((1, 1, 1, 1), float(baseline_value), dtype=np.float32)
    raise ConfigError(f"deletion_auc: baseline_value must be None, 'mean', 'blur' or a number, "
                      f"got {baseline_value!r}.")


def _randomisation_rho(model, images, heatmaps, classes, layer, method, seed, batch_size,
                       random_maps: np.ndarray | None = None) -> np.ndarray:
    """Per image: Spearman correlation of the maps with a randomised copy's maps of the same classes.

    random_maps: that copy's maps when the caller made them (randomised_heatmaps); None → made here.
    """
    if random_maps is None:
        random_maps = randomised_heatmaps(model, images, classes, layer, (method,), seed, batch_size)[method]
    random_maps = np.asarray(random_maps, dtype=np.float32)
    if random_maps.shape != np.shape(heatmaps):
        raise ValueError(f"explanation_scores: randomised maps {random_maps.shape} do not match the maps "
                         f"{np.shape(heatmaps)}.")
    return spearman_per_image(heatmaps, random_maps)


def _mean_defined(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _ratio_of_means(numerator: np.ndarray, denominator: np.ndarray) -> float:
    below = float(np.mean(denominator))
    return float(np.mean(numerator)) / below if below > 0 else float("nan")


def _nan_stat(fn, values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return None
    return float(fn(values))
