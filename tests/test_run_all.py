"""run_all.py: real papermill runs of the notebooks, a failing notebook does not stop the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_all  # noqa: E402


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_models_are_chosen_by_key_or_notebook_name():
    available = run_all.model_notebooks()
    assert list(available) == ["vgg16", "resnet50", "xception", "densenet201", "efficientnetb3"]
    assert list(run_all.choose_models(["DenseNet201", "vgg16"], available)) == ["densenet201", "vgg16"]
    with pytest.raises(SystemExit, match="lenet"):
        run_all.choose_models(["lenet"], available)


def test_a_failing_notebook_does_not_stop_the_comparison(tmp_path):
    run = _run("--profile", "paper", "--data-dir", str(tmp_path / "no such folder"), "--models", "vgg16",
               "--output", str(tmp_path / "OUT"))
    assert run.returncode == 1
    assert "FAILED" in run.stdout and "VGG16.ipynb" in run.stdout
    assert "Comparison.ipynb ok" in run.stdout
    assert (tmp_path / "OUT" / "executed_notebooks" / "Comparison.ipynb").exists()


def test_smoke_run_of_one_model_writes_everything(tmp_path):
    out = tmp_path / "OUT"
    run = _run("--profile", "smoke", "--models", "vgg16", "--output", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("vgg16.keras", "vgg16_training_history.json", "vgg16_training_history.pkl", "vgg16_results.json",
                 "vgg16_predictions.csv", "shortcut_baseline_results.json", "comparison.csv", "comparison.md",
                 "executed_notebooks/VGG16.ipynb", "executed_notebooks/Comparison.ipynb"):
        assert (out / name).exists(), name
    executed = json.loads((out / "executed_notebooks" / "VGG16.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # examples, preprocessing, augmentation, curves, confusion, ROC, Grad-CAM
    assert "[1/2] VGG16.ipynb ok" in run.stdout and "[2/2] Comparison.ipynb ok" in run.stdout
