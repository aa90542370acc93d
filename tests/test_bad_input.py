"""Nothing raw, nothing lost: every failure a user can cause ends in a clear message, exit code 2 (130 for Ctrl-C),
no traceback, and no finished work lost. The CLI runs in-process on a one-convolution registry network."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bloodcell_lib import evaluation, training
from bloodcell_lib.cli import main
from bloodcell_lib.errors import OutputError
from bloodcell_lib.model import build_model, save_model
from bloodcell_lib.registry import ARCHITECTURES

from _tinynet import TINYNET

pytestmark = pytest.mark.slow  # every test uses the `world` fixture, which trains a network


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_set):
    """A tiny synthetic set, its split, a tinynet trained one epoch, a 3- and a 7-class model, a broken .keras."""
    spec = TINYNET
    ARCHITECTURES[spec.key] = spec
    try:
        root = tmp_path_factory.mktemp("bad_input")
        shutil.copytree(tiny_set, root / "data")
        assert main(["train", *_TRAIN.format(data=root / "data", out=root / "OUT").split("|")]) == 0
        for n in (3, 7):
            save_model(build_model("tinynet", num_classes=n, image_size=32, weights=None), root / f"c{n}" / "m.keras")
        (root / "bad.keras").write_bytes(b"PK\x03\x04 not really an archive" * 8)
        (root / "a file").write_text("x")
        yield root
    finally:
        del ARCHITECTURES[spec.key]


_TRAIN = "--arch|tinynet|--data-dir|{data}|--epochs|1|--image-size|32|--weights|none|--output|{out}|--profile|smoke"

# (probe, argv with {placeholders}, exit code, fragment of the message)
BAD_INVOCATIONS = [
    ("train --output is a file", "train|" + _TRAIN.replace("{out}", "{root}/a file"), 2, "is a file, not a folder"),
    ("evaluate --output is a file", "evaluate|--model|{model}|--split|{split}|--output|{root}/a file",
     2, "is a file, not a folder"),
    ("predict --gradcam is a file", "predict|--model|{model}|{img}|--gradcam|{root}/a file", 2,
     "is a file, not a folder"),
    ("check-data --json is a folder", "check-data|{data}|--quiet|--json|{root}", 2, "it is a folder"),
    ("split --out is a folder", "split|{data}|--out|{root}", 2, "it is a folder"),
    ("train --image-size 10000", "train|" + _TRAIN.replace("|32|", "|10000|"), 2, "the limit is 64 pixels"),
    ("train vgg16 --image-size 10000", "train|" + _TRAIN.replace("|32|", "|10000|").replace("tinynet", "vgg16"),
     2, "the limit is 448 pixels"),
    ("evaluate a 3-class model", "evaluate|--model|{root}/c3/m.keras|--split|{split}|--output|{root}/e3",
     2, "has output shape (None, 3), but this study has 5 classes"),
    ("predict with a 3-class model", "predict|--model|{root}/c3/m.keras|{img}", 2, "(None, 3)"),
    ("predict with a 7-class model", "predict|--model|{root}/c7/m.keras|{img}", 2, "(None, 7)"),
    ("predict a folder", "predict|--model|{model}|{data}", 2, "is a folder, not an image file"),
    ("predict a missing file", "predict|--model|{model}|{root}/nope.jpg", 2, "no such file"),
    ("predict with a corrupt .keras", "predict|--model|{root}/bad.keras|{img}", 2, "not a Keras 3 `.keras` archive"),
    ("predict with a folder as model", "predict|--model|{data}|{img}", 2, "is a folder, not a model file"),
    ("evaluate a missing model", "evaluate|--model|{root}/nope.keras|--split|{split}", 2, "No model file"),
]


def _argv(template: str, root: Path) -> list[str]:
    img = next((root / "data").rglob("*.jpg"))
    values = {"root": root, "data": root / "data", "out": root / "OUT", "model": root / "OUT" / "tinynet.keras",
              "split": root / "OUT" / "split.csv", "img": img}
    return [part.format(**values) for part in template.split("|")]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("probe, template, code, fragment", BAD_INVOCATIONS, ids=[b[0] for b in BAD_INVOCATIONS])
def test_bad_invocation_gives_a_clear_message(world, capsys, probe, template, code, fragment):
    got, text = _run(_argv(template, world), capsys)
    assert "Traceback" not in text and "File not found" not in text  # Keras' wording for a corrupt archive
    assert got == code, text[-2000:]
    assert fragment in text


def test_a_small_set_with_small_fractions_still_splits(world, capsys, tmp_path):
    got, text = _run(["split", str(world / "data"), "--out", str(tmp_path / "s.csv"), "--val", "0.05",
                      "--test", "0.05"], capsys)
    assert got == 0 and "Traceback" not in text and (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("code, fragment", [(errno.ENOSPC, "disk or quota is full"),
                                            (errno.EROFS, "is not writable")])
def test_full_or_read_only_disk_is_a_clear_error(world, capsys, tmp_path, monkeypatch, code, fragment):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for argv in (["split", str(world / "data"), "--out", str(tmp_path / "s.csv")],
                 ["check-data", str(world / "data"), "--quiet", "--json", str(tmp_path / "r.json")]):
        got, text = _run(argv, capsys)
        assert got == 2 and fragment in text and "Traceback" not in text


def test_evaluate_writes_all_results_or_none(world, capsys, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(world / "OUT" / "tinynet.keras"), "--split", str(world / "OUT" / "split.csv"),
            "--output", str(out), "--gradcam-images", "2", "--bootstrap", "10"]

    def full_disk(*args, **kwargs):
        raise OutputError("Cannot write roc.png: the disk or quota is full.")

    monkeypatch.setattr(evaluation, "save_figures", full_disk)
    got, text = _run(argv, capsys)
    assert got == 2 and "disk or quota is full" in text and "Traceback" not in text
    assert list(out.iterdir()) == []  # no predictions CSV of a run that did not finish, no staging folder
    monkeypatch.undo()
    got, text = _run(argv, capsys)
    assert got == 0, text[-2000:]
    names = {p.name for p in out.iterdir()}
    assert {"tinynet_predictions.csv", "tinynet_results.json", "tinynet_roc.png"} <= names
    assert not [n for n in names if n.startswith(".")]
    figures = json.loads((out / "tinynet_results.json").read_text())["figures"]
    assert figures and all(Path(f).parent == out and Path(f).exists() for f in figures)


# --- Training: interrupted, locked, damaged, changed settings, leftovers -------------------------------------


def _interrupt_after_first_epoch(monkeypatch):
    original = training._EpochRecorder.on_epoch_end

    def then_ctrl_c(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(training._EpochRecorder, "on_epoch_end", then_ctrl_c)


def _train_argv(world, out: Path, *extra: str) -> list[str]:
    return ["train", *_TRAIN.format(data=world / "data", out=out).replace("|1|", "|2|").split("|"), *extra]


def test_ctrl_c_saves_and_says_how_to_resume_then_a_rerun_resumes(world, capsys, tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    _interrupt_after_first_epoch(monkeypatch)
    got, text = _run(_train_argv(world, out), capsys)
    assert got == 130 and "Traceback" not in text
    assert "interrupted after epoch 1; run the same command again to resume" in text
    monkeypatch.undo()
    got, text = _run(_train_argv(world, out), capsys)
    assert got == 0 and "Resuming after epoch 1" in text
    assert json.loads((out / "tinynet_training_history.json").read_text())["epoch"] == [1, 2]


def test_a_rerun_with_other_settings_keeps_the_saved_progress_aside(world, capsys, tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    _interrupt_after_first_epoch(monkeypatch)
    assert _run(_train_argv(world, out), capsys)[0] == 130
    saved = sorted(p.name for p in (out / ".resume" / "tinynet").iterdir())
    monkeypatch.undo()
    # A smaller batch: the usual reaction to running out of memory.
    got, text = _run(_train_argv(world, out, "--batch-size", "8"), capsys)
    assert got == 0 and "batch_size 16 → 8" in text and "Delete" in text
    aside = [p for p in (out / ".resume").iterdir() if p.name.startswith("tinynet.set-aside-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == saved


def test_a_damaged_snapshot_is_moved_aside_and_training_starts_over(world, capsys, tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    _interrupt_after_first_epoch(monkeypatch)
    assert _run(_train_argv(world, out), capsys)[0] == 130
    monkeypatch.undo()
    snapshot = out / ".resume" / "tinynet" / "phase1-epoch1.npz"
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # truncated, as by a full Drive
    got, text = _run(_train_argv(world, out), capsys)
    assert got == 0 and "Traceback" not in text, text[-2000:]
    assert "phase1-epoch1.npz is damaged" in text and "training starts from epoch 1" in text
    aside = [p for p in (out / ".resume").iterdir() if ".set-aside-" in p.name]
    assert len(aside) == 1 and (aside[0] / "phase1-epoch1.npz").exists()  # moved, never deleted
    assert json.loads((out / "tinynet_training_history.json").read_text())["meta"]["resumed_from_epoch"] is None


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(world, capsys, tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".tinynet.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                       "started": "2024-01-01T00:00:00+00:00"}))
        got, text = _run(_train_argv(world, out), capsys)
        assert got == 2 and "Traceback" not in text
        assert f"Another run is training tinynet into {out}" in text and f"PID {sleeper.pid}" in text
        assert (out / ".tinynet.lock").exists() and not (out / "tinynet.keras").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The first run is gone: its lock is stale, taken over with a notice, and released at the end.
    got, text = _run(_train_argv(world, out), capsys)
    assert got == 0 and "stale lock" in text and not (out / ".tinynet.lock").exists()


def test_temporary_files_of_a_save_killed_midway_are_removed_on_the_next_run(world, capsys, tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    leftovers = [out / ".tinynet.k3j2_x9a.tmp.keras", out / ".tinynet_training_history.abc.tmp.json"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    got, text = _run(_train_argv(world, out), capsys)
    assert got == 0 and not any(p.exists() for p in leftovers)
    assert "left by a run killed while saving" in text


def test_explicit_profile_wins_over_the_environment_and_is_printed(world, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_PROFILE", "smoke")
    monkeypatch.setenv("BLOODCELL_OUTPUT", str(tmp_path / "from the environment"))
    # A missing split stops the run right after the configuration is printed.
    got, text = _run(["train", "--arch", "tinynet", "--data-dir", str(world / "data"), "--profile", "paper",
                      "--weights", "none", "--image-size", "32", "--output", str(tmp_path / "OUT"),
                      "--split", str(tmp_path / "no split.csv")], capsys)
    assert got == 2 and "Traceback" not in text
    assert "Profile paper (given explicitly (it wins over BLOODCELL_PROFILE=smoke))" in text
    assert "NOTE: output_dir given explicitly (it wins over BLOODCELL_OUTPUT=" in text
    assert not (tmp_path / "from the environment").exists()


def test_a_size_the_network_cannot_take_is_refused_before_anything_is_built(world, capsys, tmp_path):
    got, text = _run(["train", "--arch", "xception", "--data-dir", str(world / "data"), "--image-size", "32",
                      "--weights", "none", "--output", str(tmp_path / "OUT")], capsys)
    assert got == 2 and "Xception needs images of at least 71×71 pixels, got 32" in text
    assert "Profile" not in text and not (tmp_path / "OUT").exists()
