"""The shortcut baseline: a colour-only classifier that sees the background and never the cell.

Why: if slides of different classes come from different labs or scanners, the empty glass around
the cell already tells the class apart, and a CNN can score well without looking at the cell at all.
This baseline measures how far that shortcut goes. It sees only the image border (a strip 1/16 of the
side wide and the four corner patches), where the white cell never reaches, so on a set whose
background carries no class information it stays near chance, whatever the cells' own colours are.
Any CNN result is only interesting by the margin it adds above this row.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import DEFAULT_BOOTSTRAP, DEFAULT_SEED, profile_config
from bloodcell_lib.errors import SplitError
from bloodcell_lib.images import read_rgb
from bloodcell_lib.results import (
    library_versions,
    read_results,
    record_predictions,
    results_files,
    results_path,
    results_record,
    split_info,
    write_results,
)
from bloodcell_lib.split import load_split, split_sha256

RUN_NAME = "shortcut_baseline"
DISPLAY_NAME = "Colour-only baseline"
IMAGE_SIZE = 64  # colour statistics need no detail; small images load fast
BORDER_FRACTION = 1 / 16  # strip width and corner-patch side, as a share of the image side
HIST_BINS = 16  # per channel; must divide 256
GLASS_QUANTILE = 0.5  # the brighter half of the border pixels (per image) counts as empty glass
FEATURES = (
    f"background colour only, from images resized to {IMAGE_SIZE} px: RGB and HSV histograms "
    f"({HIST_BINS} bins per channel) and mean RGB and HSV of the brighter half (empty glass) of a border "
    f"strip {BORDER_FRACTION:.4g} of the side wide, and the mean RGB of the four corner patches"
)
MODEL = "StandardScaler + LogisticRegression (multinomial, L2, C=1, lbfgs)"

logger = logging.getLogger(__name__)


def run_shortcut_baseline(
    split: pd.DataFrame | str | Path,
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Train on the split's train subset, test on its test subset, write results and predictions like a model.

    split: a split DataFrame (attrs["data_root"] set) or the path of a split CSV; data_dir overrides
    the dataset root recorded with the split. Writes shortcut_baseline_results.json and
    shortcut_baseline_predictions.csv to output_dir and returns the results dict.
    """
    split = _as_split(split, data_dir)
    root = Path(data_dir if data_dir is not None else split.attrs["data_root"]).expanduser()
    train, test = _subset(split, "train"), _subset(split, "test")
    y_train = train["label"].map(CLASSES.index).to_numpy()
    if len(np.unique(y_train)) < 2:
        raise SplitError(f"The split's train subset holds only {train['label'].iloc[0]!r}; "
                         "a classifier needs at least two classes. Re-make the split.")

    x_train = colour_features(load_small_images(root, train["path"]))
    x_test = colour_features(load_small_images(root, test["path"]))
    proba, train_accuracy = _fit_and_predict(x_train, y_train, x_test)

    # As for the CNNs, every number comes from the predictions file, so anyone can recompute it.
    _, metrics = record_predictions(output_dir, RUN_NAME, test, proba, n_boot=n_boot, seed=seed)
    results = results_record(
        run=RUN_NAME, architecture=RUN_NAME, display_name=DISPLAY_NAME, split=split, split_block=split_info(split),
        metrics=metrics, output_dir=Path(output_dir), versions=library_versions(cv2),
        weights=None, image_size=IMAGE_SIZE, subset="test", n_train=int(len(train)), n_test=int(len(test)),
        train_accuracy=train_accuracy, features=FEATURES, n_features=int(x_train.shape[1]), model=MODEL,
    )
    write_results(output_dir, results)
    return results


def ensure_shortcut_baseline(split_path: str | Path, output_dir: str | Path) -> dict[str, Any]:
    """Return the baseline's results in output_dir, (re)running it unless they exist for this split and resampling.

    The resampling is the one the models in output_dir were evaluated with (baseline_resampling), so every
    row of the comparison has intervals from the same bootstrap.
    """
    n_boot, seed = baseline_resampling(output_dir)
    existing = results_path(output_dir, RUN_NAME)
    if existing.exists():
        try:
            results = read_results(existing)
            boot = results["metrics"]["bootstrap"]
            if (boot["n_boot"], boot["seed"]) == (n_boot, seed) and results["split"]["sha256"] == split_sha256(
                    split_path):
                return results
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or from an older version: run it again
    return run_shortcut_baseline(split_path, output_dir, n_boot=n_boot, seed=seed)


def baseline_resampling(output_dir: str | Path, profile: str | None = None, n_boot: int | None = None,
                        seed: int | None = None) -> tuple[int, int]:
    """Return (n_boot, seed) for a baseline written to output_dir.

    Given values win; then, without an explicit profile, the bootstrap the models already in output_dir
    were evaluated with (the most common, when they differ); then the profile's (BLOODCELL_PROFILE, else paper).
    """
    found = models_resampling(output_dir) if profile is None else None
    if found is None:
        cfg = profile_config(profile)
        found = (cfg.bootstrap, cfg.seed)
    return (found[0] if n_boot is None else n_boot, found[1] if seed is None else seed)


def models_resampling(output_dir: str | Path) -> tuple[int, int] | None:
    """Return the (n_boot, seed) of the models' results in a folder (the most common), or None when there are none."""
    seen: Counter = Counter()
    for path in results_files(output_dir):
        if path.name == results_path(output_dir, RUN_NAME).name:
            continue
        try:
            boot = read_results(path)["metrics"]["bootstrap"]
            seen[(int(boot["n_boot"]), int(boot["seed"]))] += 1
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a partial or foreign file; the comparison reports it
    if len(seen) > 1:
        logger.warning("WARNING: the models in %s were evaluated with different bootstraps (n_boot, seed: %s); "
                       "re-evaluate them with one configuration.", output_dir,
                       ", ".join(f"{k} ×{n}" for k, n in seen.most_common()))
    return seen.most_common(1)[0][0] if seen else None


