"""The session's smoke study (tests/conftest.py's `smoke_study`): which networks, and how it is run.

A module of its own, not conftest.py: notebooks/ has a conftest.py too, so `from conftest import ...` in a test
would find whichever was imported first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Two networks with differently shaped preprocessing (caffe-mode VGG16, ResNet50), and a learning-curve point at
# half the training cells of each.
SMOKE_STUDY_MODELS = ("vgg16", "resnet50")


def run_smoke_study(out: Path) -> subprocess.CompletedProcess:
    """run_all.py in the smoke profile into `out`: the two networks, the learning-curve point, the Comparison."""
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), "--profile", "smoke", "--models",
                           *SMOKE_STUDY_MODELS, "--train-fractions", "0.5", "--output", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
