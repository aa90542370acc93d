"""progress.py: the events the library writes, the lines and estimate run_all.py prints, Keras' verbose."""

from __future__ import annotations

import io
import json
import sys

import keras
import pytest

from bloodcell_lib import progress
from bloodcell_lib.config import resolve
from bloodcell_lib.progress import (HEADLESS_ENV, PROGRESS_ENV, EpochProgress, RunClock, clock_time, emit,
                                    fit_verbose, progress_line)


@pytest.fixture(autouse=True)
def _no_progress_environment(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv(HEADLESS_ENV, raising=False)


def test_events_are_appended_as_json_lines_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    emit("step", step="data check")
    assert not path.exists()
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    emit("step", step="data check")
    emit("epoch", arch="vgg16", epoch=1, epochs=4)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["step", "epoch"] and events[1]["epochs"] == 4
    assert all(isinstance(e["time"], float) for e in events)


def test_an_unwritable_progress_file_never_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "no such folder" / "progress.jsonl"))
    emit("step", step="evaluation")  # no exception


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (65, "1:05"), (720, "12:00"), (3723, "1:02:03")])
def test_clock_time(seconds, text):
    assert clock_time(seconds) == text


def test_the_estimate_is_elapsed_per_epoch_times_the_epochs_left_across_models():
    clock = RunClock({"VGG16": 4, "ResNet50": 4}, started=1000.0)
    assert clock.seconds_left(1010.0) is None  # no epoch yet, no rate
    line = progress_line("VGG16", {"event": "step", "step": "data check"}, clock, now=1010.0)
    assert line == "  [VGG16] data check — elapsed 0:10"
    event = {"event": "epoch", "phase": 1, "epoch": 1, "epochs": 4, "seconds": 12.4, "val_accuracy": 0.712,
             "val_loss": 0.81}
    clock.update("VGG16", event)
    assert clock.epochs_left() == 7
    line = progress_line("VGG16", event, clock, now=1020.0)
    # One epoch carries the set-up and the graph tracing: no estimate from it alone.
    assert line == ("  [VGG16] training phase 1, epoch 1/4: val_accuracy 0.712, val_loss 0.810 (12 s/epoch) "
                    "— elapsed 0:20")
    for k in (2, 3):
        clock.update("VGG16", {**event, "epoch": k})
    assert clock.epochs_left() == 5
    assert progress_line("VGG16", {**event, "epoch": 3}, clock, now=1030.0).endswith(
        "— elapsed 0:30, about 0:50 left")  # 30 s / 3 epochs × 5 left


def test_a_model_stopped_early_or_finished_drops_its_remaining_epochs():
    clock = RunClock({"VGG16": 8, "ResNet50": 8}, started=0.0)
    for k in (1, 2, 3):
        clock.update("VGG16", {"event": "epoch", "epoch": k, "epochs": 8})
    clock.update("VGG16", {"event": "trained", "epochs_run": 3, "best_epoch": 2})
    assert clock.epochs_left() == 8
    assert clock.seconds_left(now=30.0) == pytest.approx(30.0 / 3 * 8)
    clock.finish("ResNet50")
    assert clock.epochs_left() == 0 and clock.seconds_left(now=40.0) is None  # no "about 0:00 left"
    assert "training done after 3 epochs, best epoch 2" in progress_line(
        "VGG16", {"event": "trained", "epochs_run": 3, "best_epoch": 2}, clock, now=30.0)


def test_a_resumed_model_counts_only_what_is_left():
    clock = RunClock({"VGG16": 10}, started=0.0)
    for k in (6, 7, 8):  # epochs 1-5 ran before the resume
        clock.update("VGG16", {"event": "epoch", "epoch": k, "epochs": 10})
    assert clock.epochs_left() == 2 and clock.seconds_left(now=30.0) == pytest.approx(20.0)


def test_unknown_events_are_not_shown():
    assert progress_line("x", {"event": "something new"}, RunClock({})) is None


class _Stdout(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("env, tty, expected", [
    (None, False, 2),  # a pipe or a file: one line per epoch
    (None, True, 1),  # a terminal: the live bar
    ("1", True, 2),  # run_all's kernels and nbval
    ("0", False, 1),
])
def test_fit_verbose_is_two_when_nobody_watches(monkeypatch, env, tty, expected):
    if env is not None:
        monkeypatch.setenv(HEADLESS_ENV, env)
    monkeypatch.setattr(sys, "stdout", _Stdout(tty))
    monkeypatch.setattr(progress, "_in_notebook_kernel", lambda: False)
    assert fit_verbose(1) == expected
    assert fit_verbose(0) == 0


def test_an_interactive_notebook_keeps_the_live_bar(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Stdout(False))  # a kernel's stdout is no terminal
    monkeypatch.setattr(progress, "_in_notebook_kernel", lambda: True)
    assert fit_verbose(1) == 1


class _FitCalled(Exception):
    pass


def test_fine_tune_calls_fit_with_verbose_two_and_the_progress_callback_when_headless(monkeypatch):
    from bloodcell_lib.model import build_model
    from bloodcell_lib.training import fine_tune

    monkeypatch.setenv(HEADLESS_ENV, "1")
    seen = {}

    def fake_fit(self, *args, **kwargs):
        seen.update(kwargs)
        raise _FitCalled

    monkeypatch.setattr(keras.Model, "fit", fake_fit)
    model = build_model("vgg16", image_size=32, weights=None)
    cfg = resolve("smoke", epochs=2, weights="none")
    with pytest.raises(_FitCalled):
        fine_tune(model, None, None, cfg, verbose=1)
    assert seen["verbose"] == 2
    assert any(isinstance(c, EpochProgress) and c.total_epochs == 2 for c in seen["callbacks"])


def test_the_epoch_callback_writes_an_event_with_the_validation_numbers(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    callback = EpochProgress(phase=2, total_epochs=6)
    callback.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)], name="vgg16"))
    callback.on_epoch_begin(3)
    callback.on_epoch_end(3, {"loss": 0.5, "val_loss": 0.7, "val_accuracy": 0.75})
    (event,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert event["event"] == "epoch" and event["arch"] == "vgg16"
    assert (event["phase"], event["epoch"], event["epochs"]) == (2, 4, 6)
    assert event["val_accuracy"] == 0.75 and event["val_loss"] == 0.7 and "loss" not in event


def test_an_event_names_its_run_when_run_all_says_which(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(path))
    monkeypatch.setenv(progress.RUN_ENV, "ResNet50-seed2-fold1of5")
    progress.step("data check")
    monkeypatch.delenv(progress.RUN_ENV)
    progress.step("split")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["run"] == "ResNet50-seed2-fold1of5" and "run" not in events[1]
