"""Figures render to real PNG files and mark what they claim to mark."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from bloodcell_lib import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_history_marks_the_phase_boundary(tmp_path):
    history = {"epoch": [1, 2, 3, 4], "phase": [1, 1, 2, 2], "loss": [1.5, 1.2, 1.0, 0.9],
               "val_loss": [1.6, 1.3, 1.1, 1.0], "accuracy": [0.3, 0.5, 0.6, 0.7], "val_accuracy": [0.2, 0.4, 0.5, 0.6]}
    fig = figures.plot_history(history, path=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    for ax in fig.axes:
        vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
        assert [line.get_xdata()[0] for line in vertical] == [2.5]


def test_history_without_phase_two_has_no_boundary():
    fig = figures.plot_history({"loss": [1.0, 0.8], "accuracy": [0.4, 0.5]})
    assert all(len(set(line.get_xdata())) > 1 for ax in fig.axes for line in ax.get_lines())


def test_confusion_and_roc_figures_are_written(tmp_path):
    y = np.repeat(np.arange(5), 4)
    proba = np.eye(5)[y] * 0.6 + 0.08
    figures.plot_confusion_matrix(np.eye(5) * 4, path=tmp_path / "cm.png")
    fig = figures.plot_roc_curves(y, proba, path=tmp_path / "roc.png")
    assert len(fig.axes[0].get_lines()) == 6  # five classes and the chance diagonal
    assert (tmp_path / "cm.png").read_bytes().startswith(PNG_MAGIC)


def test_gradcam_grid_colours_wrong_predictions_red():
    img = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    fig = figures.plot_gradcam_grid(img, img, y_true=[0, 1], y_pred=[0, 2])
    colours = [ax.title.get_color() for ax in fig.axes if ax.get_title().startswith("pred")]
    assert colours == ["green", "red"]


def test_bars_accept_missing_intervals():
    fig = figures.plot_bars_with_intervals(["a", "b"], [0.8, 0.6], [[0.7, 0.9], None], "accuracy")
    assert len(fig.axes[0].patches) == 2


def test_figure_png_renders_bytes():
    assert figures.figure_png(figures.plot_scatter([1, 2], [0.5, 0.6], ["a", "b"], "x", "y")).startswith(PNG_MAGIC)


@pytest.mark.slow  # starts a kernel process
def test_a_figure_displays_as_png_in_a_notebook_kernel():
    """Regression: our pyplot-free figures used to print as '<Figure size ...>' text in notebooks."""
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(
        "import numpy as np\nfrom bloodcell_lib.figures import plot_image_grid\n"
        "plot_image_grid([np.zeros((8, 8, 3))], ['x'])")])
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    assert "image/png" in nb.cells[0].outputs[-1]["data"]


def test_every_figure_is_drawn_by_the_library_or_a_notebook():
    """A plot nothing calls is dead code that looks like a feature (plot_sample_predictions once, plot_matrix later)."""
    root = Path(__file__).resolve().parents[1]
    users = [*(root / "bloodcell_lib").glob("*.py"), *(root / "notebooks").glob("*.py"),
             *(root / "notebooks").glob("*.ipynb"), *(root / "benchmarks").glob("*.py"), root / "run_all.py"]
    text = "\n".join(path.read_text(encoding="utf-8") for path in users if path.is_file())
    public = [name for name, fn in inspect.getmembers(figures, inspect.isfunction)
              if not name.startswith("_") and fn.__module__ == figures.__name__]
    # Any mention besides the function's own definition counts (figure_png is passed, not called).
    unused = [name for name in public if len(re.findall(rf"\b{name}\b", text)) < 2]
    assert unused == []
