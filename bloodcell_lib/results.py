"""A run's files and their schema: the predictions CSV, the results JSON and the Grad-CAM examples.

Every run (a network's, the shortcut baseline's) writes `<run>_predictions.csv`, one row per test image with
columns PREDICTION_COLUMNS (path, true_label, pred_label, prob_<class> per class, group), and computes every
number of `<run>_results.json` from that file (record_predictions), so anyone can recompute them from it. The
metrics with intervals in a results file are metrics.SCALAR_KEYS, named where they are computed. A network's run
also saves the test images Grad-CAM explained, with their heatmaps, in `<run>_gradcam.npz` (GradcamExamples),
so figures across models need no model loaded and nothing recomputed, and their scores per image (focus, deletion
AUCs, sanity) in `<run>_explanations.csv`. Beside the test pass, a network's run keeps the
predictions of other inputs in files of the same schema (predictions_path's variants): `<run>_val_predictions.csv`
(the validation subset, which the temperature of calibration is fitted on) and `<run>_tta_predictions.csv` (the
test images averaged over their rotations and flips).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import sklearn

import bloodcell_lib
from bloodcell_lib.atomic import write_bytes, write_json, write_text
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.metrics import compute_metrics
from bloodcell_lib.split import dataset_fingerprint, split_sha256

PROB_COLUMNS = [f"prob_{name}" for name in CLASSES]
PREDICTION_COLUMNS = ["path", "true_label", "pred_label", *PROB_COLUMNS, "group"]
# The predictions files a network's run writes beside its test pass (predictions_path's variants).
VAL_VARIANT = "val"
TTA_VARIANT = "tta"
# A run on an image-level split (to measure leakage) is named after its architecture with this suffix.
IMAGE_SPLIT_SUFFIX = "_imagesplit"
# Versions are recorded under the names people install the libraries by.
_LIBRARY_NAMES = {"cv2": "opencv", "sklearn": "scikit-learn"}
# The key of versions that names the library's code, not its version number: runs made by edited code differ here.
SOURCE_KEY = "bloodcell_lib source"


# --- Names ---------------------------------------------------------------------------------------------


def run_name(arch: str, split: pd.DataFrame) -> str:
    """Name of a run's files: the arch key, suffixed when the split is image-level (leakage measurement)."""
    return f"{arch}{IMAGE_SPLIT_SUFFIX}" if split.attrs.get("split_by") == "image" else arch


def predictions_path(folder: str | Path, run: str, variant: str = "") -> Path:
    """`<folder>/<run>_predictions.csv`: the one test pass. With a variant, `<run>_<variant>_predictions.csv`:
    predictions of something else, kept beside it (VAL_VARIANT: the validation subset; TTA_VARIANT: the test
    images averaged over their rotations and flips)."""
    return Path(folder) / f"{run}_{variant + '_' if variant else ''}predictions.csv"


def results_path(folder: str | Path, run: str) -> Path:
    """`<folder>/<run>_results.json`."""
    return Path(folder) / f"{run}_results.json"


def gradcam_path(folder: str | Path, run: str) -> Path:
    """`<folder>/<run>_gradcam.npz`: the Grad-CAM examples (see GradcamExamples)."""
    return Path(folder) / f"{run}_gradcam.npz"


def explanations_path(folder: str | Path, run: str) -> Path:
    """`<folder>/<run>_explanations.csv`: one row per explained test image with its explanation scores."""
    return Path(folder) / f"{run}_explanations.csv"


def figure_path(folder: str | Path, run: str, kind: str) -> Path:
    """`<folder>/<run>_<kind>.png`, e.g. kind "confusion_normalised" or "gradcam"."""
    return Path(folder) / f"{run}_{kind}.png"


def results_files(folder: str | Path) -> list[Path]:
    """Every `*_results.json` in a folder, sorted by name."""
    return sorted(Path(folder).glob("*_results.json"))


def run_of(results: dict[str, Any]) -> str:
    """The run name a results dict records (files written before runs had names: its architecture)."""
    return results.get("run", results["architecture"])


# --- Predictions ---------------------------------------------------------------------------------------


def predictions_frame(rows: pd.DataFrame, proba: np.ndarray) -> pd.DataFrame:
    """Predictions table (PREDICTION_COLUMNS) of split rows (path, label, group) and their probabilities N×5."""
    frame = pd.DataFrame({
        "path": rows["path"].to_numpy(),
        "true_label": rows["label"].to_numpy(),
        "pred_label": [CLASSES[i] for i in proba.argmax(axis=1)],
    })
    for k, col in enumerate(PROB_COLUMNS):
        frame[col] = proba[:, k]
    frame["group"] = rows["group"].to_numpy()
    return frame


def read_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Load a predictions CSV; return (true label indices, probabilities N×5, the frame)."""
    frame = pd.read_csv(path)
    y_true = frame["true_label"].map(CLASSES.index).to_numpy()
    return y_true, frame[PROB_COLUMNS].to_numpy(dtype=np.float64), frame


def record_predictions(folder: str | Path, run: str, rows: pd.DataFrame, proba: np.ndarray, n_boot: int,
                       seed: int, variant: str = "") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Write `<run>_predictions.csv` into folder, then compute the metrics from that file: (its frame, metrics).

    The metrics come from the file just written, so they are exactly what the CSV says; intervals resample the
    CSV's duplicate groups (n_boot, seed: the study's bootstrap). variant: write `<run>_<variant>_predictions.csv`.
    """
    path = predictions_path(folder, run, variant)
    write_text(path, predictions_frame(rows, proba).to_csv(index=False))
    y_true, proba, frame = read_predictions(path)
    return frame, compute_metrics(y_true, proba, groups=frame["group"].to_numpy(), n_boot=n_boot, seed=seed)


