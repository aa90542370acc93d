"""Two-phase fine-tuning of a registry model (or training from scratch), saved atomically and resumable after a
kill (see resume.py).

From scratch (weights None, cfg.training_recipe "scratch"): one phase in which every layer trains from the first
epoch at `scratch_learning_rate`, BatchNormalization in training mode. Fine-tuning pretrained weights: phase 1
trains the new head at `head_lr` on a frozen base (a frozen BatchNormalization runs in inference mode in Keras 3,
so its moving statistics stay those of the pretrained weights). Phase 2 unfreezes the top N base layers except
BatchNormalization, recompiles at `finetune_lr` and numbers its epochs on from phase 1.
`cfg.epochs` is the budget of both phases together: phase 2 runs until that total, so epochs that phase 1
leaves unused by stopping early go to fine-tuning.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from bloodcell_lib.atomic import remove_stale_temporaries
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import FINE_TUNE, SCRATCH, RunConfig, check_image_size
from bloodcell_lib.devices import choose_strategy, configure_precision, describe_strategy
from bloodcell_lib.errors import ConfigError, DatasetError, TrainingInterrupted
from bloodcell_lib.history import best_epoch, epoch_row, history_path, save_history
from bloodcell_lib.lock import run_lock
from bloodcell_lib.model import base_layers, build_model, describe_weights, head_layers, save_model
from bloodcell_lib.pipeline import make_dataset
from bloodcell_lib.progress import EpochProgress, fit_verbose
from bloodcell_lib.registry import get_arch
from bloodcell_lib.resume import (Journal, ResumableEarlyStopping, ResumableReduceLR, discard_progress, resume_dir,
                                  run_fingerprint)
from bloodcell_lib.split import resolve_split, split_sha256

# ReduceLROnPlateau's factor, patience and floor are RunConfig fields (lr_factor, lr_patience, min_lr).


@dataclass
class TrainResult:
    """What one training run produced; `history` holds lists per key (both phases) and a "meta" dict."""

    model_path: Path
    history_path: Path
    split_path: Path
    history: dict[str, Any]
    model: keras.Model
    weights_used: str
    image_size: int


def train_from_config(
    cfg: RunConfig, verbose: int = 1, callbacks: Iterable[keras.callbacks.Callback] = ()
) -> TrainResult:
    """Make or load the split, build the model, train it with the run's recipe (two-phase fine-tuning, or end to end
    from scratch), save model, history and split.

    One run per output folder and architecture at a time (a lock file); a second is refused, naming the first.
    """
    spec = get_arch(cfg.arch)
    check_image_size(spec, cfg.image_size)  # a size that cannot fit is refused before anything is written
    model_path = cfg.output_path / f"{spec.key}.keras"
    with run_lock(cfg.output_path, spec.key, verbose):
        # A run killed while saving leaves its temporary files (a model's is 80-300 MB): ours, as we hold the lock.
        for stem in (model_path.stem, history_path(model_path).stem):
            for path in remove_stale_temporaries(cfg.output_path, stem):
                if verbose:
                    print(f"Removed {path.name}, left by a run killed while saving.")
        return _train_locked(cfg, model_path, verbose, callbacks)


def _train_locked(cfg: RunConfig, model_path: Path, verbose: int,
                  callbacks: Iterable[keras.callbacks.Callback]) -> TrainResult:
    """train_from_config's work, run while holding the output folder's lock."""
    spec = get_arch(cfg.arch)
    size = check_image_size(spec, cfg.image_size)
    precision = configure_precision()
    strategy = choose_strategy()
    keras.utils.set_random_seed(cfg.seed)
    # The model first: missing weights should fail in seconds, not after minutes of checking the dataset.
    with strategy.scope():
        model = build_model(spec.key, image_size=size, weights=cfg.weights, dropout=cfg.dropout,
                            hidden_units=cfg.hidden_units)
    weights_used = describe_weights(cfg.weights)
    split, split_path = resolve_split(cfg, verbose)
    datasets = {
        subset: make_dataset(split, subset, size, spec.preprocess, batch_size=cfg.batch_size, cache=cfg.cache,
                             seed=cfg.seed, brightness=cfg.augment_brightness, contrast_range=cfg.contrast_range)
        for subset in ("train", "val")
    }
    train_labels = split.loc[split["subset"] == "train", "label"].map(CLASSES.index).to_numpy()
    class_weight = class_weights(train_labels) if cfg.class_weights else None
    resume = resume_dir(cfg.output_path, spec.key)
    started = time.time()
    history = fine_tune(
        model, datasets["train"], datasets["val"], cfg, class_weight=class_weight, resume_dir=resume,
        resume_key={"weights": weights_used, "split_sha256": split_sha256(split_path)},
        verbose=verbose, callbacks=callbacks,
    )
    meta = {
        "arch": spec.key,
        "display_name": spec.display_name,
        "weights_used": weights_used,
        "image_size": size,
        **history.pop("meta"),
        "epochs_planned": {"phase1": cfg.phase_epochs[0], "phase2": cfg.phase_epochs[1], "total": cfg.epochs},
        "total_seconds": float(sum(history["epoch_seconds"])),  # training time, summed over resumed runs
        "wall_seconds_this_run": time.time() - started,
        "recipe": cfg.recipe_label,
        "head_lr": cfg.head_lr,
        "finetune_lr": cfg.finetune_lr,
        "scratch_learning_rate": cfg.scratch_learning_rate,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "class_weights": class_weight,
        "precision": precision,
        "strategy": describe_strategy(strategy),
        "run_eagerly": cfg.run_eagerly,
        # Provenance: evaluate() compares these with the split it is given (see README, Outputs).
        "split_path": str(split_path),
        "split_sha256": split_sha256(split_path),
        "dataset_sha256": split.attrs["dataset_sha256"],  # resolve_split checked the images and recorded it
        "config": cfg.to_dict(),  # the run configuration, so `evaluate` resamples exactly like the notebook
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    save_model(model, model_path)
    saved_history = save_history(history, history_path(model_path), meta)
    # Only now is the run safe on disk; a kill before this line resumes instead of starting over.
    discard_progress(resume)
    return TrainResult(model_path, saved_history, split_path, {**history, "meta": meta}, model, weights_used, size)


def fine_tune(
    model: keras.Model,
    train_data: Any,
    val_data: Any,
    cfg: RunConfig,
    *,
    class_weight: Mapping[int, float] | None = None,
    resume_dir: str | Path | None = None,
    resume_key: Mapping[str, Any] | None = None,
    verbose: int = 1,
    callbacks: Iterable[keras.callbacks.Callback] = (),
) -> dict[str, list]:
    """Train the head on the frozen base, then the top layers (from scratch: every layer in one phase); return the
    history of both phases.

    The history has a list per key of history.HISTORY_KEYS (one entry per epoch, both phases) and a "meta"
    dict (epochs per phase, best epoch, resumed_from_epoch, trainable parameters per phase), like the saved JSON.

    Uses cfg.training_recipe, phase_epochs, phase_learning_rates, unfreeze_layers (None → registry default),
    patience, lr_factor, reduce_lr_patience, min_lr, seed and run_eagerly. EarlyStopping on val_loss restores the
    best weights at the end of each phase, and phase 2 starts from phase 1's best, so fine-tuning never ends worse on validation than the head alone. With
    resume_dir, progress is committed after each epoch and picked up by the next call with the same settings.
    """
    spec = get_arch(model.name)
    unfreeze = cfg.unfreeze_layers if cfg.unfreeze_layers is not None else spec.unfreeze_layers
    monitor = "val_loss" if val_data is not None else "loss"
    recipe = cfg.training_recipe
    if recipe == SCRATCH and cfg.scratch_bn_momentum is not None:
        set_batchnorm_momentum(model, cfg.scratch_bn_momentum)
    journal = Journal(resume_dir, run_fingerprint(model, cfg, unfreeze, resume_key), verbose)
    keras.utils.set_random_seed(cfg.seed)
    try:
        end = 0
        for phase, (epochs, lr) in enumerate(zip(cfg.phase_epochs, cfg.phase_learning_rates), start=1):
            if epochs == 0:
                continue
            end += epochs
            prepare_phase(model, phase, unfreeze, recipe)
            with model.distribute_strategy.scope():
                model.compile(
                    optimizer=keras.optimizers.Adam(learning_rate=lr), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"], run_eagerly=cfg.run_eagerly,
                )
                build_training_state(model)
            if journal.phase_done(phase):
                journal.load_final(model, phase)
                continue
            early = ResumableEarlyStopping(monitor=monitor, patience=cfg.patience, restore_best_weights=True,
                                           verbose=min(verbose, 1))
            reduce_lr = ResumableReduceLR(monitor=monitor, factor=cfg.lr_factor, patience=cfg.reduce_lr_patience,
                                          min_lr=cfg.min_lr, verbose=min(verbose, 1))
            start = journal.restore_progress(model, phase, early, reduce_lr)
            if start < end and not journal.stopped(phase):
                if verbose:
                    what = ("every layer from random initialisation (BatchNorm in training mode)" if recipe == SCRATCH
                            else "the head on the frozen base" if phase == 1
                            else f"the top {unfreeze} base layers (BatchNorm frozen) and the head")
                    count = trainable_param_count(model, phase, unfreeze, recipe)
                    print(f"Phase {phase}: training {what} — {count:,} parameters, learning rate {lr:g}, "
                          f"epochs {start + 1}–{end} of {cfg.epochs}")
                recorder = _EpochRecorder(journal, phase, early, reduce_lr)
                model.fit(
                    train_data, validation_data=val_data, epochs=end, initial_epoch=start,
                    # shuffle=False: the pipeline shuffles
                    class_weight=dict(class_weight) if class_weight else None, shuffle=False,
                    # verbose 2 (a line per epoch) when headless, the live bar when watched
                    callbacks=[*callbacks, early, reduce_lr, recorder, EpochProgress(phase, cfg.epochs)],
                    verbose=fit_verbose(verbose),
                )
            else:  # killed after the phase's last epoch was committed: finish it as EarlyStopping would have
                journal.load_best(model, phase)
            journal.finish_phase(model, phase)
    except KeyboardInterrupt:
        raise TrainingInterrupted(journal.interrupted_message(), journal.committed) from None
    except tf.errors.ResourceExhaustedError as exc:
        raise ConfigError(
            f"Out of memory while training {spec.display_name} at {model.input_shape[1]} px, batch size "
            f"{cfg.batch_size} ({_first_line(exc)}). {journal.progress_note()} Lower the batch size "
            "(--batch-size / BATCH_SIZE) or the image size and run again."
        ) from None
    history = journal.history()
    history["meta"] = {
        "epochs": {"phase1": history["phase"].count(1), "phase2": history["phase"].count(2),
                   "total": len(history["phase"])},
        "best_epoch": best_epoch(history),
        "resumed_from_epoch": journal.resumed_from,
        "recipe": cfg.recipe_label,
        "unfreeze_layers": unfreeze,
        "trainable_params": {f"phase{p}": trainable_param_count(model, p, unfreeze, recipe)
                             for p in ((1,) if recipe == SCRATCH else (1, 2))},
    }
    return history


def build_training_state(model: keras.Model) -> None:
    """Create the optimizer's slots and the compiled loss's and metrics' variables of a compiled model now.

    Keras (TensorFlow backend, no distribution strategy) creates them inside the first trace of the training step,
    and a variable created during a trace makes TensorFlow trace the whole step a second time: DenseNet201's first
    epoch took 76 s with both traces, 51 s with one (48 px, 2 CPU cores). The loss and metrics are built on two
    made-up rows and reset, so no number of the run changes.
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    outputs = int(model.output_shape[-1])
    y_true, y_pred = np.zeros((2,), "int64"), np.full((2, outputs), 1.0 / outputs, "float32")
    model.compute_loss(x=None, y=y_true, y_pred=y_pred)
    model.compute_metrics(None, y_true, y_pred, sample_weight=None)
    model.reset_metrics()


