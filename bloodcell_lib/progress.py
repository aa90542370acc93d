"""Progress of a headless run: small JSON-lines events from the library, and the lines run_all.py prints from them.

A kernel started by run_all.py runs a notebook that nobody watches; its outputs arrive only when it ends. So the
library appends one event per step (data check, training, each epoch, evaluation, ...) to the file named by
$BLOODCELL_PROGRESS, and run_all.py tails that file and prints a line per event with the elapsed time and an
estimate of what remains. Without the variable (a notebook in Colab, the CLI) nothing is written.

Headless runs also want Keras' one-line-per-epoch output instead of its live bar, which writes one output per step
into an executed notebook: fit_verbose() decides that, in one place.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import keras

PROGRESS_ENV = "BLOODCELL_PROGRESS"  # the JSON-lines file events are appended to (run_all.py sets it)
RUN_ENV = "BLOODCELL_RUN"  # the run's label (run_all.py sets it per notebook run): events say whose they are
HEADLESS_ENV = "BLOODCELL_HEADLESS"  # "1": nobody watches this process's output live (run_all.py, nbval)
# Epochs the run must have seen before it estimates the time left: the first ones carry the set-up and each
# network's graph tracing, and an estimate from one of them said 19 minutes for a demo that took 9.
MIN_EPOCHS_FOR_ESTIMATE = 3
# The validation numbers an epoch line shows, in this order, when Keras logged them.
EPOCH_METRICS = ("val_accuracy", "val_macro_f1", "val_loss")


def emit(event: str, **fields: Any) -> None:
    """Append one event to $BLOODCELL_PROGRESS (nothing without it). One write of one line in append mode, so
    lines from one writer never interleave; progress is a courtesy, so a failing write never fails the run."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    run = os.environ.get(RUN_ENV)
    record = {"time": round(time.time(), 3), "event": event, **({"run": run} if run else {}), **fields}
    line = json.dumps(record, default=str) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def step(name: str, **fields: Any) -> None:
    """Announce a step of a notebook (data check, evaluation, ...)."""
    emit("step", step=name, **fields)


def headless() -> bool:
    """True when nobody watches this process's output live: $BLOODCELL_HEADLESS set (run_all's kernels, nbval),
    or a command whose output goes to a pipe or file. An interactive notebook (Jupyter, Colab) is not headless,
    though its stdout is no terminal either."""
    flag = os.environ.get(HEADLESS_ENV)
    if flag is not None:
        return flag not in ("", "0")
    if _in_notebook_kernel():
        return False
    isatty = getattr(sys.stdout, "isatty", None)
    return not (isatty is not None and isatty())


def fit_verbose(verbose: int = 1) -> int:
    """Keras fit's `verbose`: 0 stays silent; headless → 2 (one line per epoch, fit for a file or an executed
    notebook); interactive → 1 (the live progress bar)."""
    if not verbose:
        return 0
    return 2 if headless() else 1


class EpochProgress(keras.callbacks.Callback):
    """Emit an "epoch" event after each epoch: its number of the run's total, the phase, validation numbers, time."""

    def __init__(self, phase: int, total_epochs: int) -> None:
        super().__init__()
        self.phase, self.total_epochs = phase, total_epochs
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        numbers = {k: float(logs[k]) for k in EPOCH_METRICS if k in logs}
        emit("epoch", arch=self.model.name, phase=self.phase, epoch=epoch + 1, epochs=self.total_epochs,
             seconds=round(time.perf_counter() - self._started, 2), **numbers)


# --- run_all.py's side: bookkeeping and the printed lines -----------------------------------------------------


@dataclass
class RunClock:
    """Epochs planned, done and left across the notebooks of one run, and the estimate of the time left.

    The estimate is the run's elapsed time per epoch done so far times the epochs left: it spreads the
    non-training work (data check, evaluation, the Comparison) over the epochs, so it is rough; say "about".
    """

    planned: dict[str, int]  # run label → epoch budget (early stopping may use fewer)
    started: float = field(default_factory=time.time)
    done: dict[str, int] = field(default_factory=dict)  # run label → the last epoch reported
    finished: set[str] = field(default_factory=set)
    epochs_seen: int = 0  # epochs that ran in this run (a resumed run starts past its first epochs)

    def update(self, label: str, event: Mapping[str, Any]) -> None:
        """Take one event of the run `label`."""
        kind = event.get("event")
        if kind == "training" and event.get("epochs"):
            self.planned[label] = int(event["epochs"])
        elif kind == "epoch":
            self.epochs_seen += 1
            self.done[label] = int(event["epoch"])
            self.planned[label] = int(event.get("epochs") or self.planned.get(label, 0))
        elif kind == "trained":
            self.finish(label)

    def finish(self, label: str) -> None:
        """The run `label` trains no more (done, stopped early, or failed)."""
        self.finished.add(label)

    def epochs_left(self) -> int:
        return sum(max(0, n - self.done.get(label, 0)) for label, n in self.planned.items()
                   if label not in self.finished)

    def elapsed(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.started

    def seconds_left(self, now: float | None = None) -> float | None:
        """About how long the run still needs, or None before MIN_EPOCHS_FOR_ESTIMATE epochs gave a rate and once no
        epoch is left (what remains then, evaluation and the Comparison, has no rate to go by)."""
        left = self.epochs_left()
        if self.epochs_seen < MIN_EPOCHS_FOR_ESTIMATE or not left:
            return None
        return self.elapsed(now) / self.epochs_seen * left


def clock_time(seconds: float) -> str:
    """1:05, 12:00, 1:02:03."""
    s = int(round(max(0.0, seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def timing(clock: RunClock, now: float | None = None) -> str:
    """"elapsed 1:05, about 4:10 left" (the estimate once there is one)."""
    text = f"elapsed {clock_time(clock.elapsed(now))}"
    left = clock.seconds_left(now)
    return text if left is None else f"{text}, about {clock_time(left)} left"


def describe_event(event: Mapping[str, Any]) -> str | None:
    """What one event says, without the run's name and timing; None for an event that is not shown."""
    kind = event.get("event")
    if kind == "step":
        return str(event.get("step"))
    if kind == "training":
        recipe = event.get("recipe")  # e.g. "fine-tune (2 phases)", "from scratch (1 phase)"
        return f"training: up to {event.get('epochs')} epochs{', ' + recipe if recipe else ''}"
    if kind == "epoch":
        numbers = ", ".join(f"{k} {event[k]:.3f}" for k in EPOCH_METRICS if isinstance(event.get(k), (int, float)))
        return (f"training phase {event.get('phase')}, epoch {event.get('epoch')}/{event.get('epochs')}"
                f"{': ' + numbers if numbers else ''} ({event.get('seconds', 0):.0f} s/epoch)")
    if kind == "trained":
        best = f", best epoch {event['best_epoch']}" if event.get("best_epoch") else ""
        return f"training done after {event.get('epochs_run')} epochs{best}"
    return None


def progress_line(label: str, event: Mapping[str, Any], clock: RunClock, now: float | None = None) -> str | None:
    """The console line for one event, e.g. "  [VGG16] training phase 1, epoch 3/8: val_accuracy 0.710,
    val_loss 0.812 (12 s/epoch) — elapsed 1:05, about 4:10 left"; None for events not shown."""
    text = describe_event(event)
    return None if text is None else f"  [{label}] {text} — {timing(clock, now)}"


def _in_notebook_kernel() -> bool:
    """True inside a Jupyter or Colab kernel (an IPython shell with a kernel behind it)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")
