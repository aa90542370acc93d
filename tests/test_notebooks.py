"""The committed notebooks are exactly their rendering from the template: parameters cell, no outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bloodcell_lib.registry import ARCHITECTURES

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _render_module():
    spec = importlib.util.spec_from_file_location("render", NOTEBOOKS / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDER = _render_module()
# One notebook per registry entry, named after its `notebook` stem, and the Comparison.
EXPECTED = [f"{spec.notebook}.ipynb" for spec in ARCHITECTURES.values()] + ["Comparison.ipynb"]


def test_every_expected_notebook_is_rendered():
    assert sorted(RENDER.rendered()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_equals_its_rendering(name):
    assert (NOTEBOOKS / name).read_text(encoding="utf-8") == RENDER.rendered()[name], (
        f"{name} differs from the template; run `python notebooks/render.py`")


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_has_parameters_cell_and_no_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0]["cell_type"] == "code"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("name", EXPECTED)
def test_notebooks_define_no_functions(name):
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "def " not in code and "class " not in code and "lambda" not in code


def test_check_mode_detects_a_stale_notebook(tmp_path, monkeypatch):
    for name, text in RENDER.rendered().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(RENDER, "HERE", tmp_path)
    assert RENDER.main(["--check"]) == 0
    (tmp_path / "VGG16.ipynb").write_text("{}", encoding="utf-8")
    assert RENDER.main(["--check"]) == 1


def test_a_notebook_exists_for_every_registry_entry():
    for name in EXPECTED:
        assert (NOTEBOOKS / name).exists(), name