def prepare_phase(model: keras.Model, phase: int, unfreeze_layers: int, recipe: str = FINE_TUNE) -> None:
    """Set trainable flags: phase 1 → head only; phase 2 → head + top `unfreeze_layers` base layers but BatchNorm;
    from scratch → every layer."""
    chosen = {id(layer) for layer in trainable_layers(model, phase, unfreeze_layers, recipe)}
    for layer in base_layers(model) + head_layers(model):
        layer.trainable = id(layer) in chosen


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Set the momentum of every BatchNormalization layer (read at each training step); return how many there are."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


def trainable_layers(model: keras.Model, phase: int, unfreeze_layers: int,
                     recipe: str = FINE_TUNE) -> list[keras.layers.Layer]:
    """Return the layers trained in a phase. Fine-tuning keeps BatchNormalization frozen, in inference mode, so its
    pretrained statistics stay; from scratch every layer trains, BatchNormalization in training mode."""
    if phase not in (1, 2):
        raise ConfigError(f"phase must be 1 or 2, got {phase}.")
    if recipe == SCRATCH:
        return base_layers(model) + head_layers(model)
    top = base_layers(model)[-unfreeze_layers:] if phase == 2 and unfreeze_layers > 0 else []
    return [layer for layer in top if not isinstance(layer, keras.layers.BatchNormalization)] + head_layers(model)


