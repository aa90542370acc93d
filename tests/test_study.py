import json

import pytest
from matplotlib.figure import Figure

from bloodcell_lib import study, synthetic
from bloodcell_lib.dataset import check_dataset


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "data"
    synthetic.make_synthetic_dataset(root, per_class=6, size=64, duplicates=2, seed=4)
    return check_dataset(root, progress=False)


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


def test_a_synthetic_set_from_an_older_generator_is_made_again(tmp_path):
    cfg = study.configure("vgg16", profile="smoke", output_dir=str(tmp_path))
    data = study.ensure_synthetic_data(cfg)
    stamp = data / "synth_params.json"
    first = stamp.read_text()
    assert study.ensure_synthetic_data(cfg) == data and stamp.read_text() == first  # reused as it is
    old = json.loads(first)
    del old["generator"]  # a stamp written before copies followed real-world ranges
    stamp.write_text(json.dumps(old))
    marker = data / "basophil" / "stale.jpg"
    marker.write_bytes(b"stale")
    study.ensure_synthetic_data(cfg)
    assert json.loads(stamp.read_text())["generator"] == synthetic.GENERATOR_VERSION
    assert not marker.exists()
