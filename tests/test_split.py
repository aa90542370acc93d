import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ProvenanceError, SplitError
from bloodcell_lib.split import (
    IMAGE_SPLIT_WARNING,
    class_share_gap,
    dataset_changes,
    dataset_fingerprint,
    load_split,
    make_split,
    resolve_split,
    save_split,
    sidecar_path,
    split_sha256,
    split_summary,
)
from bloodcell_lib.synthetic import TINY_SET, load_manifest, make_synthetic_dataset


def cells_frame(root, groups_per_class=(40, 30, 50, 45, 35), max_copies=3, seed=0):
    """One row per image; each group holds 1..max_copies copies of one cell (as check-data reports them)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, n_groups in zip(CLASSES, groups_per_class):
        for g in range(n_groups):
            for k in range(rng.integers(1, max_copies + 1)):
                rows.append((f"{label}/{label[:3].upper()}_{g:03d}_{k}.jpg", label, f"{label}-g{g:03d}"))
    frame = pd.DataFrame(rows, columns=["path", "label", "group"])
    frame.attrs["data_root"] = str(root)
    return frame


def subsets_per_group(split):
    return split.groupby("group")["subset"].nunique()


def test_no_group_in_two_subsets_and_every_class_everywhere(tmp_path):
    split = make_split(cells_frame(tmp_path))
    assert (subsets_per_group(split) == 1).all()
    assert set(split["subset"]) == {"train", "val", "test"}
    for subset in ("train", "val", "test"):
        assert set(split.loc[split["subset"] == subset, "label"]) == set(CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_class_shares_within_five_points_and_fractions_near_target(tmp_path, seed):
    split = make_split(cells_frame(tmp_path, seed=seed), seed=seed)
    assert class_share_gap(split) <= 0.05
    fractions = split["subset"].value_counts(normalize=True)
    assert abs(fractions["test"] - 0.15) < 0.03
    assert abs(fractions["val"] - 0.15) < 0.03


def test_same_seed_same_csv_other_seed_other_csv(tmp_path):
    frame = cells_frame(tmp_path / "data")
    a, b, c = (save_split(make_split(frame, seed=s), tmp_path / f"{name}.csv")
               for name, s in (("a", 7), ("b", 7), ("c", 8)))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_metadata_groups_are_merged_with_duplicate_groups(tmp_path):
    frame = cells_frame(tmp_path / "data")
    first = frame.drop_duplicates("group")
    # Patient P1 owns the first cell of each class, P2 the next 4 basophil cells (named by bare file name).
    p1 = first.groupby("label").head(1)["path"].tolist()
    p2 = first[first["label"] == "basophil"].iloc[1:5]["path"].tolist()
    meta = tmp_path / "metadata.csv"
    pd.DataFrame({"file": p1 + [p.split("/")[-1] for p in p2], "group": ["P1"] * len(p1) + ["P2"] * len(p2)}
                 ).to_csv(meta, index=False)
    split = make_split(frame, metadata=meta, seed=3)
    assert (subsets_per_group(split) == 1).all()
    dup_groups = frame.set_index("path")["group"]
    for paths in (p1, p2):
        members = split["group"].isin(split.loc[split["path"].isin(paths), "group"])
        # Every copy of every cell that shares a patient ends up in one merged group and one subset.
        assert split.loc[members, "group"].nunique() == 1
        assert split.loc[members, "subset"].nunique() == 1
        assert set(frame.loc[frame["group"].isin(dup_groups[paths]), "path"]) == set(split.loc[members, "path"])


def test_metadata_naming_no_image_or_an_ambiguous_name_is_refused(tmp_path):
    frame = cells_frame(tmp_path / "data")
    with pytest.raises(SplitError, match="None of the 1 files"):
        make_split(frame, metadata=pd.DataFrame({"file": ["nope.jpg"], "group": ["x"]}))
    frame.loc[1, "path"] = "erythroblast/" + frame.loc[0, "path"].split("/")[-1]
    with pytest.raises(SplitError, match="matches 2 images"):
        make_split(frame, metadata=pd.DataFrame({"file": [frame.loc[0, "path"].split("/")[-1]], "group": ["x"]}))
    with pytest.raises(SplitError, match="columns 'file' and 'group'"):
        make_split(frame, metadata=pd.DataFrame({"name": ["a"], "patient": ["x"]}))


def test_image_split_puts_copies_on_both_sides_and_warns(tmp_path, caplog):
    frame = cells_frame(tmp_path, max_copies=4)
    with caplog.at_level(logging.WARNING, logger="bloodcell_lib.split"):
        split = make_split(frame, split_by="image")
    # That is the leak it exists to measure: copies of one cell in train and in test.
    assert (subsets_per_group(split) > 1).sum() > 10
    assert split["group"].tolist() == frame.set_index("path").loc[split["path"], "group"].tolist()
    assert IMAGE_SPLIT_WARNING in caplog.text
    summary = split_summary(split)
    assert IMAGE_SPLIT_WARNING in summary and "have a copy in train" in summary
    assert "no group appears in more than one subset" in split_summary(make_split(frame))


def test_too_few_groups_is_a_clear_error(tmp_path):
    with pytest.raises(SplitError, match="monocyte: 2"):
        make_split(cells_frame(tmp_path, groups_per_class=(10, 10, 2, 10, 10)))
    # Three groups per class is the minimum: one for each subset.
    split = make_split(cells_frame(tmp_path, groups_per_class=(3, 3, 3, 3, 3)))
    assert (subsets_per_group(split) == 1).all()
    for subset in ("train", "val", "test"):
        assert set(split.loc[split["subset"] == subset, "label"]) == set(CLASSES)


def test_bad_parameters_are_refused(tmp_path):
    frame = cells_frame(tmp_path)
    with pytest.raises(SplitError, match="fractions"):
        make_split(frame, val=0.5, test=0.5)
    with pytest.raises(SplitError, match="split_by"):
        make_split(frame, split_by="patient")
    frame.attrs.clear()
    with pytest.raises(SplitError, match="data_root"):
        make_split(frame)


def test_save_and_load_round_trip_with_sidecar(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    split = make_split(cells_frame(data), seed=5)
    path = save_split(split, tmp_path / "out" / "split.csv")
    side = json.loads(sidecar_path(path).read_text())
    assert side["data_root"] == str(data.resolve()) and side["seed"] == 5 and side["split_by"] == "group"
    assert side["val"] == 0.15 and side["test"] == 0.15 and side["created"]
    assert side["counts"]["test"]["myeloblast"] == int(((split.subset == "test") & (split.label == "myeloblast")).sum())
    loaded = load_split(path)
    pd.testing.assert_frame_equal(loaded, split[["path", "label", "group", "subset"]])
    assert loaded.attrs["data_root"] == str(data.resolve())
    assert loaded.attrs["split_path"] == str(path) and loaded.attrs["split_by"] == "group"
    assert len(split_sha256(path)) == 64 and split_sha256(path) == side["csv_sha256"]


def test_load_without_sidecar_needs_the_data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = save_split(make_split(cells_frame(data)), tmp_path / "split.csv")
    sidecar_path(path).unlink()
    with pytest.raises(SplitError, match="--data-dir"):
        load_split(path)
    assert load_split(path, data_root=data).attrs["data_root"] == str(data.resolve())
    # --data-dir may name the folder a Kaggle zip unpacked to, with the class folders a level below.
    first = load_split(path, data_root=data)["path"].iloc[0]
    for label in CLASSES:
        (data / label).mkdir()
    (data / first).write_bytes(b"")
    assert load_split(path, data_root=tmp_path).attrs["data_root"] == str(data.resolve())
    with pytest.raises(SplitError, match="does not exist"):
        load_split(path, data_root=tmp_path / "moved")


def test_load_refuses_edited_or_leaking_splits(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = save_split(make_split(cells_frame(data)), tmp_path / "split.csv")
    good = pd.read_csv(path)
    for column, value, message in (("label", "lymphocyte", "lymphocyte"), ("subset", "holdout", "holdout"),
                                   ("path", "../etc/passwd", "not a path inside")):
        bad = good.copy()
        bad.loc[3, column] = value
        bad.to_csv(path, index=False)
        with pytest.raises(SplitError, match=message):
            load_split(path)
    leaking = good.copy()
    group = leaking["group"].value_counts().index[0]  # a group with several copies
    rows = leaking.index[leaking["group"] == group]
    leaking.loc[rows[0], "subset"], leaking.loc[rows[1], "subset"] = "train", "test"
    leaking.to_csv(path, index=False)
    with pytest.raises(SplitError, match="leaks"):
        load_split(path)


def test_split_is_never_written_into_the_dataset(tmp_path):
    split = make_split(cells_frame(tmp_path))
    with pytest.raises(SplitError, match="inside the dataset folder"):
        save_split(split, tmp_path / "split.csv")


@pytest.mark.slow  # three CLI subprocesses
def test_cli_split_on_a_synthetic_set(tmp_path):
    data = tmp_path / "synth"
    manifest = make_synthetic_dataset(data, per_class=6, size=48, duplicates=1, seed=0)
    cells = load_manifest(manifest)
    meta = tmp_path / "cells.csv"
    cells.rename(columns={"cell_id": "group"})[["file", "group"]].to_csv(meta, index=False)
    out = tmp_path / "split.csv"
    cmd = [sys.executable, "-m", "bloodcell_lib", "split", str(data), "--out", str(out), "--seed", "3",
           "--metadata", str(meta)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Split written to" in run.stdout and "basophil" in run.stdout
    split = load_split(out)
    assert split.attrs["data_root"] == str(data.resolve())
    joined = split.merge(cells, left_on="path", right_on="file", validate="one_to_one")
    assert len(joined) == len(cells)
    assert (joined.groupby("cell_id")["subset"].nunique() == 1).all()  # no cell on two sides

    image_run = subprocess.run(cmd[:-2] + ["--split-by", "image", "--out", str(tmp_path / "leaky.csv")],
                               capture_output=True, text=True, timeout=120)
    assert image_run.returncode == 0, image_run.stderr
    assert IMAGE_SPLIT_WARNING in image_run.stdout and IMAGE_SPLIT_WARNING in image_run.stderr

    too_small = tmp_path / "tiny"
    make_synthetic_dataset(too_small, per_class=1, size=48, duplicates=1, seed=0)
    tiny_run = subprocess.run([sys.executable, "-m", "bloodcell_lib", "split", str(too_small), "--out",
                               str(tmp_path / "tiny.csv")], capture_output=True, text=True, timeout=120)
    assert tiny_run.returncode == 2 and "Too few" in tiny_run.stderr


# --- The split and the dataset must belong together -------------------------------------------------------


@pytest.fixture
def tiny_set(tmp_path):
    data = tmp_path / "data"
    make_synthetic_dataset(data, seed=0, **TINY_SET)
    return data


def test_dataset_fingerprint_follows_content_not_location_or_mtime(tiny_set, tmp_path):
    path = save_split(make_split(tiny_set, progress=False), tmp_path / "split.csv")
    split = load_split(path)
    side = json.loads(sidecar_path(path).read_text())
    fingerprint = dataset_fingerprint(split)
    assert side["dataset_sha256"] == fingerprint and len(side["image_sha256"]) == len(split)
    assert dataset_changes(split).unchanged and dataset_changes(split).fingerprint == fingerprint

    moved = tmp_path / "moved"
    shutil.copytree(tiny_set, moved)
    first = moved / split["path"].iloc[0]
    os.utime(first, (1, 1))  # touched, not changed
    assert dataset_fingerprint(load_split(path, data_root=moved)) == fingerprint
    first.write_bytes((tiny_set / split["path"].iloc[1]).read_bytes())  # another image's bytes
    assert dataset_fingerprint(load_split(path, data_root=moved)) != fingerprint


def _study_config(data, out):
    return RunConfig(arch="vgg16", data_dir=str(data), output_dir=str(out), weights=None)


def test_a_dataset_changed_since_the_study_split_is_refused_with_counts(tiny_set, tmp_path):
    cfg = _study_config(tiny_set, tmp_path / "out")
    split, path = resolve_split(cfg, verbose=0)  # made and saved in the output folder
    (tiny_set / "basophil" / "notes.txt").write_text("not an image")  # unreadable: check-data leaves it out
    again, _ = resolve_split(cfg, verbose=0)
    assert again.attrs["dataset_sha256"] == split.attrs["dataset_sha256"]

    names = split["path"].tolist()
    for k in range(3):  # three new images
        (tiny_set / "monocyte" / f"NEW_{k}.jpg").write_bytes((tiny_set / names[k]).read_bytes())
    (tiny_set / names[5]).unlink()  # one removed
    (tiny_set / names[6]).write_bytes((tiny_set / names[7]).read_bytes())  # one changed
    with pytest.raises(ProvenanceError) as info:
        resolve_split(cfg, verbose=0)
    message = str(info.value)
    assert "3 image(s) in the folder but not in the split" in message and "monocyte/NEW_0.jpg" in message
    assert "1 image(s) named in the split but missing" in message and names[5] in message
    assert "1 image(s) changed content" in message and names[6] in message
    assert f"python -m bloodcell_lib split {tiny_set.resolve()} --out {path}" in message
    assert "retrain" in message


def test_a_split_of_another_dataset_is_refused_for_training(tiny_set, tmp_path):
    other = tmp_path / "other"
    make_synthetic_dataset(other, per_class=7, size=48, duplicates=1, seed=5)  # same names, more, other pixels
    path = save_split(make_split(tiny_set, progress=False), tmp_path / "split.csv")
    cfg = _study_config(other, tmp_path / "out").replace(split_path=str(path))
    with pytest.raises(ProvenanceError) as info:
        resolve_split(cfg, verbose=0)
    message = str(info.value)
    assert "image(s) in the folder but not in the split" in message and "changed content" in message
    assert "python -m bloodcell_lib split" in message and str(other.resolve()) in message
    # The same split with its own dataset trains.
    split, _ = resolve_split(cfg.replace(data_dir=str(tiny_set)), verbose=0)
    assert len(split["path"]) == len(load_split(path))


def test_the_output_folders_split_is_reused_and_never_silently_overwritten(tiny_set, tmp_path):
    cfg = _study_config(tiny_set, tmp_path / "out")
    split, path = resolve_split(cfg, verbose=0)
    written = path.read_bytes()
    again, again_path = resolve_split(cfg, verbose=0)
    assert again_path == path and again["path"].tolist() == split["path"].tolist()
    with pytest.raises(SplitError, match="--split"):
        resolve_split(cfg.replace(seed=7), verbose=0)
    assert path.read_bytes() == written


# --- Cross-validation folds and learning-curve subsets ----------------------------------------------------------


@pytest.mark.parametrize("folds", [2, 5])
def test_the_k_fold_test_subsets_partition_the_images_and_keep_every_cell_in_one_fold(tmp_path, folds):
    frame = cells_frame(tmp_path)
    splits = [make_split(frame, folds=folds, fold=k, seed=3, progress=False) for k in range(1, folds + 1)]
    tests = [set(s.loc[s["subset"] == "test", "path"]) for s in splits]
    assert sum(len(t) for t in tests) == len(frame) and set().union(*tests) == set(frame["path"])  # disjoint, cover
    for split in splits:
        assert (subsets_per_group(split) == 1).all()  # no cell on two sides
        assert split.groupby("subset")["label"].nunique().to_dict() == {"test": 5, "train": 5, "val": 5}
        assert class_share_gap(split[split["subset"] == "test"]) < 0.1 or folds == 5
        assert split.attrs["folds"] == folds and split.attrs["test"] is None
    # Another seed, other folds.
    other = make_split(frame, folds=folds, fold=1, seed=4, progress=False)
    assert set(other.loc[other["subset"] == "test", "path"]) not in tests


def test_bad_fold_numbers_are_refused(tmp_path):
    frame = cells_frame(tmp_path)
    for folds, fold in ((1, 1), (3, 0), (3, 4), (None, 1)):
        with pytest.raises(SplitError, match="folds"):
            make_split(frame, folds=folds, fold=fold, progress=False)


def test_a_fold_runs_split_is_made_in_its_own_folder_and_reused(tiny_set, tmp_path):
    from bloodcell_lib.config import resolve

    cfg = resolve("smoke", data_dir=str(tiny_set), output_dir=str(tmp_path / "out"), folds=2, fold=2)
    assert cfg.output_path == tmp_path / "out" / "cv" / "seed42-fold2of2" and cfg.study_path == tmp_path / "out"
    split, path = resolve_split(cfg, verbose=0)
    assert path.parent == cfg.output_path and load_split(path).attrs["fold"] == 2
    again, _ = resolve_split(cfg, verbose=0)
    assert again["subset"].tolist() == split["subset"].tolist()
    # The hold-out split of the study is not this one, and a fold folder refuses another fold's settings.
    with pytest.raises(SplitError, match="other settings"):
        resolve_split(cfg.replace(fold=1), verbose=0)


def test_a_training_fraction_keeps_whole_cells_per_class_nested_and_the_same_val_and_test(tmp_path):
    from bloodcell_lib.split import subsample_training

    split = make_split(cells_frame(tmp_path), seed=3, progress=False)
    train = split[split["subset"] == "train"]
    kept = {}
    for fraction in (0.1, 0.25, 0.5, 1.0):
        sub = subsample_training(split, fraction, seed=3)
        assert sub.loc[sub["subset"] != "train", "path"].tolist() == split.loc[split["subset"] != "train",
                                                                                "path"].tolist()
        sub_train = sub[sub["subset"] == "train"]
        kept[fraction] = set(sub_train["group"])
        # Whole cells: every copy of a kept cell is kept.
        assert len(sub_train) == int(train["group"].isin(kept[fraction]).sum())
        for label in CLASSES:
            n_groups = train.loc[train["label"] == label, "group"].nunique()
            assert sub_train.loc[sub_train["label"] == label, "group"].nunique() == max(1, round(fraction * n_groups))
    assert kept[0.1] <= kept[0.25] <= kept[0.5] <= kept[1.0] == set(train["group"])
    with pytest.raises(SplitError, match="train_fraction"):
        subsample_training(split, 0.0, seed=3)


def test_a_learning_curve_point_trains_on_a_share_of_the_study_splits_cells(tiny_set, tmp_path):
    from bloodcell_lib.config import resolve

    cfg = resolve("smoke", data_dir=str(tiny_set), output_dir=str(tmp_path / "out"), train_fraction=0.5)
    assert cfg.output_path == tmp_path / "out" / "learning_curve" / "scratch-frac0.5"
    split, path = resolve_split(cfg, verbose=0)
    study = load_split(tmp_path / "out" / "split.csv")  # made on the way, in the study's folder
    assert split.loc[split["subset"] == "test", "path"].tolist() == study.loc[study["subset"] == "test", "path"].tolist()
    assert 0 < (split["subset"] == "train").sum() < (study["subset"] == "train").sum()
    assert load_split(path).attrs["train_fraction"] == 0.5
    # Training on it is not refused for the images it leaves out on purpose (check_split_matches_dataset) ...
    from bloodcell_lib.split import check_split_matches_dataset

    assert check_split_matches_dataset(load_split(path))
    # ... but a sidecar that does not say which images were left out is.
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar["left_out_sha256"] = None
    sidecar_path(path).write_text(json.dumps(sidecar))
    with pytest.raises(ProvenanceError, match="not in the split"):
        check_split_matches_dataset(load_split(path))
