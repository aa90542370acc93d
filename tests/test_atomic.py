import json

import numpy as np
import pytest

from bloodcell_lib.atomic import atomic_path, write_json, write_text


def test_write_json_converts_numpy(tmp_path):
    target = write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(2)})
    assert json.loads(target.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 2}


def test_crash_while_writing_keeps_previous_file(tmp_path):
    target = tmp_path / "model.keras"
    write_text(target, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disconnect")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_write_json_is_strict_json(tmp_path):
    target = write_json(tmp_path / "r.json", {"auc": float("nan"), "ci": [np.float64("nan"), 0.5], "x": np.inf})
    assert json.loads(target.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == {
        "auc": None, "ci": [None, 0.5], "x": None}


def test_written_files_follow_the_umask_like_open(tmp_path):
    import os

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = write_text(tmp_path / "atomic.txt", "x")
    assert os.stat(target).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
