"""nbval runs the notebooks in the smoke profile, into a temporary output folder, Comparison last."""

from __future__ import annotations

import os
import tempfile

# The kernels nbval starts inherit these; the notebooks read them through bloodcell_lib.config.
os.environ.setdefault("BLOODCELL_PROFILE", "smoke")
os.environ.setdefault("BLOODCELL_OUTPUT", tempfile.mkdtemp(prefix="bloodcell-nbval-"))
# Nobody watches these kernels: Keras writes a line per epoch, not a bar of one output per step (progress.py).
os.environ.setdefault("BLOODCELL_HEADLESS", "1")


def pytest_collection_modifyitems(items):
    """Run the Comparison notebook after the model notebooks, so it has results to compare."""
    items.sort(key=lambda item: item.path.name == "Comparison.ipynb")
