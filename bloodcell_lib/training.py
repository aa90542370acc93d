"""Two-phase fine-tuning of a registry model, resumable after a kill, saved atomically.

Phase 1 trains the new head at `head_lr` on a frozen base (a frozen BatchNormalization runs in inference
mode in Keras 3, so its moving statistics stay those of the pretrained weights). Phase 2 unfreezes the top
N base layers except BatchNormalization, recompiles at `finetune_lr` and numbers its epochs on from phase 1.
`cfg.epochs` is the budget of both phases together: phase 2 runs until that total, so epochs that phase 1
leaves unused by stopping early go to fine-tuning.

Resume: after every finished epoch the weights, optimizer state, early-stopping memory and the epoch's
history row are committed to OUT/.resume/<arch>/ — snapshot file first, then state.json by atomic rename,
which is the commit point. A run killed at any moment (Colab disconnect, SIGKILL) and started again with
the same settings goes on from its last finished epoch, skips a finished phase, and its history holds
every epoch exactly once. (keras.callbacks.BackupAndRestore is not used: it overwrites its files in place,
so a kill while it writes leaves a state that cannot be loaded, it forgets a phase once that phase's
fit() returns, and it keeps neither the history nor EarlyStopping's best weights.)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import os
import pickle
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from bloodcell_lib.atomic import TEMP_MARK, atomic_path, remove_stale_temporaries, write_bytes, write_json
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ConfigError, ModelError, SplitError, TrainingInterrupted
from bloodcell_lib.lock import run_lock
from bloodcell_lib.model import base_layers, build_model, check_image_size, describe_weights, head_layers
from bloodcell_lib.registry import get_arch
from bloodcell_lib.split import SPLIT_FILE

HISTORY_KEYS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")
RESUME_FOLDER = ".resume"
_STATE_FILE = "state.json"
_STATE_VERSION = 1
# ReduceLROnPlateau: divide the rate by 5 after half of EarlyStopping's patience without improvement.
_LR_FACTOR = 0.2
_MIN_LR = 1e-7


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
    """Make or load the split, build the model, fine-tune it in two phases, save model, history and split.

    One run per output folder and architecture at a time (a lock file); a second is refused, naming the first.
    """
    spec = get_arch(cfg.arch)
    check_image_size(spec, cfg.image_size)  # a size that cannot fit is refused before anything is written
    with run_lock(cfg.output_path, spec.key, verbose):
        # A run killed while saving leaves its temporary files (a model's is 80-300 MB): ours, as we hold the lock.
        for stem in (spec.key, f"{spec.key}_training_history"):
            for path in remove_stale_temporaries(cfg.output_path, stem):
                if verbose:
                    print(f"Removed {path.name}, left by a run killed while saving.")
        return _train_locked(cfg, verbose, callbacks)


def _train_locked(cfg: RunConfig, verbose: int, callbacks: Iterable[keras.callbacks.Callback]) -> TrainResult:
    """train_from_config's work, run while holding the output folder's lock."""
    from bloodcell_lib.pipeline import class_weights, make_dataset
    from bloodcell_lib.split import dataset_fingerprint, split_sha256

    spec = get_arch(cfg.arch)
    size = check_image_size(spec, cfg.image_size)
    out = cfg.output_path
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
                             seed=cfg.seed)
        for subset in ("train", "val")
    }
    train_labels = split.loc[split["subset"] == "train", "label"].map(CLASSES.index).to_numpy()
    class_weight = class_weights(train_labels) if cfg.class_weights else None
    resume = resume_dir(out, spec.key)
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
        "head_lr": cfg.head_lr,
        "finetune_lr": cfg.finetune_lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "class_weights": class_weight,
        "precision": precision,
        "strategy": f"{type(strategy).__name__.lstrip('_')} ({strategy.num_replicas_in_sync} replica(s))",
        "run_eagerly": cfg.run_eagerly,
        # Provenance: evaluate() compares these with the split it is given (see README, Outputs).
        "split_path": str(split_path),
        "split_sha256": split_sha256(split_path),
        "dataset_sha256": split.attrs.get("dataset_sha256") or dataset_fingerprint(split),
        "config": cfg.to_dict(),  # the run configuration, so `evaluate` resamples exactly like the notebook
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    model_path = save_model(model, out / f"{spec.key}.keras")
    history_path = save_history(history, out / f"{spec.key}_training_history.json", meta)
    # Only now is the run safe on disk; a kill before this line resumes instead of starting over.
    shutil.rmtree(resume, ignore_errors=True)
    with contextlib.suppress(OSError):
        resume.parent.rmdir()  # .resume/ itself, when no other architecture is mid-run
    return TrainResult(model_path, history_path, split_path, {**history, "meta": meta}, model, weights_used, size)


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
    """Train the head on the frozen base, then the top layers; return the history of both phases.

    The history has a list per key of HISTORY_KEYS (one entry per epoch, both phases) and a "meta" dict
    (epochs per phase, best epoch, resumed_from_epoch, trainable parameters per phase), like the saved JSON.

    Uses cfg.phase_epochs, head_lr, finetune_lr, unfreeze_layers (None → registry default), patience, seed
    and run_eagerly. EarlyStopping on val_loss restores the best weights at the end of each phase, and phase 2
    starts from phase 1's best, so fine-tuning never ends worse on validation than the head alone. With
    resume_dir, progress is committed after each epoch and picked up by the next call with the same settings.
    """
    spec = get_arch(model.name)
    unfreeze = cfg.unfreeze_layers if cfg.unfreeze_layers is not None else spec.unfreeze_layers
    monitor = "val_loss" if val_data is not None else "loss"
    journal = _Journal(resume_dir, _fingerprint(model, cfg, unfreeze, resume_key), verbose)
    keras.utils.set_random_seed(cfg.seed)
    try:
        end = 0
        for phase, (epochs, lr) in enumerate(zip(cfg.phase_epochs, (cfg.head_lr, cfg.finetune_lr)), start=1):
            if epochs == 0:
                continue
            end += epochs
            prepare_phase(model, phase, unfreeze)
            with model.distribute_strategy.scope():
                model.compile(
                    optimizer=keras.optimizers.Adam(learning_rate=lr), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"], run_eagerly=cfg.run_eagerly,
                )
            if journal.phase_done(phase):
                journal.load_final(model, phase)
                continue
            early = _ResumableEarlyStopping(monitor=monitor, patience=cfg.patience, restore_best_weights=True,
                                            verbose=min(verbose, 1))
            reduce_lr = _ResumableReduceLR(monitor=monitor, factor=_LR_FACTOR, patience=max(1, cfg.patience // 2),
                                           min_lr=_MIN_LR, verbose=min(verbose, 1))
            start = journal.restore_progress(model, phase, early, reduce_lr)
            if start < end and not journal.stopped(phase):
                if verbose:
                    what = "the head on the frozen base" if phase == 1 else (
                        f"the top {unfreeze} base layers (BatchNorm frozen) and the head")
                    print(f"Phase {phase}: training {what} — {trainable_param_count(model, phase, unfreeze):,} "
                          f"parameters, learning rate {lr:g}, epochs {start + 1}–{end} of {cfg.epochs}")
                recorder = _EpochRecorder(journal, phase, early, reduce_lr)
                model.fit(
                    train_data, validation_data=val_data, epochs=end, initial_epoch=start,
                    # shuffle=False: the pipeline shuffles
                    class_weight=dict(class_weight) if class_weight else None, shuffle=False,
                    callbacks=[*callbacks, early, reduce_lr, recorder], verbose=verbose,
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
        "best_epoch": _best_epoch(history),
        "resumed_from_epoch": journal.resumed_from,
        "unfreeze_layers": unfreeze,
        "trainable_params": {f"phase{p}": trainable_param_count(model, p, unfreeze) for p in (1, 2)},
    }
    return history


def prepare_phase(model: keras.Model, phase: int, unfreeze_layers: int) -> None:
    """Set trainable flags: phase 1 → head only; phase 2 → head + top `unfreeze_layers` base layers but BatchNorm."""
    chosen = {id(layer) for layer in trainable_layers(model, phase, unfreeze_layers)}
    for layer in base_layers(model) + head_layers(model):
        layer.trainable = id(layer) in chosen


def trainable_layers(model: keras.Model, phase: int, unfreeze_layers: int) -> list[keras.layers.Layer]:
    """Return the layers trained in a phase (BatchNormalization always stays frozen, in inference mode)."""
    if phase not in (1, 2):
        raise ConfigError(f"phase must be 1 or 2, got {phase}.")
    top = base_layers(model)[-unfreeze_layers:] if phase == 2 and unfreeze_layers > 0 else []
    return [layer for layer in top if not isinstance(layer, keras.layers.BatchNormalization)] + head_layers(model)


def trainable_param_count(model: keras.Model, phase: int, unfreeze_layers: int) -> int:
    """Return how many parameters a phase trains, without changing the model's trainable flags."""
    return int(sum(
        np.prod(w.shape) for layer in trainable_layers(model, phase, unfreeze_layers) for w in layer.weights
        if w.trainable
    ))


