from types import SimpleNamespace

import pytest
from matplotlib.figure import Figure

from bloodcell_lib import study, synthetic
from bloodcell_lib.dataset import check_dataset


@pytest.fixture(scope="module")
def report(small_set):
    return check_dataset(small_set, progress=False)


def test_duplicate_check_shows_scores_on_both_sides_of_the_threshold_and_group_sizes(report):
    fig = study.show_duplicate_check(report)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    scores, sizes = fig.axes
    assert any(line.get_xdata()[0] == report.min_score for line in scores.get_lines())
    bar_heights = [p.get_height() for p in sizes.patches]
    assert sum(bar_heights) == len({r.group for r in report.records})


def test_boundary_pairs_show_both_images_of_each_pair_with_the_verdict(report):
    fig = study.show_boundary_pairs(report, n=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6
    verdicts = [ax.get_title() for ax in shown[1::2]]
    assert all(("copy" in t) or ("distinct" in t) for t in verdicts)


def test_a_notebook_without_a_dataset_trains_on_the_stand_in_made_once_and_says_so(tmp_path):
    cfg = study.configure("vgg16", profile="smoke", output_dir=str(tmp_path))
    assert cfg.data_dir == str(tmp_path / "synthetic_data")
    assert (tmp_path / "synthetic_data" / synthetic.MANIFEST_NAME).is_file()
    stamp = (tmp_path / "synthetic_data" / synthetic.STAMP_NAME).read_text()
    assert study.configure("vgg16", profile="smoke", output_dir=str(tmp_path)) == cfg  # resolved alike, set reused
    assert (tmp_path / "synthetic_data" / synthetic.STAMP_NAME).read_text() == stamp
    assert "NOTE: data_dir → " in study.describe(cfg) and "no dataset given" in study.describe(cfg)


def test_describe_names_the_input_size_and_every_change(tmp_path):
    cfg = study.configure("xception", profile="smoke", output_dir=str(tmp_path))
    text = study.describe(cfg)
    assert "input 71×71 px" in text and "NOTE: image_size 32 → 71: the smallest Xception accepts" in text
    assert "Profile      : smoke (given explicitly)" in text


def test_a_dataset_folder_given_is_never_replaced_by_the_stand_in(tmp_path):
    cfg = study.configure("vgg16", data_dir=str(tmp_path / "typo"), output_dir=str(tmp_path), weights="none")
    assert cfg.profile == "paper" and cfg.data_dir == str(tmp_path / "typo")
    assert not (tmp_path / "synthetic_data").exists()


def test_the_missing_table_says_none_when_nothing_is_missing():
    complete = SimpleNamespace(missing=[], problems=[])
    assert study.missing_table(complete)["missing or partial"].tolist() == ["none"]
    partial = SimpleNamespace(missing=["resnet50 (no results file)"], problems=[])
    assert study.missing_table(partial)["missing or partial"].tolist() == ["resnet50 (no results file)"]
