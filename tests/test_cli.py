"""The command line: every command listed on one line, user errors exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bloodcell_lib.cli import build_parser, main
from bloodcell_lib.split import make_split, save_split

COMMANDS = ("synth", "check-data", "split", "train", "evaluate", "baseline", "compare", "predict")


@pytest.mark.slow  # a subprocess
def test_help_lists_every_command_on_one_line():
    run = subprocess.run([sys.executable, "-m", "bloodcell_lib", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    for command in COMMANDS:
        line = next(li for li in lines if li.strip().startswith(command + " "))
        assert len(line.split(maxsplit=1)[1]) > 20, f"{command} has no one-line description"


def test_parser_knows_every_command():
    choices = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert tuple(choices) == COMMANDS


def test_a_library_error_becomes_exit_code_2(tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "does not exist")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow  # builds VGG16 before it looks at the data
def test_train_refuses_a_split_of_another_dataset_with_exit_code_2(tmp_path, capsys, tiny_set, small_set):
    ours, theirs = tiny_set, small_set  # same file names, more of them, other pixels
    split = save_split(make_split(theirs, progress=False), tmp_path / "their_split.csv")
    code = main(["train", "--arch", "vgg16", "--data-dir", str(ours), "--split", str(split), "--weights", "none",
                 "--image-size", "32", "--epochs", "1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "named in the split but missing from the folder" in err and "changed content" in err
    assert f"python -m bloodcell_lib split {ours.resolve()} --out" in err
    assert not (tmp_path / "out" / "vgg16.keras").exists()