def configure_precision() -> str:
    """Switch Keras to mixed_float16 when a GPU is present (float32 otherwise) and return the policy's name."""
    policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def choose_strategy(device_type: str = "GPU") -> tf.distribute.Strategy:
    """Return TPUStrategy on a Colab TPU runtime, MirroredStrategy over >1 devices of `device_type`, else the default.

    device_type="CPU" (after splitting the CPU into logical devices) exists for testing MirroredStrategy.
    """
    address = _tpu_address(os.environ, glob.glob("/dev/accel*"))
    if address is not None:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as exc:
            print(f"A TPU was announced ({address!r}) but could not be initialised ({exc}); not using it.")
    devices = tf.config.list_logical_devices(device_type)
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def resume_dir(output_dir: str | Path, arch: str) -> Path:
    """Return the folder holding an interrupted run's state: OUT/.resume/<arch>."""
    return Path(output_dir) / RESUME_FOLDER / get_arch(arch).key


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Save a `.keras` model atomically: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ConfigError(f"Models are saved in Keras 3's format; the file name must end in .keras, got {path}.")
    with atomic_path(path) as tmp:  # the temporary name keeps the .keras suffix Keras insists on
        model.save(tmp)
    return path


def save_history(history: Mapping[str, Any], path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the history as JSON (lists + "meta") and the seed's pickle (dict of lists) beside it; return the JSON."""
    path = Path(path)
    lists = {k: [_plain(v) for v in values] for k, values in history.items() if k != "meta"}
    write_json(path, {**lists, "meta": {**dict(history.get("meta") or {}), **dict(meta or {})}})
    write_bytes(path.with_suffix(".pkl"), pickle.dumps(lists, protocol=4))
    return path


def load_history(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a training history: JSON (lists + "meta"), or the seed's .pkl only with allow_pickle=True."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"No training history at {path}.")
    if path.suffix == ".pkl":
        if not allow_pickle:
            raise ConfigError(
                f"Refusing to unpickle {path}: unpickling runs code stored in the file. Read the JSON beside it "
                f"({path.with_suffix('.json').name}), or pass allow_pickle=True for a file you trust."
            )
        with open(path, "rb") as fh:
            return pickle.load(fh)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot read the training history {path}: {exc}.") from exc


# ---------------------------------------------------------------------------------------------------------
# Internals


def resolve_split(cfg: RunConfig, verbose: int = 1, report=None):
    """Return (split, path): the given split, the output folder's split for this dataset, or a new one saved there.

    report: a DatasetReport of cfg.data_dir already made (saves a second scan of the folder).
    """
    from bloodcell_lib.dataset import find_data_root
    from bloodcell_lib.split import check_split_matches_dataset, dataset_fingerprint, load_split, make_split, save_split

    if cfg.split_path:
        path = Path(cfg.split_path)
        split = load_split(path, data_root=cfg.data_dir)
        # A split of another dataset, or of this one before it changed, would train on the wrong images.
        check_split_matches_dataset(split)
        return split, path
    if not cfg.data_dir:
        raise ConfigError("Training needs a dataset: give data_dir (--data-dir) or a split file (--split).")
    path = cfg.output_path / SPLIT_FILE
    root = find_data_root(cfg.data_dir).resolve()
    if path.exists():
        split = load_split(path)
        same = {"data_root": str(root), "seed": cfg.seed, "val": cfg.val_fraction, "test": cfg.test_fraction,
                "split_by": cfg.split_by}
        found = {k: split.attrs.get(k) for k in same}
        if found == same:
            check_split_matches_dataset(split, advice=(
                f"Make a new split with `python -m bloodcell_lib split {shlex.quote(str(root))} --out "
                f"{shlex.quote(str(path))} --seed {cfg.seed} --val {cfg.val_fraction} --test {cfg.test_fraction} "
                f"--split-by {cfg.split_by}` (or delete {path} "
                f"to have one made), and retrain the models already in {cfg.output_path}: they used the old split."))
            if verbose:
                print(f"Using the split already in the output folder: {path}")
            return split, path
        raise SplitError(
            f"{path} holds a split made with other settings ({found}) than this run's ({same}); the models in "
            f"{cfg.output_path} must share one split. Pass it with --split, or choose another --output folder."
        )
    split = make_split(report if report is not None else cfg.data_dir, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.seed,
                       split_by=cfg.split_by, progress=bool(verbose))
    save_split(split, path)
    if verbose:
        print(f"Split written to {path}")
    split = load_split(path)
    split.attrs["dataset_sha256"] = dataset_fingerprint(split)
    return split, path


def _tpu_address(environ: Mapping[str, str], accel_devices: list[str]) -> str | None:
    """Return the TPU to connect to on a Colab TPU runtime, or None (no probing of the network or metadata server)."""
    if environ.get("COLAB_TPU_ADDR"):  # the older TPU-node runtime
        return f"grpc://{environ['COLAB_TPU_ADDR']}"
    if environ.get("TPU_NAME"):
        return environ["TPU_NAME"]
    if environ.get("TPU_ACCELERATOR_TYPE") or accel_devices:  # a TPU VM: the chips are local devices
        return "local"
    return None


def _fingerprint(model: keras.Model, cfg: RunConfig, unfreeze: int, resume_key: Mapping[str, Any] | None) -> dict:
    """Return what must match for saved progress to belong to this run."""
    return {
        "arch": model.name, "input_shape": list(model.input_shape[1:]), "params": int(model.count_params()),
        "phase_epochs": list(cfg.phase_epochs), "seed": cfg.seed, "batch_size": cfg.batch_size,
        "head_lr": cfg.head_lr, "finetune_lr": cfg.finetune_lr, "unfreeze_layers": unfreeze,
        "dropout": cfg.dropout, "hidden_units": cfg.hidden_units, "patience": cfg.patience,
        "class_weights": cfg.class_weights, **dict(resume_key or {}),
    }


def _best_epoch(history: Mapping[str, list]) -> int | None:
    values = history.get("val_loss") or history.get("loss") or []
    finite = [(v, e) for v, e in zip(values, history["epoch"]) if v is not None and np.isfinite(v)]
    return min(finite)[1] if finite else None


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


class _Journal:
    """The run's committed progress: history rows, per-phase snapshots and callback memory (files when folder given)."""

    def __init__(self, folder: str | Path | None, fingerprint: dict, verbose: int) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.verbose = verbose
        self.resumed_from: int | None = None
        self.state: dict[str, Any] = {"version": _STATE_VERSION, "fingerprint": fingerprint, "rows": [], "phases": {}}
        self.committed = 0  # epochs whose state.json is on disk
        if self.folder is None or not self.folder.is_dir():
            return
        for path in self.folder.glob(f".*{TEMP_MARK}*"):  # a snapshot or state half-written when a run was killed
            path.unlink(missing_ok=True)
        if not (self.folder / _STATE_FILE).exists():
            return
        try:
            saved = json.loads((self.folder / _STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self._set_aside(f"its {_STATE_FILE} is unreadable ({exc})")
            return
        fingerprint = json.loads(json.dumps(fingerprint))
        if not isinstance(saved, dict) or saved.get("version") != _STATE_VERSION:
            self._set_aside("it was written by another version of this library")
            return
        if saved.get("fingerprint") != fingerprint:
            # Never delete saved progress implicitly: a rerun with e.g. a smaller batch after running out of memory
            # starts afresh, and the old progress stays where the user can take it back.
            old = saved.get("fingerprint") or {}
            differ = ", ".join(f"{k} {old.get(k)!r} → {fingerprint.get(k)!r}"
                               for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k))
            self._set_aside(f"it belongs to a run with other settings ({differ})",
                            "To resume it instead, rerun with the old settings after moving it back. ")
            return
        damaged = self._damaged_snapshot(saved)
        if damaged:
            self._set_aside(f"its snapshot {damaged}")
            return
        self.state = saved
        self.committed = self.resumed_from = self.epochs_done()
        self._say(f"Resuming after epoch {self.resumed_from} from the state saved in {self.folder}.")

    def _damaged_snapshot(self, saved: dict) -> str | None:
        """Return a description of the first referenced snapshot that cannot be read back, or None."""
        names = {v for info in (saved.get("phases") or {}).values() if isinstance(info, dict)
                 for k, v in info.items() if k in ("latest", "best", "final") and v}
        for name in sorted(names):
            try:
                with np.load(self.folder / name, allow_pickle=False) as data:
                    for key in data.files:
                        data[key]  # reads and CRC-checks every array
            except Exception as exc:  # noqa: BLE001 — BadZipFile, EOFError, ValueError, OSError, KeyError...
                return f"{name} is damaged ({type(exc).__name__}: {_first_line(exc)})"
        return None

    def _set_aside(self, why: str, how: str = "") -> None:
        """Move the saved progress out of the way (never delete it) and say where it went."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = self.folder.with_name(f"{self.folder.name}.set-aside-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.folder.with_name(f"{self.folder.name}.set-aside-{stamp}-{n}")
        self.folder.rename(aside)
        print(f"The saved progress in {self.folder} was not used: {why}. It was kept in {aside}; training starts "
              f"from epoch 1. {how}Delete {aside} to discard it.")

    def interrupted_message(self) -> str:
        """What to tell a user who pressed Ctrl-C."""
        if self.folder is None:
            return f"interrupted after epoch {self.committed}; nothing was saved to resume from (no resume folder)."
        return (f"interrupted after epoch {self.committed}; run the same command again to resume (in a notebook, "
                f"run the training cell again). The finished epochs are saved in {self.folder}.")

    def progress_note(self) -> str:
        if self.folder is None or not self.committed:
            return "No epoch had finished."
        return (f"Epochs 1–{self.committed} are saved in {self.folder}; a rerun with the same settings resumes, one "
                "with other settings keeps them aside.")

    # -- reading ------------------------------------------------------------------------------------------
    def epochs_done(self) -> int:
        return len(self.state["rows"])

    def phase_done(self, phase: int) -> bool:
        return bool(self._phase(phase).get("done"))

    def stopped(self, phase: int) -> bool:
        return bool(self._phase(phase).get("stopped"))

    def history(self) -> dict[str, list]:
        return {key: [row.get(key) for row in self.state["rows"]] for key in HISTORY_KEYS}

    # -- restoring ----------------------------------------------------------------------------------------
    def restore_progress(self, model: keras.Model, phase: int, early: "_ResumableEarlyStopping",
                         reduce_lr: "_ResumableReduceLR") -> int:
        """Put back weights, optimizer state and callback memory of a started phase; return the epoch to start at."""
        info = self._phase(phase)
        if info.get("latest"):
            weights, optimizer_values = self._read(info["latest"])
            model.set_weights(weights)
            with model.distribute_strategy.scope():
                model.optimizer.build(model.trainable_variables)
            variables = model.optimizer.variables
            if [tuple(v.shape) for v in variables] != [a.shape for a in optimizer_values]:
                raise ModelError(f"The optimizer state in {self.folder} does not fit this model; delete that folder "
                                 "to start the run afresh.")
            for variable, value in zip(variables, optimizer_values):
                variable.assign(value)
            early.resume_state = dict(info.get("early_stopping") or {})
            early.resume_best_weights = self._read(info["best"])[0] if info.get("best") else None
            reduce_lr.resume_state = dict(info.get("reduce_lr") or {})
        elif phase > 1:
            # Phase 2 starts from phase 1's best: it has to beat that to count as an improvement.
            previous = self._phase(phase - 1)
            best = previous.get("early_stopping", {}).get("best")
            if best is not None:
                early.resume_state = {"best": best, "best_epoch": self.epochs_done() - 1, "wait": 0}
                early.resume_best_weights = model.get_weights()
                info["best"] = previous.get("final")
        return self.epochs_done()

    def load_final(self, model: keras.Model, phase: int) -> None:
        model.set_weights(self._read(self._phase(phase)["final"])[0])

    def load_best(self, model: keras.Model, phase: int) -> None:
        info = self._phase(phase)
        name = info.get("best") or info.get("latest")
        if name:
            model.set_weights(self._read(name)[0])

    # -- committing ---------------------------------------------------------------------------------------
    def commit_epoch(self, model: keras.Model, phase: int, row: dict, early: "_ResumableEarlyStopping",
                     reduce_lr: "_ResumableReduceLR", improved: bool) -> None:
        """Record a finished epoch: snapshot (weights + optimizer) first, then state.json as the commit point."""
        info = self._phase(phase)
        name = f"phase{phase}-epoch{row['epoch']}.npz"
        self._write(name, model.get_weights(), [v.numpy() for v in model.optimizer.variables])
        info["latest"] = name
        if improved:
            info["best"] = name
        info["early_stopping"] = {"best": _plain_float(early.best), "wait": int(early.wait),
                                  "best_epoch": int(early.best_epoch)}
        info["reduce_lr"] = {"best": _plain_float(reduce_lr.best), "wait": int(reduce_lr.wait),
                             "cooldown_counter": int(reduce_lr.cooldown_counter)}
        info["stopped"] = bool(model.stop_training)
        self.state["rows"].append(row)
        self._commit()

    def finish_phase(self, model: keras.Model, phase: int) -> None:
        info = self._phase(phase)
        name = f"phase{phase}-final.npz"
        self._write(name, model.get_weights(), [])
        info.update(done=True, final=name)
        self._commit()

    # -- files --------------------------------------------------------------------------------------------
    def _phase(self, phase: int) -> dict[str, Any]:
        return self.state["phases"].setdefault(str(phase), {})

    def _commit(self) -> None:
        if self.folder is None:  # nothing to resume from: snapshots are only needed on disk
            self.committed = self.epochs_done()
            return
        write_json(self.folder / _STATE_FILE, self.state)
        self.committed = self.epochs_done()
        referenced = {v for info in self.state["phases"].values() for k, v in info.items()
                      if k in ("latest", "best", "final") and v}
        for path in self.folder.glob("*.npz"):
            if path.name not in referenced:
                path.unlink(missing_ok=True)

    def _write(self, name: str, weights: list[np.ndarray], optimizer_values: list[np.ndarray]) -> None:
        if self.folder is None:
            return
        arrays = {f"w{i:05d}": np.asarray(w) for i, w in enumerate(weights)}
        arrays.update({f"o{i:05d}": np.asarray(v) for i, v in enumerate(optimizer_values)})
        with atomic_path(self.folder / name) as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to the temporary name
                np.savez(fh, **arrays)

    def _read(self, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        with np.load(self.folder / name, allow_pickle=False) as data:
            keys = sorted(data.files)
            return ([data[k] for k in keys if k.startswith("w")], [data[k] for k in keys if k.startswith("o")])

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _plain_float(value: Any) -> float | None:
    return None if value is None else float(value)


class _ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose memory (best value, wait, best weights) survives a restart."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resume_state: dict[str, Any] = {}
        self.resume_best_weights: list[np.ndarray] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)  # resets the memory; put back what the previous run had
        for key, value in self.resume_state.items():
            setattr(self, key, value)
        if self.resume_best_weights is not None:
            self.best_weights = self.resume_best_weights


class _ResumableReduceLR(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters survive a restart (the rate itself is in the optimizer state)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resume_state: dict[str, Any] = {}

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        for key, value in self.resume_state.items():
            if value is not None:
                setattr(self, key, value)


class _EpochRecorder(keras.callbacks.Callback):
    """Time each epoch and commit it to the journal after EarlyStopping and ReduceLROnPlateau have seen it."""

    def __init__(self, journal: _Journal, phase: int, early: _ResumableEarlyStopping,
                 reduce_lr: _ResumableReduceLR) -> None:
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
        logs = logs or {}
        row = {
            "epoch": epoch + 1, "phase": self.phase,
            **{key: _plain_float(logs.get(key)) for key in ("loss", "accuracy", "val_loss", "val_accuracy")},
            "lr": self._lr, "epoch_seconds": time.perf_counter() - self._started,
        }
        self.journal.commit_epoch(self.model, self.phase, row, self.early, self.reduce_lr,
                                  improved=self.early.best_epoch == epoch)
