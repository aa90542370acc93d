"""predict on files of any size and format, through the real CLI and a real saved model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bloodcell_lib.classes import CLASSES


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from bloodcell_lib.model import build_model
    from bloodcell_lib.model import save_model

    path = tmp_path_factory.mktemp("predict") / "vgg16.keras"  # the quickest real network to load
    save_model(build_model("vgg16", image_size=32, weights=None), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict images")
    rng = np.random.default_rng(0)
    smear = (rng.random((1500, 2000, 3)) * 80 + 150).astype(np.uint8)  # a large RGB smear photograph
    Image.fromarray(smear).save(folder / "large smear.jpg", quality=85)
    rgba = np.zeros((90, 120, 4), dtype=np.uint8)
    rgba[..., 2], rgba[20:70, 30:90, 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


@pytest.mark.slow  # builds VGG16
def test_predict_cli_prints_classes_and_writes_overlays(saved_model, images, tmp_path, capsys):
    from bloodcell_lib.cli import main

    files = [images / "large smear.jpg", images / "alpha.png", images / "broken.jpg"]
    assert main(["predict", "--model", str(saved_model), *map(str, files), "--gradcam", str(tmp_path / "cams"),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [str(f) for f in files]
    for row in rows[:2]:
        assert row["class"] in CLASSES
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        overlay = np.asarray(Image.open(row["gradcam"]))
        assert overlay.shape == (32, 64, 3)  # the image and its overlay side by side
    assert "error" in rows[2] and "broken.jpg" in rows[2]["error"]


@pytest.mark.slow  # VGG16 through a CLI subprocess
def test_predict_text_output(saved_model, images):
    run = subprocess.run([sys.executable, "-m", "bloodcell_lib", "predict", "--model", str(saved_model),
                          str(images / "alpha.png")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(str(images / "alpha.png")) and any(c in run.stdout for c in CLASSES)
