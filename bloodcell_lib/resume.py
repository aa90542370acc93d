"""The resume journal: a training run's committed progress in OUT/.resume/<arch>/, and callbacks that survive a restart.

After every finished epoch the weights, optimizer state, early-stopping memory and the epoch's history row are
committed — snapshot file first, then state.json by atomic rename, which is the commit point. A run killed at
any moment (Colab disconnect, SIGKILL) and started again with the same settings goes on from its last finished
epoch, skips a finished phase, and its history holds every epoch exactly once. (keras.callbacks.BackupAndRestore
is not used: it overwrites its files in place, so a kill while it writes leaves a state that cannot be loaded, it
forgets a phase once that phase's fit() returns, and it keeps neither the history nor EarlyStopping's best
weights.) Saved progress is never deleted implicitly: progress of other settings, or with a damaged snapshot, is
moved aside and the user is told where.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import keras
import numpy as np

from bloodcell_lib.atomic import TEMP_MARK, atomic_path, write_json
from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ModelError
from bloodcell_lib.history import HISTORY_KEYS
from bloodcell_lib.registry import get_arch

RESUME_FOLDER = ".resume"
_STATE_FILE = "state.json"
_STATE_VERSION = 1
# The snapshot names a phase's state refers to (the others in the folder are leftovers to delete).
_SNAPSHOT_KEYS = ("latest", "best", "final")


def resume_dir(output_dir: str | Path, arch: str) -> Path:
    """Return the folder holding an interrupted run's state: OUT/.resume/<arch>."""
    return Path(output_dir) / RESUME_FOLDER / get_arch(arch).key


def discard_progress(folder: str | Path) -> None:
    """Delete a run's saved progress once its model is safely saved, and .resume/ itself when no other run uses it."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def run_fingerprint(model: keras.Model, cfg: RunConfig, unfreeze: int, resume_key: Mapping[str, Any] | None) -> dict:
    """Return what must match for saved progress to belong to this run."""
    return {
        "arch": model.name, "input_shape": list(model.input_shape[1:]), "params": int(model.count_params()),
        "phase_epochs": list(cfg.phase_epochs), "seed": cfg.seed, "batch_size": cfg.batch_size,
        "head_lr": cfg.head_lr, "finetune_lr": cfg.finetune_lr, "unfreeze_layers": unfreeze,
        "dropout": cfg.dropout, "hidden_units": cfg.hidden_units, "patience": cfg.patience,
        "class_weights": cfg.class_weights, "recipe": cfg.training_recipe,
        "scratch_learning_rate": cfg.scratch_learning_rate, "scratch_bn_momentum": cfg.scratch_bn_momentum,
        "lr_factor": cfg.lr_factor,
        "lr_patience": cfg.reduce_lr_patience, "min_lr": cfg.min_lr, "augment_brightness": cfg.augment_brightness,
        "augment_contrast": cfg.augment_contrast, **dict(resume_key or {}),
    }


class Journal:
    """The run's committed progress: history rows, per-phase snapshots and callback memory (files when folder given)."""

    def __init__(self, folder: str | Path | None, fingerprint: dict, verbose: int) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.verbose = verbose
        self.resumed_from: int | None = None
        self.state: dict[str, Any] = {"version": _STATE_VERSION, "fingerprint": fingerprint, "rows": [], "phases": {}}
        self.committed = 0  # epochs whose state.json is on disk
        if self.folder is not None and self.folder.is_dir():
            self._pick_up(fingerprint)

    def _pick_up(self, fingerprint: dict) -> None:
        """Take over the progress saved in the folder when it belongs to this run; otherwise set it aside."""
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

    def interrupted_message(self) -> str:
        """What to tell a user who pressed Ctrl-C."""
        if self.folder is None:
            return f"interrupted after epoch {self.committed}; nothing was saved to resume from (no resume folder)."
        return (f"interrupted after epoch {self.committed}; run the same command again to resume (in a notebook, "
                f"run the training cell again). The finished epochs are saved in {self.folder}.")

    def progress_note(self) -> str:
        """What is saved so far, for an error message that ends the run."""
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
        """Return the committed rows as a list per key of HISTORY_KEYS."""
        return {key: [row.get(key) for row in self.state["rows"]] for key in HISTORY_KEYS}

    # -- restoring ----------------------------------------------------------------------------------------
    def restore_progress(self, model: keras.Model, phase: int, early: ResumableEarlyStopping,
                         reduce_lr: ResumableReduceLR) -> int:
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
    def commit_epoch(self, model: keras.Model, phase: int, row: dict, early: ResumableEarlyStopping,
                     reduce_lr: ResumableReduceLR, improved: bool) -> None:
        """Record a finished epoch: snapshot (weights + optimizer) first, then state.json as the commit point."""
        info = self._phase(phase)
        name = f"phase{phase}-epoch{row['epoch']}.npz"
        self._write(name, model.get_weights(), [v.numpy() for v in model.optimizer.variables])
        info["latest"] = name
        if improved:
            info["best"] = name
        info["early_stopping"] = {"best": _float_or_none(early.best), "wait": int(early.wait),
                                  "best_epoch": int(early.best_epoch)}
        info["reduce_lr"] = {"best": _float_or_none(reduce_lr.best), "wait": int(reduce_lr.wait),
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
    def _damaged_snapshot(self, saved: dict) -> str | None:
        """Return a description of the first referenced snapshot that cannot be read back, or None."""
        for name in sorted(_referenced(saved)):
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

    def _phase(self, phase: int) -> dict[str, Any]:
        return self.state["phases"].setdefault(str(phase), {})

    def _commit(self) -> None:
        if self.folder is None:  # nothing to resume from: snapshots are only needed on disk
            self.committed = self.epochs_done()
            return
        write_json(self.folder / _STATE_FILE, self.state)
        self.committed = self.epochs_done()
        referenced = _referenced(self.state)
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


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
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


class ResumableReduceLR(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters survive a restart (the rate itself is in the optimizer state)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resume_state: dict[str, Any] = {}

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        for key, value in self.resume_state.items():
            if value is not None:
                setattr(self, key, value)


# ---------------------------------------------------------------------------------------------------------
# Internals


def _referenced(state: dict) -> set[str]:
    """Return the snapshot file names a saved state refers to."""
    return {v for info in (state.get("phases") or {}).values() if isinstance(info, dict)
            for k, v in info.items() if k in _SNAPSHOT_KEYS and v}


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
