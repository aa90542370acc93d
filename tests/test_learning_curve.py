"""learning_curve.py: the points of a learning curve gathered from their folders, tested on the study's test cells."""

from __future__ import annotations

import pandas as pd

from bloodcell_lib.config import resolve
from bloodcell_lib.learning_curve import CURVE_FIGURE, CURVE_FILE, display_learning_curve, write_learning_curve
from bloodcell_lib.split import resolve_split
from test_crossval import _fake_run


def _study_with_a_point(tiny_set, out, fraction=0.5):
    """A study folder whose own VGG16 run is the point at 1.0, and the config and split of a point at `fraction`."""
    study = resolve("smoke", data_dir=str(tiny_set), output_dir=str(out))
    split, _ = resolve_split(study, verbose=0)
    _fake_run(study, split, "vgg16", skill=0.7)
    cfg = resolve("smoke", data_dir=str(tiny_set), output_dir=str(out), train_fraction=fraction)
    point, path = resolve_split(cfg, verbose=0)
    return cfg, point, path


def test_the_learning_curve_has_a_point_per_fraction_and_initialisation_on_the_same_test_cells(tiny_set, tmp_path):
    out = tmp_path / "OUT"
    study = resolve("smoke", data_dir=str(tiny_set), output_dir=str(out))
    split, _ = resolve_split(study, verbose=0)
    _fake_run(study, split, "vgg16", skill=0.7)  # the study's own run: the point at fraction 1.0
    assert write_learning_curve(out)[0].empty  # no curve points yet: no table, no figure
    assert not (out / CURVE_FILE).exists()
    for fraction in (0.25, 0.5):
        cfg = resolve("smoke", data_dir=str(tiny_set), output_dir=str(out), train_fraction=fraction)
        point, _ = resolve_split(cfg, verbose=0)
        _fake_run(cfg, point, "vgg16", skill=0.3 + fraction)
    table, problems = write_learning_curve(out)
    assert problems == [] and (out / CURVE_FILE).is_file() and (out / CURVE_FIGURE).is_file()
    assert table["train_fraction"].tolist() == [0.25, 0.5, 1.0] and set(table["init"]) == {"scratch"}
    assert table["train_cells"].is_monotonic_increasing and table["train_cells"].iloc[0] < table["train_cells"].iloc[-1]
    assert table["n_test"].nunique() == 1  # every point tested on the study's test cells
    assert "macro_f1 [95% CI]" in display_learning_curve(table)
    assert pd.read_csv(out / CURVE_FILE)["macro_f1"].tolist() == table["macro_f1"].tolist()


def test_a_point_tested_on_other_cells_is_left_out_and_named(tiny_set, tmp_path):
    out = tmp_path / "OUT"
    cfg, point, path = _study_with_a_point(tiny_set, out)
    _fake_run(cfg, point, "vgg16", skill=0.5)
    edited = pd.read_csv(path)
    edited.loc[edited["subset"] == "test", "subset"] = "val"
    edited.to_csv(path, index=False)
    table, problems = write_learning_curve(out)
    assert table["train_fraction"].tolist() == [1.0] and "other images" in problems[0]


def test_an_unreadable_results_file_of_a_point_is_named_not_fatal(tiny_set, tmp_path):
    out = tmp_path / "OUT"
    cfg, _, _ = _study_with_a_point(tiny_set, out)
    (cfg.output_path / "vgg16_results.json").write_text("{not json")
    table, problems = write_learning_curve(out)
    assert table["train_fraction"].tolist() == [1.0] and "unreadable" in problems[0]
