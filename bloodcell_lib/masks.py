"""Where the white cell is in an image: a bool mask per image, for Grad-CAM's focus score.

Two sources. A synthetic set records each cell's ellipse in its manifest, so its masks are the truth. Any other
image gets `stain_mask`: the white cell found from the colour of its stain alone (nucleus and cytoplasm are
purple/blue after Wright-Giemsa; red cells are pink, the glass is white), with no model involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage

from bloodcell_lib.images import displayed_size
from bloodcell_lib.synthetic import MANIFEST_NAME, load_manifest, manifest_mask

MANIFEST_SOURCE = "synthetic manifest ellipses"
STAIN_SOURCE = "stain-colour segmentation"

# Stain scores are saturation (0-255) weighted by how purple/blue the hue is; below this nothing is stained.
_MIN_STAIN_SCORE = 25
# OpenCV hue runs 0-180: blue is 120, violet/purple 130-155, the pink of red cells 160-180 and 0-10.
_STAIN_HUE = (95.0, 158.0)
_HUE_RAMP = 8.0


def cell_masks(data_root: str | Path, paths: Sequence[str], images: np.ndarray) -> tuple[np.ndarray, str]:
    """Bool N×S×S cell masks of N×S×S×3 uint8 images and where they came from (MANIFEST_SOURCE, STAIN_SOURCE).

    paths: the images' files relative to data_root. The synthetic manifest's ellipses when data_root holds a
    manifest naming every path (drawn at each file's own size, then resized like the image), else stain_mask.
    """
    root = Path(data_root)
    size = images.shape[1]
    if (root / MANIFEST_NAME).exists():
        manifest = load_manifest(root / MANIFEST_NAME).set_index("file")
        if all(p in manifest.index for p in paths):
            masks = []
            for p in paths:
                h, w = displayed_size(root / p)
                m = manifest_mask(manifest.loc[p], h, w).astype(np.uint8)
                masks.append(cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool))
            return np.stack(masks), MANIFEST_SOURCE
    return np.stack([stain_mask(img) for img in images]), STAIN_SOURCE


def stain_mask(image_uint8: np.ndarray) -> np.ndarray:
    """Return a bool H×W mask of the stained (purple/blue) white cell, found from stain colour alone.

    Steps: white-balance on the glass, then the strongly stained core (Otsu on saturation × a purple/blue
    hue window; its largest blob), grown into the paler cytoplasm of that hue connected to it, closed
    and hole-filled. Pink cytoplasm (some erythroblasts) looks like a red cell and is left out.
    """
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"stain_mask needs an H×W×3 uint8 RGB image, got {image.dtype} {image.shape}.")
    side = min(image.shape[:2])
    balanced = _white_balanced(cv2.GaussianBlur(image, (0, 0), max(0.6, side / 160)))
    hue, sat, val = np.moveaxis(cv2.cvtColor(balanced, cv2.COLOR_RGB2HSV).astype(np.float32), -1, 0)
    low, high = _STAIN_HUE
    in_window = np.clip(np.minimum(hue - (low - _HUE_RAMP), (high + _HUE_RAMP) - hue) / _HUE_RAMP, 0.0, 1.0)
    core = _stained_core(np.clip(sat * in_window, 0, 255).astype(np.uint8), side)
    if core is None:
        return np.zeros(image.shape[:2], dtype=bool)
    # Paler cytoplasm: stain hue and either more saturated or darker than the glass around the cell.
    glass = val >= np.percentile(val, 90)
    pale = (in_window > 0.5) & ((sat > np.median(sat[glass]) + 8) | (val < np.median(val[glass]) - 30))
    _, labels = cv2.connectedComponents((_opened(pale, side / 64) | core).astype(np.uint8), connectivity=8)
    mask = np.isin(labels, np.unique(labels[core]))
    return ndimage.binary_fill_holes(_closed(mask, side / 25))


# ---------------------------------------------------------------------------------------------------------
# Internals


def _stained_core(score: np.ndarray, side: int) -> np.ndarray | None:
    """The largest blob above Otsu's threshold of the stain score, or None if nothing is stained."""
    if int(score.max()) < _MIN_STAIN_SCORE:
        return None
    threshold, _ = cv2.threshold(score, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    core = _opened(score > max(threshold, _MIN_STAIN_SCORE - 1), side / 100)  # drop speckle first
    count, labels, stats, _ = cv2.connectedComponentsWithStats(core.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _white_balanced(image: np.ndarray) -> np.ndarray:
    """Scale channels so the glass (brightest tenth of pixels) is neutral: hue then means stain, not lamp."""
    rgb = image.astype(np.float32)
    brightness = rgb.sum(axis=2)
    glass = np.median(rgb[brightness >= np.percentile(brightness, 90)], axis=0)
    return np.clip(rgb * (glass.mean() / np.maximum(glass, 1.0)), 0, 255).astype(np.uint8)


def _opened(mask: np.ndarray, size: float) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(size), _odd(size)))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)


def _closed(mask: np.ndarray, size: float) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(size), _odd(size)))
    pad = kernel.shape[0]  # pad so a cell touching the border is not cut by the closing's edge handling
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    return cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[pad:-pad, pad:-pad].astype(bool)


def _odd(value: float) -> int:
    return max(3, int(round(value)) | 1)
