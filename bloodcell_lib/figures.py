"""Figures for notebooks and reports; each returns a matplotlib Figure and can save it as a PNG.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so nothing depends on a GUI
backend and a notebook shows each figure once: as the value of the cell that made it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from bloodcell_lib.atomic import write_bytes
from bloodcell_lib.classes import CLASSES

try:  # IPython is there in notebooks, not necessarily on the command line
    from IPython import get_ipython
except ImportError:
    get_ipython = None


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _show_figures_inline() -> None:
    """Teach a running IPython kernel to display our pyplot-free Figures as PNG images."""
    shell = get_ipython() if get_ipython is not None else None
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, figure_png)


_show_figures_inline()


def save_figure(fig: Figure, path: str | Path | None, dpi: int = 110) -> Figure:
    """Save a figure as PNG atomically when a path is given, and return it."""
    if path is not None:
        write_bytes(path, figure_png(fig, dpi))
    return fig


def plot_history(history: Mapping[str, Sequence[float]], path: str | Path | None = None, title: str = "") -> Figure:
    """Accuracy and loss per epoch for train and validation, with the phase-2 boundary marked."""
    fig = Figure(figsize=(11, 4))
    epochs = np.asarray(history.get("epoch") or range(1, len(history["loss"]) + 1))
    phases = list(history.get("phase") or [1] * len(epochs))
    for ax, key, label in zip(fig.subplots(1, 2), ("accuracy", "loss"), ("Accuracy", "Loss")):
        ax.plot(epochs, history[key], "o-", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], "s-", label="validation")
        if 2 in phases:
            boundary = epochs[phases.index(2)] - 0.5
            ax.axvline(boundary, color="grey", linestyle="--")
            ax.text(boundary, ax.get_ylim()[1], " fine-tuning →", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Training curves")
    return save_figure(fig, path)


def plot_confusion_matrix(cm: Sequence[Sequence[float]], normalised: bool = False,
                          path: str | Path | None = None, title: str = "") -> Figure:
    """Confusion matrix as an annotated heatmap (rows: true class, columns: predicted)."""
    cm = np.asarray(cm, dtype=float)
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    sns.heatmap(cm, annot=True, fmt=".2f" if normalised else ".0f", cmap="Blues", ax=ax,
                xticklabels=CLASSES, yticklabels=CLASSES, vmin=0, vmax=1 if normalised else None, cbar=True)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("Confusion matrix (row-normalised)" if normalised else "Confusion matrix"))
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def plot_roc_curves(y_true: np.ndarray, proba: np.ndarray, path: str | Path | None = None, title: str = "") -> Figure:
    """One-vs-rest ROC curve per class with its AUC."""
    y_true = np.asarray(y_true)
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    for k, name in enumerate(CLASSES):
        positives = y_true == k
        if positives.all() or not positives.any():
            continue  # a curve needs both positives and negatives
        fpr, tpr, _ = roc_curve(positives, proba[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positives, proba[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC curves (one-vs-rest)")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 5,
                    path: str | Path | None = None, title: str = "", colours: Sequence[str] | None = None) -> Figure:
    """A grid of RGB images with a title under each (optionally coloured, e.g. green/red for right/wrong)."""
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(2.3 * ncols, 2.5 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            ax.set_title(titles[i], fontsize=8, color=(colours[i] if colours else "black"))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_class_examples(images_by_class: Mapping[str, Sequence[np.ndarray]], path: str | Path | None = None) -> Figure:
    """Rows of example images, one row per class."""
    ncols = max((len(v) for v in images_by_class.values()), default=1)
    images, titles = [], []
    for name, imgs in images_by_class.items():
        for i in range(ncols):
            images.append(imgs[i] if i < len(imgs) else np.ones((8, 8, 3)))
            titles.append(name if i == 0 else "")
    return plot_image_grid(images, titles, ncols=ncols, path=path, title="Random images per class")


def plot_sample_predictions(images: np.ndarray, y_true: Sequence[int], y_pred: Sequence[int], confidence: Sequence[float],
                            path: str | Path | None = None, ncols: int = 6) -> Figure:
    """Test images with true and predicted class; green when right, red when wrong."""
    titles = [f"true {CLASSES[t]}\npred {CLASSES[p]} ({c:.2f})" for t, p, c in zip(y_true, y_pred, confidence)]
    colours = ["green" if t == p else "red" for t, p in zip(y_true, y_pred)]
    return plot_image_grid(list(images), titles, ncols=ncols, path=path, title="Sample predictions", colours=colours)


def plot_gradcam_grid(images: np.ndarray, overlays: np.ndarray, y_true: Sequence[int], y_pred: Sequence[int],
                      path: str | Path | None = None, title: str = "Grad-CAM") -> Figure:
    """Pairs of (image, Grad-CAM overlay), titled with true/predicted class, right in green and wrong in red."""
    pics, titles, colours = [], [], []
    for img, ov, t, p in zip(images, overlays, y_true, y_pred):
        ok = "right" if t == p else "WRONG"
        pics += [img, ov]
        titles += [f"true {CLASSES[t]}", f"pred {CLASSES[p]} ({ok})"]
        colours += ["black", "green" if t == p else "red"]
    return plot_image_grid(pics, titles, ncols=6, path=path, title=title, colours=colours)


def plot_bars_with_intervals(names: Sequence[str], values: Sequence[float], intervals: Sequence[Sequence[float]],
                             metric: str, path: str | Path | None = None) -> Figure:
    """Horizontal bars of one metric per model with 95% interval whiskers."""
    values = np.asarray(values, dtype=float)
    ci = np.asarray([iv if iv is not None and len(iv) == 2 else (np.nan, np.nan) for iv in intervals], dtype=float)
    err = np.vstack([values - ci[:, 0], ci[:, 1] - values])
    err = np.where(np.isfinite(err), np.clip(err, 0, None), 0)
    fig = Figure(figsize=(7, 0.6 * len(names) + 1.5))
    ax = fig.subplots()
    ax.barh(list(names), values, xerr=err, capsize=4, color="#6c8ebf")
    ax.set_xlabel(f"{metric} (95% interval)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_scatter(x: Sequence[float], y: Sequence[float], names: Sequence[str], xlabel: str, ylabel: str,
                 path: str | Path | None = None, logx: bool = False) -> Figure:
    """A labelled scatter plot, e.g. accuracy against FLOPs or latency."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.scatter(x, y, s=60)
    for xi, yi, name in zip(x, y, names):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=9)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_duplicate_diagnostics(scores: Sequence[float], accepted: Sequence[bool], threshold: float,
                               group_sizes: Mapping[int, int], path: str | Path | None = None) -> Figure:
    """Left: verified similarity of accepted pairs against the nearest rejected ones, with the threshold.
    Right: how many duplicate groups have each size (a long tail would mean chained distinct cells)."""
    fig = Figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2)
    scores, accepted = np.asarray(scores, dtype=float), np.asarray(accepted, dtype=bool)
    bins = np.linspace(min(scores.min(initial=threshold), threshold) - 0.02, 1.0, 40)
    left.hist(scores[accepted], bins=bins, color="tab:green", alpha=0.75, label=f"accepted ({accepted.sum()})")
    left.hist(scores[~accepted], bins=bins, color="tab:red", alpha=0.6, label=f"rejected, nearest ({(~accepted).sum()})")
    left.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    left.set(xlabel="verified similarity of a candidate pair", ylabel="pairs", title="Copies found vs rejected")
    left.legend(fontsize=8)
    sizes = sorted(group_sizes)
    right.bar([str(s) for s in sizes], [group_sizes[s] for s in sizes], color="tab:blue")
    right.set(xlabel="images in the group", ylabel="groups", title="Duplicate group sizes")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_learning_curve(table: Any, metric: str = "macro_f1", path: str | Path | None = None) -> Figure:
    """Macro-F1 (with 95% interval whiskers) against the number of training cells: one line per network and
    initialisation (pretrained solid, from scratch dashed). table: learning_curve.learning_curve_table."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for (model, init), rows in table.groupby(["model", "init"], sort=False):
        rows = rows.sort_values("train_cells")
        x, y = rows["train_cells"].to_numpy(dtype=float), rows[metric].to_numpy(dtype=float)
        low, high = rows[f"{metric}_ci_low"].to_numpy(dtype=float), rows[f"{metric}_ci_high"].to_numpy(dtype=float)
        err = np.where(np.isfinite([y - low, high - y]), np.clip([y - low, high - y], 0, None), 0)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linestyle="-" if init == "pretrained" else "--",
                    label=f"{model} ({init})")
    ax.set_xlabel("training cells (duplicate groups)")
    ax.set_ylabel(f"test {metric} (95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