# --- Results -------------------------------------------------------------------------------------------


def results_record(*, run: str, architecture: str, display_name: str, split: pd.DataFrame,
                   split_block: dict[str, Any], metrics: dict[str, Any], output_dir: str | Path,
                   versions: dict[str, str], **fields: Any) -> dict[str, Any]:
    """The results dict every run writes: who it is, `fields` (weights, image size, ...), the split it was
    evaluated on (split_block: split_info and more), its leakage audit, metrics, predictions file, output folder,
    library versions and when it was made (UTC)."""
    return {
        "architecture": architecture,
        "display_name": display_name,
        "run": run,
        **fields,
        "split": split_block,
        "leakage_audit": split.attrs.get("leakage_audit"),
        "metrics": metrics,
        "predictions_file": predictions_path(output_dir, run).name,
        "output_dir": str(output_dir),
        "versions": versions,
        "created": utc_timestamp(),
    }


def write_results(folder: str | Path, results: dict[str, Any]) -> Path:
    """Write a results dict to `<folder>/<run>_results.json` (atomically) and return the path."""
    return write_json(results_path(folder, run_of(results)), results)


def read_results(path: str | Path) -> dict[str, Any]:
    """Read one results JSON (OSError or ValueError when it cannot be read or parsed)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_results_folder(folder: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable `*_results.json` of a folder (sorted by name), and a problem line per unreadable one."""
    found, problems = [], []
    for path in results_files(folder):
        try:
            found.append(read_results(path))
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: unreadable ({exc.__class__.__name__})")
    return found, problems


def split_info(split: pd.DataFrame) -> dict[str, Any]:
    """The split's file, its SHA-256, the fingerprint of its images, how it was made and its subset sizes."""
    path = split.attrs.get("split_path")
    return {
        "path": str(path) if path else None,
        "sha256": split_sha256(path) if path and Path(path).exists() else None,
        "dataset_sha256": dataset_fingerprint(split),
        "split_by": split.attrs.get("split_by", "group"),
        "sizes": {s: int((split["subset"] == s).sum()) for s in ("train", "val", "test")},
        "data_root": split.attrs.get("data_root"),
    }


def library_versions(*modules: ModuleType) -> dict[str, str]:
    """Versions of Python, of the given modules (e.g. tensorflow and keras, or cv2) and of the libraries every
    run's numbers depend on: numpy, scikit-learn, pandas and bloodcell_lib."""
    versions = {"python": platform.python_version()}
    for module in (*modules, np, sklearn, pd, bloodcell_lib):
        versions[_LIBRARY_NAMES.get(module.__name__, module.__name__)] = module.__version__
    versions[SOURCE_KEY] = _SOURCE
    return versions


def source_fingerprint(package: Path = Path(bloodcell_lib.__file__).parent) -> str:
    """The first 12 hex digits of a SHA-256 over the package's Python files and templates (path and bytes, in path
    order): the same version number with edited code gives another fingerprint, so the report's versions table shows
    runs made by different code (a kernel started after an edit imports the edited library)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".j2")
                       and "__pycache__" not in p.parts):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


# Taken when this process imported the library: the code its numbers come from, even if the files change later.
_SOURCE = source_fingerprint()


def utc_timestamp() -> str:
    """Now in UTC to the second, ISO 8601 (2024-05-01T12:00:00+00:00): the `created` of every file we write."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- Grad-CAM examples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradcamExamples:
    """The test images a run explained with Grad-CAM, as evaluation saved them in `<run>_gradcam.npz`."""

    run: str
    display_name: str
    data_root: str  # the folder `paths` are relative to
    paths: list[str]  # as in the split
    true: np.ndarray  # int N: class indices (CLASSES)
    pred: np.ndarray  # int N: the predicted class, the one each heatmap explains
    heatmaps: np.ndarray  # float16 N×H×W in [0, 1], at a reduced resolution; resize to show
    image_size: int  # side of the images the model saw
    layer: str
    method: str


def write_gradcam(folder: str | Path, examples: GradcamExamples) -> Path:
    """Write the examples to `<folder>/<run>_gradcam.npz` (compressed, atomically) and return the path."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, run=np.array(examples.run), display_name=np.array(examples.display_name),
        data_root=np.array(examples.data_root), paths=np.array(examples.paths, dtype=str),
        true=np.asarray(examples.true, dtype=np.int64), pred=np.asarray(examples.pred, dtype=np.int64),
        heatmaps=np.asarray(examples.heatmaps, dtype=np.float16), image_size=np.array(int(examples.image_size)),
        layer=np.array(examples.layer), method=np.array(examples.method),
    )
    return write_bytes(gradcam_path(folder, examples.run), buffer.getvalue())


def load_gradcam(output_dir: str | Path, run: str) -> GradcamExamples:
    """Read the Grad-CAM examples evaluation saved for a run (FileNotFoundError when it saved none)."""
    with np.load(gradcam_path(output_dir, run), allow_pickle=False) as data:
        return GradcamExamples(
            run=str(data["run"]), display_name=str(data["display_name"]), data_root=str(data["data_root"]),
            paths=[str(p) for p in data["paths"]], true=data["true"], pred=data["pred"],
            heatmaps=data["heatmaps"], image_size=int(data["image_size"]), layer=str(data["layer"]),
            method=str(data["method"]),
        )