def trainable_param_count(model: keras.Model, phase: int, unfreeze_layers: int, recipe: str = FINE_TUNE) -> int:
    """Return how many parameters a phase trains, without changing the model's trainable flags."""
    return int(sum(
        np.prod(w.shape) for layer in trainable_layers(model, phase, unfreeze_layers, recipe) for w in layer.weights
        if w.trainable
    ))


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int = len(CLASSES)) -> dict[int, float]:
    """Return balanced class weights n / (k · n_c) like sklearn's compute_class_weight (k = classes present).

    A class absent from `labels` gets weight 0.0: it never occurs, so its weight is never used, and
    listing it keeps the dict complete for Keras.
    """
    y = np.asarray(labels).ravel()
    if y.size == 0:
        raise DatasetError("class_weights got no labels; the training subset is empty.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise DatasetError(f"class_weights needs integer labels in 0..{num_classes - 1}, "
                           f"got values {np.unique(y)[:10]}.")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = y.size / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


# ---------------------------------------------------------------------------------------------------------
# Internals


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _EpochRecorder(keras.callbacks.Callback):
    """Time each epoch and commit its history row to the journal after EarlyStopping and ReduceLROnPlateau saw it."""

    def __init__(self, journal: Journal, phase: int, early: ResumableEarlyStopping,
                 reduce_lr: ResumableReduceLR) -> None:
        super().__init__()
        self.journal, self.phase, self.early, self.reduce_lr = journal, phase, early, reduce_lr
        self._started = 0.0
        self._lr = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()
        # float32 → shortest decimal that round-trips, so the JSON says 5e-05, not 4.999999873689376e-05
        self._lr = float(np.format_float_positional(
            np.float32(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)), unique=True))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = epoch_row(epoch + 1, self.phase, logs or {}, self._lr, time.perf_counter() - self._started)
        self.journal.commit_epoch(self.model, self.phase, row, self.early, self.reduce_lr,
                                  improved=self.early.best_epoch == epoch)
