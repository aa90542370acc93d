"""Shared fixtures: synthetic datasets built once per session in temporary folders."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(autouse=True)
def _no_profile_override(monkeypatch):
    """Unit tests choose their profile and folders themselves; the variables are for the notebooks."""
    monkeypatch.delenv("BLOODCELL_PROFILE", raising=False)
    monkeypatch.delenv("BLOODCELL_OUTPUT", raising=False)