def colour_features(images: np.ndarray) -> np.ndarray:
    """Return N×114 background-colour features of N×S×S×3 uint8 images (see FEATURES); the centre is ignored."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"colour_features needs N×H×W×3 uint8 images, got {images.dtype} {images.shape}.")
    strip = _border_mask(*images.shape[1:3])
    hsv = np.stack([cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL) for img in images])  # hue on 0..255
    rgb_px, hsv_px = images[:, strip], hsv[:, strip]  # N×P×3 border pixels
    # Only the brighter border pixels: empty glass. Darker ones are red cells, whose number near the
    # border depends on how much room the white cell leaves, i.e. on its class, not on the slide.
    brightness = rgb_px.astype(np.float32).mean(axis=2)
    glass = (brightness >= np.quantile(brightness, GLASS_QUANTILE, axis=1, keepdims=True)).astype(np.float64)
    share = glass.sum(axis=1, keepdims=True)
    parts = [
        _histograms(rgb_px, glass),
        _histograms(hsv_px, glass),
        (rgb_px * glass[..., None]).sum(axis=1) / share / 255.0,
        (hsv_px * glass[..., None]).sum(axis=1) / share / 255.0,
        _corner_means(images) / 255.0,
    ]
    return np.concatenate(parts, axis=1).astype(np.float32)


def load_small_images(root: str | Path, paths: Sequence[str], size: int = IMAGE_SIZE) -> np.ndarray:
    """Read images (relative paths under root) and resize them to size×size; N×size×size×3 uint8."""
    root = Path(root)
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, rel in enumerate(paths):
        rgb = read_rgb(root / rel)
        shrink = rgb.shape[0] >= size and rgb.shape[1] >= size
        out[i] = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out


# --- internals ----------------------------------------------------------------------------------


def _fit_and_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, float]:
    """Fit the scaler + logistic regression; return (test probabilities N×5 in CLASSES order, train accuracy)."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    # A few thousand rows × 114 features: multi-threaded BLAS only adds overhead, and on a busy
    # 2-core machine it made this fit ~70× slower (30 s instead of 0.4 s).
    with threadpool_limits(limits=1, user_api="blas"):
        classifier.fit(x_train, y_train)
        proba = np.zeros((len(x_test), len(CLASSES)))
        proba[:, classifier.classes_] = classifier.predict_proba(x_test)  # classes absent from train stay 0
        return proba, float(classifier.score(x_train, y_train))


def _as_split(split: pd.DataFrame | str | Path, data_dir: str | Path | None) -> pd.DataFrame:
    """Return the split as a DataFrame with a dataset root we can read from."""
    if isinstance(split, (str, Path)):
        return load_split(split, data_root=data_dir)
    if not isinstance(split, pd.DataFrame):
        raise SplitError(f"run_shortcut_baseline needs a split DataFrame or a split CSV path, got {type(split).__name__}.")
    missing = {"path", "label", "group", "subset"} - set(split.columns)
    if missing:
        raise SplitError(f"The split lacks column(s) {', '.join(sorted(missing))}; make it with bloodcell_lib.split.make_split.")
    if data_dir is None and not split.attrs.get("data_root"):
        raise SplitError("The split DataFrame has no attrs['data_root'] saying where its images are; "
                         "pass data_dir= (--data-dir) with the dataset folder.")
    return split


def _subset(split: pd.DataFrame, name: str) -> pd.DataFrame:
    rows = split[split["subset"] == name].reset_index(drop=True)
    if rows.empty:
        raise SplitError(f"The split has no {name!r} rows; the baseline needs a train and a test subset. "
                         "Re-make the split with `python -m bloodcell_lib split`.")
    unknown = sorted(set(rows["label"]) - set(CLASSES))
    if unknown:
        raise SplitError(f"The split's {name} subset has unknown label(s) {unknown}; expected {', '.join(CLASSES)}.")
    return rows


def _border_mask(height: int, width: int) -> np.ndarray:
    w = max(1, int(round(BORDER_FRACTION * min(height, width))))
    mask = np.zeros((height, width), dtype=bool)
    mask[:w, :] = mask[-w:, :] = mask[:, :w] = mask[:, -w:] = True
    return mask


def _histograms(pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return N×(3·HIST_BINS) weighted per-channel histograms (shares summing to 1) of N×P×3 uint8 pixels."""
    n, _, channels = pixels.shape
    bins = pixels.astype(np.int64) // (256 // HIST_BINS)
    index = bins + HIST_BINS * np.arange(channels) + HIST_BINS * channels * np.arange(n)[:, None, None]
    w = np.broadcast_to(weights[:, :, None], pixels.shape)
    counts = np.bincount(index.ravel(), weights=w.ravel(), minlength=n * channels * HIST_BINS)
    return counts.reshape(n, channels * HIST_BINS) / weights.sum(axis=1, keepdims=True)


def _corner_means(images: np.ndarray) -> np.ndarray:
    """Return N×12: the mean RGB of the four corner patches (top-left, top-right, bottom-left, bottom-right)."""
    w = max(1, int(round(BORDER_FRACTION * min(images.shape[1:3]))))
    patches = (images[:, :w, :w], images[:, :w, -w:], images[:, -w:, :w], images[:, -w:, -w:])
    return np.concatenate([p.reshape(len(images), -1, 3).mean(axis=1) for p in patches], axis=1)

