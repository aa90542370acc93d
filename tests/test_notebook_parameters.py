"""What papermill can set: every notebook's parameters cell holds MOUNT_DRIVE and OUTPUT_DIR, and the Setup cell
that mounts Google Drive runs after it, so an injected MOUNT_DRIVE = True takes effect."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_mount_drive_is_a_parameter_read_after_the_parameters_cell(path):
    cells = nbformat.read(path, as_version=4).cells
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    parameters = cells[tagged[0]].source
    assert "MOUNT_DRIVE = False" in parameters and 'OUTPUT_DIR = "auto"' in parameters
    mounting = [i for i, cell in enumerate(cells) if cell.cell_type == "code" and "drive.mount(" in cell.source]
    assert len(mounting) == 1 and mounting[0] > tagged[0]
    assert not any("MOUNT_DRIVE =" in cell.source for i, cell in enumerate(cells)
                   if cell.cell_type == "code" and i != tagged[0])
    assert "../Saved Models" not in parameters


def test_every_notebook_is_there():
    assert {p.stem for p in NOTEBOOKS} >= {"Comparison", "VGG16", "ResNet50", "Xception", "DenseNet201",
                                            "EfficientNetB3"}
