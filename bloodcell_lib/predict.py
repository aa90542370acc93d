"""Classify image files of any size or format with a saved model, optionally with Grad-CAM overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from bloodcell_lib.atomic import write_bytes
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.errors import ImageDecodeError
from bloodcell_lib.explain import gradcam_heatmaps, overlay_heatmap
from bloodcell_lib.images import read_rgb
from bloodcell_lib.model import load_trained_model, model_image_size
from bloodcell_lib.pipeline import resize_uint8


def prepare_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB uint8 image to size×size exactly as the training pipeline does."""
    return resize_uint8(rgb, size).numpy()


def predict_files(model_path: str | Path, image_paths: Sequence[str | Path],
                  gradcam_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Return class and probabilities per image; unreadable files get an 'error' entry instead."""
    model, spec = load_trained_model(model_path)
    size = model_image_size(model)
    rows: list[dict[str, Any]] = []
    images, kept = [], []
    for path in image_paths:
        try:
            images.append(prepare_image(read_rgb(path), size))
            kept.append(len(rows))
            rows.append({"path": str(path)})
        except ImageDecodeError as exc:
            rows.append({"path": str(path), "error": str(exc)})
    if not images:
        return rows
    batch = np.stack(images)
    x = spec.network_input(batch)
    proba = np.asarray(model.predict(x, verbose=0, batch_size=32), dtype=float)
    for i, r in zip(kept, proba):
        rows[i].update({"class": CLASSES[int(r.argmax())], "confidence": float(r.max()),
                        "probabilities": {c: float(p) for c, p in zip(CLASSES, r)}})
    if gradcam_dir is not None:
        write_overlays(model, spec, batch, x, proba.argmax(axis=1), [rows[i] for i in kept], Path(gradcam_dir))
    return rows


def write_overlays(model, spec, images: np.ndarray, x: np.ndarray, classes: np.ndarray,
                   rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Write one Grad-CAM overlay PNG per image and record its path in the row."""
    heat = gradcam_heatmaps(model, x, class_indices=classes, layer=spec.last_conv_layer)
    for k, (img, h, row) in enumerate(zip(images, heat, rows)):
        side = cv2.cvtColor(np.hstack([img, overlay_heatmap(img, h)]), cv2.COLOR_RGB2BGR)
        ok, png = cv2.imencode(".png", side)
        target = out_dir / f"{k:03d}_{Path(row['path']).stem}_gradcam.png"
        write_bytes(target, png.tobytes())
        row["gradcam"] = str(target)
