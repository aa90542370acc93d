"""A training run's per-epoch history: its keys, its file beside the model, and reading it back.

The JSON (lists per key + "meta", the model's provenance) is what the library reads; the pickle beside it is
the original notebooks' format (a plain dict of lists). Reading needs no TensorFlow.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bloodcell_lib.atomic import write_bytes, write_json
from bloodcell_lib.errors import ConfigError, ModelError

HISTORY_KEYS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


def history_path(model_path: str | Path) -> Path:
    """Return the training history JSON saved beside a model: <arch>.keras → <arch>_training_history.json."""
    model_path = Path(model_path)
    return model_path.parent / f"{model_path.stem}_training_history.json"


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


def epoch_row(epoch: int, phase: int, logs: Mapping[str, Any], lr: float, seconds: float) -> dict[str, Any]:
    """Return one epoch's history row (a value per HISTORY_KEYS) from Keras' epoch-end logs."""
    return {
        "epoch": epoch, "phase": phase,
        **{key: _float_or_none(logs.get(key)) for key in ("loss", "accuracy", "val_loss", "val_accuracy")},
        "lr": lr, "epoch_seconds": seconds,
    }


def best_epoch(history: Mapping[str, list]) -> int | None:
    """Return the epoch with the lowest finite val_loss (loss when there is no validation), or None."""
    values = history.get("val_loss") or []
    if all(v is None for v in values):  # trained without validation data: one None per epoch
        values = history.get("loss") or []
    finite = [(v, e) for v, e in zip(values, history["epoch"]) if v is not None and np.isfinite(v)]
    return min(finite)[1] if finite else None


# ---------------------------------------------------------------------------------------------------------
# Internals


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
