"""Shared fixtures: synthetic datasets and one smoke study, built once per session in temporary folders."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil
import subprocess
from pathlib import Path

import pytest

from _smoke_study import run_smoke_study
from bloodcell_lib.synthetic import TINY_SET, make_synthetic_dataset

# A set big enough to show copies near the duplicate threshold, still made in well under a second.
SMALL_SET = {"per_class": 5, "size": 64, "duplicates": 2, "seed": 3}


@pytest.fixture(autouse=True)
def _no_profile_override(monkeypatch):
    """Unit tests choose their profile and folders themselves; the variables are for the notebooks."""
    monkeypatch.delenv("BLOODCELL_PROFILE", raising=False)
    monkeypatch.delenv("BLOODCELL_OUTPUT", raising=False)


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> Path:
    """The tiny synthetic set (synthetic.TINY_SET, seed 3): every class, one copy per cell. Shared by the whole
    session: read it, never write into it (tiny_set_copy is a private copy)."""
    root = tmp_path_factory.mktemp("tiny_set") / "data"
    make_synthetic_dataset(root, seed=3, **TINY_SET)
    return root


@pytest.fixture(scope="session")
def small_set_params() -> dict[str, int]:
    """The parameters `small_set` was made with (per_class, size, duplicates, seed)."""
    return dict(SMALL_SET)


@pytest.fixture(scope="session")
def small_set(tmp_path_factory, small_set_params) -> Path:
    """A small synthetic set with two copies per cell (SMALL_SET). Shared: read it, never write into it."""
    root = tmp_path_factory.mktemp("small_set") / "data"
    make_synthetic_dataset(root, **small_set_params)
    return root


@pytest.fixture
def tiny_set_copy(tiny_set, tmp_path) -> Path:
    """A private copy of the tiny set, for a test that deletes, damages or adds files."""
    return Path(shutil.copytree(tiny_set, tmp_path / "tiny set"))


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`run_all.py --profile smoke --models vgg16 resnet50 --train-fractions 0.5` run once per session (the main
    job as a user starts it, a papermill kernel per notebook): (the finished process, its output folder). The slow
    tests of run_all, evaluation and the learning curve read it; none writes into it except through the CLI's
    compare."""
    out = tmp_path_factory.mktemp("smoke_study") / "OUT"
    return run_smoke_study(out), out
