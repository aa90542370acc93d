"""The background shortcut, tested on a trained model directly: does it read the cell or the slide around it?

When the classes were photographed on different slides (another lab, stain batch, lamp), the glass and the red
cells around the white cell already tell the class apart, and a network can score well without looking at the
cell. The colour-only baseline (baseline.py) shows whether the data allow that; this test shows whether a model
uses it. Every test image is shown to the model twice more:

- background only: the cell (its mask, grown by a few pixels to cover its soft edge) filled with the image's
  median background colour, so nothing of the cell is left;
- cell only: everything outside the mask replaced by one neutral glass colour (GLASS_RGB), so nothing of the
  slide is left.

A model that reads the cell falls to chance on background-only images. One whose background-only accuracy is
far above chance (the lower end of its 95% interval above chance + SHORTCUT_MARGIN) predicts from the background,
and the comparison flags it. Chance is the accuracy of always naming the test set's most common class (1/5 on a
balanced set). Masks come from masks.cell_masks: the synthetic manifest's ellipses, else the stain segmentation;
an image where no cell was found is counted (`empty_masks`) and left unchanged in both variants.

Plain functions over uint8 arrays; the model comes in as `predict` (uint8 N×S×S×3 → N×5 probabilities), so the
test needs no knowledge of the network's preprocessing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import cv2
import numpy as np

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.metrics import compute_metrics

# Empty glass, neutral grey-white: no stain's hue, as bright as a well-exposed slide.
GLASS_RGB: tuple[int, int, int] = (232, 232, 232)
# How far above chance the lower end of the background-only interval may go before a model is flagged.
SHORTCUT_MARGIN = 0.1
# The cell's mask is grown by this share of the image side (at least 1 px) before it is filled, so the cell's
# anti-aliased or blurred rim does not stay behind in the background-only image.
GROW_FRACTION = 1 / 40
VARIANTS: tuple[str, ...] = ("background_only", "cell_only")

Predict = Callable[[np.ndarray], np.ndarray]


def shortcut_test(
    predict: Predict,
    images: np.ndarray,
    labels: Sequence[int],
    masks: np.ndarray,
    groups: Sequence[Any] | None = None,
    original_proba: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    mask_source: str = "",
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Accuracy on the original, background-only and cell-only images, with group-bootstrap intervals.

    predict: uint8 images → N×5 probabilities; labels: CLASSES positions; masks: bool N×S×S cell masks;
    groups, n_boot, seed: the study's resampling (the intervals draw the resamples of the run's own);
    original_proba: the model's probabilities on the unchanged images when already known (the test pass).
    Returns (the block results["shortcut_test"] records, {variant: probabilities}).
    """
    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    if images.shape[:3] != masks.shape:
        raise ValueError(f"shortcut_test: {images.shape[0]} images of {images.shape[1:3]} need masks of the same "
                         f"shape, got {masks.shape}.")
    y = np.asarray(labels, dtype=np.int64)
    shown = {"original": images, "background_only": background_only(images, masks),
             "cell_only": cell_only(images, masks)}
    proba = {name: (np.asarray(original_proba, dtype=np.float64) if name == "original" and original_proba is not None
                    else np.asarray(predict(x), dtype=np.float64)) for name, x in shown.items()}
    block: dict[str, Any] = {}
    for name, p in proba.items():
        m = compute_metrics(y, p, groups=groups, n_boot=n_boot, seed=seed)
        block[name] = {"accuracy": m["accuracy"], "accuracy_ci": m["accuracy_ci"], "macro_f1": m["macro_f1"],
                       "macro_f1_ci": m["macro_f1_ci"]}
    chance = chance_accuracy(y)
    block.update({
        "chance": chance,
        "margin": SHORTCUT_MARGIN,
        "flagged": reads_background(block["background_only"], chance),
        "n": int(len(y)),
        "empty_masks": int((~masks.reshape(len(masks), -1).any(axis=1)).sum()),
        "cell_share_mean": float(masks.mean()) if masks.size else float("nan"),
        "mask_source": mask_source,
        "glass_rgb": list(GLASS_RGB),
        "grow_px": grow_pixels(images.shape[1]) if images.ndim == 4 else 0,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "method": ("background only: the cell mask (grown) filled with the image's median background colour; "
                   "cell only: the background replaced by neutral glass; flagged when the background-only "
                   "accuracy's lower 95% bound exceeds chance + margin"),
    })
    return block, {name: proba[name] for name in VARIANTS}


def reads_background(background: dict[str, Any], chance: float, margin: float = SHORTCUT_MARGIN) -> bool:
    """True when a background-only accuracy is far above chance: its lower interval end (the accuracy itself when
    there is no interval) above chance + margin."""
    ci = background.get("accuracy_ci") or [float("nan"), float("nan")]
    low = ci[0] if ci[0] is not None and np.isfinite(ci[0]) else background.get("accuracy")
    return bool(low is not None and np.isfinite(low) and low > chance + margin)


def chance_accuracy(labels: Sequence[int]) -> float:
    """The accuracy of always naming the most common class: 1/5 on a balanced test set, more on another."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        return 1.0 / len(CLASSES)
    return float(np.bincount(y, minlength=len(CLASSES)).max() / y.size)


def background_only(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Images with the cell (mask grown by grow_pixels) filled with each image's median background colour."""
    out = np.array(images, dtype=np.uint8, copy=True)
    grown = grow_masks(masks, grow_pixels(out.shape[1]))
    for img, cell in zip(out, grown):
        if cell.any() and not cell.all():
            img[cell] = np.median(img[~cell], axis=0).round().astype(np.uint8)
    return out


def cell_only(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Images with everything outside the cell mask replaced by GLASS_RGB (an image without a cell is kept)."""
    out = np.array(images, dtype=np.uint8, copy=True)
    for img, cell in zip(out, np.asarray(masks, dtype=bool)):
        if cell.any():
            img[~cell] = GLASS_RGB
    return out


def grow_pixels(side: int) -> int:
    """How many pixels a cell mask is grown by at this image side (GROW_FRACTION, at least 1)."""
    return max(1, int(round(side * GROW_FRACTION)))


def grow_masks(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Bool masks dilated by a disc of the given radius."""
    masks = np.asarray(masks, dtype=bool)
    if pixels <= 0:
        return masks.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in masks]) if len(masks) else masks
