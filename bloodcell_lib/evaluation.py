"""Evaluate a trained model on one subset of a split: predictions CSV, metrics, figures, Grad-CAM, cost, results JSON.

Design rule: the test subset gets exactly one prediction pass; every number is computed from the
predictions written to `<run>_predictions.csv`, so anyone can recompute them from that file.

Three further measurements sit beside that pass, each on inputs of its own and labelled as such:
- calibration: the validation subset gets its own pass (`<run>_val_predictions.csv`), a temperature is fitted on
  it and the test predictions are scored before and after (calibration.py; `<run>_reliability.png`);
- test-time augmentation (optional, TTA_BY_PROFILE): the probabilities averaged over the 8 rotations and flips
  of each test image (cells have no orientation), in `<run>_tta_predictions.csv`, with a paired test against the
  plain pass;
- the background shortcut (shortcut.py): accuracy with the cell masked out and with the background masked out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from bloodcell_lib import figures
from bloodcell_lib.atomic import describe_os_error, write_text
from bloodcell_lib.calibration import apply_temperature, calibration_report, plot_reliability, reliability_curve
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import DEFAULT_BOOTSTRAP, DEFAULT_SEED, RunConfig, profile_config, resolve_profile
from bloodcell_lib.cost import compiled_forward, measure_cost
from bloodcell_lib.errors import OutputError, ProvenanceError
from bloodcell_lib.explain import (
    METHODS,
    explanation_scores,
    feature_grid,
    heatmaps_by_method,
    overlay_heatmap,
    random_deletion_auc,
    randomised_heatmaps,
    summarise_explanations,
)
from bloodcell_lib.history import history_path, load_history
from bloodcell_lib.masks import cell_masks
from bloodcell_lib.metrics import scores_against
from bloodcell_lib.model import check_model_fits_study, load_trained_model, model_image_size
from bloodcell_lib.pipeline import load_images, make_dataset
from bloodcell_lib.registry import get_arch
from bloodcell_lib.results import (
    PROB_COLUMNS,
    TTA_VARIANT,
    VAL_VARIANT,
    GradcamExamples,
    explanations_path,
    figure_path,
    library_versions,
    predictions_path,
    record_predictions,
    results_record,
    run_name,
    split_info,
    write_gradcam,
    write_results,
)
from bloodcell_lib.shortcut import shortcut_test
from bloodcell_lib.split import load_split

# Side of the heatmaps saved in `<run>_gradcam.npz`: Grad-CAM maps are upsampled from a feature map of 7-19 cells,
# so 64 px keeps all they hold at a fraction of the image-sized file.
GRADCAM_SAVED_SIDE = 64
# The Grad-CAM and sample figures show the first this-many images of each class of the explanation set (all of them
# are scored and saved): a figure of a hundred images would be unreadable.
GRADCAM_FIGURE_PER_CLASS = 4
# Test-time augmentation when evaluate() is not told (tta=None), by the run's profile: on for the study itself,
# off where a quick run matters more than the last point of accuracy (it costs 8 passes over the test images).
TTA_BY_PROFILE: dict[str, bool] = {"paper": True, "demo": False, "smoke": True}  # smoke: tiny, so CI runs it
# The orientations TTA averages over: rot90 k times, of the image and of its mirror image (the dihedral group D4).
TTA_VIEWS = 8
# Metrics whose TTA value and paired difference to the plain pass the results record.
TTA_KEYS = ("macro_f1", "accuracy")
TTA_METHOD = ("mean probability over 4 rotations x 2 mirrorings; paired group bootstrap against the plain pass, "
              "group sign-flip p-value")

logger = logging.getLogger(__name__)


def predict_subset(model, split: pd.DataFrame, subset: str, batch_size: int = 32) -> tuple[pd.DataFrame, np.ndarray]:
    """Run one prediction pass over a subset; return (its split rows in order, probabilities N×5)."""
    spec = get_arch(model.name)
    rows = split[split["subset"] == subset].reset_index(drop=True)
    ds = make_dataset(split, subset, model_image_size(model), spec.preprocess, batch_size=batch_size,
                      augment=False, shuffle=False, cache="none")
    proba = np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
    return rows, proba


def check_training_split(split_block: dict[str, Any], history: dict | None, allow_other_split: bool = False,
                         model: str = "The model") -> dict[str, Any]:
    """Compare a split (split_info) with the one the model's training history records; refuse a mismatch.

    Returns the fields added to results["split"]: matches_training_split (True; False when allowed; None when
    the model recorded no split, e.g. trained before provenance was recorded, which is a warning only) and
    the training run's split path and hashes. A mismatch raises ProvenanceError unless allow_other_split.
    """
    meta = (history or {}).get("meta") or {} if isinstance(history, dict) else {}
    trained = {"training_split_path": meta.get("split_path"), "training_split_sha256": meta.get("split_sha256"),
               "training_dataset_sha256": meta.get("dataset_sha256")}
    pairs = [(trained["training_split_sha256"], split_block.get("sha256")),
             (trained["training_dataset_sha256"], split_block.get("dataset_sha256"))]
    known = [(a, b) for a, b in pairs if a and b]
    where = split_block.get("path") or "this split"
    if not known:
        logger.warning("WARNING: %s records no training split (trained before that was recorded?), so nothing "
                       "shows that %s is the split it was trained on; check it yourself.", model, where)
        return {"matches_training_split": None, **trained}
    if all(a == b for a, b in known):
        return {"matches_training_split": True, **trained}
    trained_path = trained["training_split_path"] or "path not recorded"
    if trained["training_split_sha256"] and split_block.get("sha256") and (
            trained["training_split_sha256"] != split_block["sha256"]):
        what = (f"{model} was trained on split {trained_path} (sha256 {trained['training_split_sha256']}), "
                f"not on {where} (sha256 {split_block['sha256']}).")
    else:
        what = (f"{model} was trained on the images of split {trained_path} as they were then (dataset sha256 "
                f"{trained['training_dataset_sha256']}); the images {where} names differ now (dataset sha256 "
                f"{split_block['dataset_sha256']}).")
    if not allow_other_split:
        raise ProvenanceError(
            f"{what} Rerun with the split the model was trained on ({trained_path}), or pass --allow-other-split "
            "(allow_other_split=True) to evaluate anyway; results will be labelled."
        )
    logger.warning("WARNING: %s Evaluating anyway (--allow-other-split): test images may have been training "
                   "images, and the results say matches_training_split: false.", what)
    return {"matches_training_split": False, **trained}


def evaluation_config(model_path: str | Path | None = None, profile: str | None = None,
                      **overrides: Any) -> RunConfig:
    """The run configuration to evaluate a saved model with, so its intervals equal the notebook's.

    That is the configuration recorded in the model's training history (the notebook's or the CLI's
    `train`); with an explicit profile, or none recorded, the profile's (BLOODCELL_PROFILE, else paper).
    Overrides that are not None (seed=, bootstrap=, gradcam_images=, ...) win over both.
    """
    recorded = None
    if model_path is not None and profile is None:
        path = history_path(model_path)
        recorded = (load_history(path).get("meta") or {}).get("config") if path.exists() else None
    if recorded:
        return RunConfig.from_dict(recorded, **overrides)
    return profile_config(profile, **overrides)


def select_gradcam_examples(labels: Sequence[str], n: int, seed: int = 0,
                            groups: Sequence[Any] | None = None) -> np.ndarray:
    """Pick up to n positions of the test images to explain, the same for every model: chosen from the true
    labels alone (never a model's predictions), spread evenly over the classes, seeded.

    Each class's positions are shuffled with one seeded generator and dealt round-robin (first of every class,
    then second, ...), so a class with few images gives what it has and the others fill up. groups: duplicate
    group per position; a class then deals one image of each of its cells before any second copy (copies are not
    new evidence). Returned grouped by class (CLASSES order), in dealing order within a class: the first k of each
    class are the k that a smaller n would pick.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(np.flatnonzero(labels == name)) for name in CLASSES]
    if groups is not None:
        copy_rank = _copy_rank(groups)
        shuffled = [s[np.argsort(copy_rank[s], kind="stable")] for s in shuffled]
    dealt = [(rank, k) for rank in range(max((len(s) for s in shuffled), default=0))
             for k, s in enumerate(shuffled) if rank < len(s)][:max(0, n)]
    return np.asarray([shuffled[k][rank] for rank, k in sorted(dealt, key=lambda d: (d[1], d[0]))], dtype=int)


def explanation_set(split: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """The test rows every model of a study is explained on: a function of the split's test rows, n and seed only.

    select_gradcam_examples over the test rows in path order (so the split file's row order does not matter), with
    their duplicate groups: class-stratified, as equal per class as the test set allows, one image per cell before
    any copy. No model and no prediction is involved, so the set exists before any prediction and is the same for
    every architecture; explanation_set_record says which it is.
    """
    test = split[split["subset"] == "test"].sort_values("path", kind="stable").reset_index(drop=True)
    chosen = test.iloc[select_gradcam_examples(test["label"], n, seed, groups=test["group"])].reset_index(drop=True)
    chosen.attrs = dict(split.attrs)
    return chosen


def explanation_set_record(rows: pd.DataFrame, n_requested: int, seed: int) -> dict[str, Any]:
    """The `image_set` block of results["explainability"]: how the set was chosen, its size per class, and the
    SHA-256 of its sorted paths (one per line), equal for every model explained on the same set."""
    paths = sorted(rows["path"].astype(str))
    return {
        "n": int(len(rows)), "n_requested": int(n_requested), "seed": int(seed),
        "per_class": {name: int((rows["label"] == name).sum()) for name in CLASSES},
        "n_groups": int(rows["group"].nunique(dropna=False)),
        "paths_sha256": hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest(),
        "rule": "class-stratified, seeded, from the split's test rows alone (before any prediction); "
                "one image per duplicate group before any copy",
    }


def explain_model(model, split: pd.DataFrame, frame: pd.DataFrame, output_dir: Path, name: str,
                  n_images: int, seed: int = 0, make_figures: bool = True,
                  n_boot: int = DEFAULT_BOOTSTRAP, forward=None) -> dict[str, Any]:
    """Grad-CAM and Grad-CAM++ on the study's explanation set: focus, deletion AUC (raw, random-order, normalised)
    and sanity, each with a group-bootstrap interval (explain.summarise_explanations).

    The images are explanation_set(split, n_images, seed), the same for every model; each map explains the model's
    predicted class. Writes `<name>_explanations.csv` (per image: path, labels, group, `<method>_<score>` for
    explain.SCORE_KEYS), `<name>_gradcam.npz` (the images' paths, true and predicted classes, Grad-CAM heatmaps) and,
    with make_figures, Grad-CAM and sample-prediction grids of the first GRADCAM_FIGURE_PER_CLASS of each class.
    frame: the test subset's predictions (their predicted classes are the ones explained); empty → nothing.
    forward: the model's traced inference pass (cost.compiled_forward) for the deletion curves; None → explain's own.
    Both methods' maps come from one Grad-CAM pass, and one randomised copy gives both their sanity references.
    """
    if n_images <= 0 or frame.empty:
        return {}
    spec = get_arch(model.name)
    size = model_image_size(model)
    layer = spec.last_conv_layer
    chosen = explanation_set(split, n_images, seed)
    images, labels, paths = load_images(chosen, "test", size)
    data_root = Path(split.attrs.get("data_root", "."))
    masks, mask_source = cell_masks(data_root, paths, images)
    x = spec.network_input(images)
    shown = frame.set_index("path").loc[paths]
    pred = shown["pred_label"].map(CLASSES.index).to_numpy()
    groups = chosen["group"].to_numpy()
    block: dict[str, Any] = {"mask_source": mask_source, "layer": layer,
                             "image_set": explanation_set_record(chosen, n_images, seed), "image_paths": paths}
    # One random-order reference for both methods: it depends on the images, classes, steps and baseline only.
    random_auc = random_deletion_auc(model, x, pred, seed=seed, grid=feature_grid(model, layer), forward=forward)
    per_image = pd.DataFrame({"path": paths, "true_label": chosen["label"].to_numpy(),
                              "pred_label": shown["pred_label"].to_numpy(), "group": groups})
    heat = heatmaps_by_method(model, x, pred, layer, METHODS)
    random_heat = randomised_heatmaps(model, x, pred, layer, METHODS, seed=seed)
    for method in METHODS:
        scores = explanation_scores(model, x, masks, pred, layer, method, seed=seed, heatmaps=heat[method],
                                    random_auc=random_auc, random_heatmaps=random_heat[method], forward=forward)
        block[method] = summarise_explanations(scores, groups, n_boot=n_boot, seed=seed)
        per_image = per_image.join(scores.add_prefix(f"{method}_"))
    block["scores_file"] = write_text(explanations_path(output_dir, name), per_image.to_csv(index=False)).name
    examples = GradcamExamples(run=name, display_name=spec.display_name, data_root=str(data_root), paths=paths,
                               true=labels, pred=pred, heatmaps=_shrunk(heat["gradcam"], GRADCAM_SAVED_SIDE),
                               image_size=size, layer=layer, method="gradcam")
    block["examples_file"] = write_gradcam(output_dir, examples).name
    if make_figures:
        few = np.flatnonzero(chosen.groupby("label").cumcount().to_numpy() < GRADCAM_FIGURE_PER_CLASS)
        overlays = np.stack([overlay_heatmap(img, h) for img, h in zip(images[few], heat["gradcam"][few])])
        figures.plot_gradcam_grid(images[few], overlays, labels[few], pred[few],
                                  path=figure_path(output_dir, name, "gradcam"),
                                  title=f"Grad-CAM — {spec.display_name}")
        figures.plot_sample_predictions(images[few], labels[few], pred[few],
                                        shown[PROB_COLUMNS].max(axis=1).to_numpy()[few],
                                        path=figure_path(output_dir, name, "samples"))
    return block


def save_figures(frame: pd.DataFrame, metrics: dict, output_dir: Path, name: str, history: dict | None) -> list[str]:
    """Write confusion matrices, ROC curves and training curves as PNG files; return their paths."""
    y_true = frame["true_label"].map(CLASSES.index).to_numpy()
    proba = frame[PROB_COLUMNS].to_numpy()
    kinds = ("confusion", "confusion_normalised", "roc", "curves")
    paths = {kind: figure_path(output_dir, name, kind) for kind in kinds}
    figures.plot_confusion_matrix(metrics["confusion_matrix"], path=paths["confusion"])
    figures.plot_confusion_matrix(metrics["confusion_matrix_normalised"], normalised=True,
                                  path=paths["confusion_normalised"])
    figures.plot_roc_curves(y_true, proba, path=paths["roc"])
    if history:
        figures.plot_history(history, path=paths["curves"])
    else:
        del paths["curves"]
    return [str(p) for p in paths.values()]


def evaluate(model, split: pd.DataFrame, subset: str = "test", output_dir: str | Path = "Saved Models", *,
             history: dict | None = None, config: dict | None = None, model_path: str | Path | None = None,
             weights_used: str | None = None, gradcam_images: int = 50, n_boot: int = DEFAULT_BOOTSTRAP,
             seed: int = DEFAULT_SEED, make_figures: bool = True, cost_repeats: int = 20,
             allow_other_split: bool = False, tta: bool | None = None) -> dict[str, Any]:
    """Evaluate a model on a split subset and write `<run>_predictions.csv` and `<run>_results.json`.

    A split other than the one in the model's training history is refused (ProvenanceError) unless
    allow_other_split, and then labelled in results["split"]["matches_training_split"]. Besides the metrics the
    results hold `calibration` (temperature fitted on the validation subset), `tta` (test-time augmentation;
    tta None → TTA_BY_PROFILE of config's profile) and `shortcut_test` (the background shortcut).
    """
    output_dir = Path(output_dir)
    spec = get_arch(model.name)
    check_model_fits_study(model, model_path or spec.display_name)
    name = run_name(spec.key, split)
    tta, tta_why = tta_setting(tta, (config or {}).get("profile"))
    # Before the prediction pass: a model must not be scored on images it may have been trained on.
    split_block = split_info(split)
    split_block.update(check_training_split(split_block, history, allow_other_split,
                                            model=f"{spec.display_name} ({model_path or 'in memory'})"))
    # All or nothing: every file goes to a hidden staging folder and is moved into place only when all succeeded,
    # so a failure (a full disk, Grad-CAM) never leaves files of two runs side by side.
    with staged_outputs(output_dir, name) as work:
        rows, proba = predict_subset(model, split, subset)
        frame, metrics = record_predictions(work, name, rows, proba, n_boot=n_boot, seed=seed)
        meta = (history.get("meta") or {}) if isinstance(history, dict) else {}
        epochs = meta.get("epochs") or _epochs_from_history(history)
        results = results_record(
            run=name, architecture=spec.key, display_name=spec.display_name, split=split, split_block=split_block,
            metrics=metrics, output_dir=output_dir, versions=library_versions(tf, keras),
            weights=weights_used or meta.get("weights_used"), image_size=model_image_size(model), epochs=epochs,
            recipe=meta.get("recipe"), subset=subset, config=config or {},
        )
        results["calibration"] = calibrate(model, split, subset, frame, work, name, n_boot=n_boot, seed=seed,
                                           make_figures=make_figures)
        # The subset's images, decoded like the prediction pass, in its order: for TTA and the shortcut test.
        images, labels, paths = load_images(split, subset, model_image_size(model))
        if paths != frame["path"].astype(str).tolist():
            raise RuntimeError("The images loaded for TTA and the shortcut test are not the predicted ones.")
        # Traced once and shared: TTA, the shortcut test, the cost's timings and FLOPs, and the deletion curves.
        forward = compiled_forward(model)
        predict = image_predictor(model, forward=forward)
        results["tta"] = (evaluate_tta(predict, images, rows, frame, work, name, n_boot=n_boot, seed=seed)
                          if tta else {"enabled": False})
        results["tta"]["why"] = tta_why
        masks, mask_source = cell_masks(Path(split.attrs.get("data_root", ".")), paths, images)
        results["shortcut_test"], _ = shortcut_test(
            predict, images, labels, masks, groups=frame["group"].to_numpy(),
            original_proba=frame[PROB_COLUMNS].to_numpy(dtype=np.float64), n_boot=n_boot, seed=seed,
            mask_source=mask_source)
        del images
        results["cost"] = measure_cost(model, model_path=model_path, training_seconds=meta.get("total_seconds"),
                                       epochs=(epochs or {}).get("total"), repeats=cost_repeats, forward=forward)
        results["explainability"] = explain_model(model, split, frame if subset == "test" else frame.iloc[:0],
                                                  work, name, gradcam_images, seed, make_figures, n_boot, forward)
        if make_figures:
            results["figures"] = [str(output_dir / Path(p).name)
                                  for p in save_figures(frame, metrics, work, name, _curves(history))]
            if results["calibration"].get("temperature") is not None:
                results["figures"].append(str(output_dir / figure_path(work, name, "reliability").name))
        write_results(work, results)
    return results


def tta_setting(tta: bool | None, profile: str | None) -> tuple[bool, str]:
    """(whether to average over rotations and flips, why): an explicit tta wins, else TTA_BY_PROFILE of the profile
    (None → the one config.resolve_profile picks: BLOODCELL_PROFILE, else paper)."""
    if tta is not None:
        return bool(tta), "given explicitly"
    name = profile or resolve_profile(None)[0]
    on = TTA_BY_PROFILE.get(name, False)
    return on, f"{'on' if on else 'off'} in the {name} profile (evaluation.TTA_BY_PROFILE)"


def image_predictor(model, batch_size: int = 32, forward=None) -> Callable[[np.ndarray], np.ndarray]:
    """A function from uint8 N×S×S×3 images to the model's N×5 probabilities (float64), through the network's own
    preprocessing, batch by batch. forward: the model's traced inference pass (cost.compiled_forward) to run them
    through, so no second graph is traced; None → model.predict_on_batch."""
    spec = get_arch(model.name)
    run = forward if forward is not None else model.predict_on_batch

    def predict(images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, len(CLASSES)))
        return np.concatenate([np.asarray(run(spec.network_input(images[i:i + batch_size])), dtype=np.float64)
                               for i in range(0, len(images), batch_size)])

    return predict


def dihedral_views(images: np.ndarray) -> Iterator[np.ndarray]:
    """The TTA_VIEWS orientations of N×S×S×3 images: each rotated by 0, 90, 180, 270 degrees, then mirrored and
    rotated again. The first view is the images themselves."""
    for mirror in (False, True):
        base = images[:, :, ::-1] if mirror else images
        for turns in range(4):
            yield np.ascontiguousarray(np.rot90(base, turns, axes=(1, 2)))


def tta_proba(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """The probabilities averaged over the dihedral views of each image (one view in memory at a time)."""
    total = None
    for view in dihedral_views(images):
        p = predict(view)
        total = p if total is None else total + p
    return total / TTA_VIEWS


def evaluate_tta(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, rows: pd.DataFrame,
                           frame: pd.DataFrame, folder: Path, name: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Average each image's probabilities over its rotations and flips, write `<name>_tta_predictions.csv`, and
    score it beside the plain pass: TTA_KEYS with intervals, and the paired difference TTA − plain with the same
    groups and resamples. frame: the plain pass's predictions file, rows: the split rows it was made from."""
    record_predictions(folder, name, rows, tta_proba(predict, images), n_boot=0, seed=seed, variant=TTA_VARIANT)
    tta_frame = pd.read_csv(predictions_path(folder, name, TTA_VARIANT))
    y = frame["true_label"].map(CLASSES.index).to_numpy()
    block = scores_against(y, tta_frame[PROB_COLUMNS].to_numpy(dtype=np.float64),
                           frame[PROB_COLUMNS].to_numpy(dtype=np.float64), groups=frame["group"].to_numpy(),
                           keys=TTA_KEYS, n_boot=n_boot, seed=seed)
    return {"enabled": True, "views": TTA_VIEWS, "predictions_file": predictions_path(folder, name, TTA_VARIANT).name,
            **block, "method": TTA_METHOD}


def calibrate(model, split: pd.DataFrame, subset: str, frame: pd.DataFrame, folder: Path, name: str, n_boot: int,
              seed: int, make_figures: bool = True) -> dict[str, Any]:
    """Temperature scaling fitted on the validation subset and scored on `frame` (the evaluated subset's predictions
    file): calibration.calibration_report plus the validation predictions' file. The validation subset gets a
    pass of its own, written to `<name>_val_predictions.csv`; with make_figures, `<name>_reliability.png` shows
    the reliability before and after. A split without validation images, or evaluating the validation subset
    itself, gives {"skipped": why}."""
    if subset == "val":
        return {"skipped": "the evaluated subset is the validation subset the temperature would be fitted on"}
    if not (split["subset"] == "val").any():
        return {"skipped": "the split has no validation images to fit a temperature on"}
    val_rows, val_proba = predict_subset(model, split, "val")
    val_frame, _ = record_predictions(folder, name, val_rows, val_proba, n_boot=0, seed=seed, variant=VAL_VARIANT)
    y_test = frame["true_label"].map(CLASSES.index).to_numpy()
    p_test = frame[PROB_COLUMNS].to_numpy(dtype=np.float64)
    report = calibration_report(val_frame["true_label"].map(CLASSES.index).to_numpy(),
                                val_frame[PROB_COLUMNS].to_numpy(dtype=np.float64), y_test, p_test,
                                groups=frame["group"].to_numpy(), n_boot=n_boot, seed=seed)
    report["val_predictions_file"] = predictions_path(folder, name, VAL_VARIANT).name
    if make_figures:
        t = report["temperature"]
        plot_reliability({"before": reliability_curve(y_test, p_test),
                          f"after (T = {t:.2f})": reliability_curve(y_test, apply_temperature(p_test, t))},
                         path=figure_path(folder, name, "reliability"),
                         title=f"Reliability — {get_arch(model.name).display_name}")
    return report


@contextlib.contextmanager
def staged_outputs(output_dir: Path, name: str) -> Iterator[Path]:
    """Yield a hidden staging folder in output_dir; on success move its files into output_dir, the results JSON
    last (it is what says a run is complete); always remove the folder, also one left by a killed run."""
    staging = output_dir / f".{name}.evaluating"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, staging)) from exc
    try:
        yield staging
        files = sorted(staging.iterdir(), key=lambda p: p.name.endswith("_results.json"))
        for path in files:
            try:
                os.replace(path, output_dir / path.name)
            except OSError as exc:
                raise OutputError(describe_os_error(exc, output_dir / path.name)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def evaluate_saved_model(model_path: str | Path, split_path: str | Path, output_dir: str | Path | None = None,
                         subset: str = "test", data_dir: str | Path | None = None, cfg: RunConfig | None = None,
                         allow_other_split: bool = False) -> dict[str, Any]:
    """Load a `.keras` model and its training history (JSON), then evaluate it on a saved split.

    cfg: bootstrap, seed, gradcam_images and cost_repeats come from it; None → evaluation_config(model_path),
    the configuration the model was trained with, so the numbers equal the notebook's.
    """
    model_path = Path(model_path)
    model, spec = load_trained_model(model_path)
    split = load_split(split_path, data_root=data_dir)
    output_dir = Path(output_dir) if output_dir else model_path.parent
    history = load_history(history_path(model_path)) if history_path(model_path).exists() else None
    cfg = (cfg or evaluation_config(model_path)).replace(arch=spec.key)
    return evaluate(model, split, subset, output_dir, history=history, config=cfg.to_dict(), model_path=model_path,
                    gradcam_images=cfg.gradcam_images, n_boot=cfg.bootstrap, seed=cfg.seed,
                    cost_repeats=cfg.cost_repeats, allow_other_split=allow_other_split, tta=cfg.tta)


# ---------------------------------------------------------------------------------------------------------
# Internals


def _curves(history: dict | None) -> dict | None:
    if not history:
        return None
    return history.get("history", history)


def _epochs_from_history(history: dict | None) -> dict[str, int] | None:
    curves = _curves(history)
    if not curves or "phase" not in curves:
        return None
    phases = list(curves["phase"])
    return {"phase1": phases.count(1), "phase2": phases.count(2), "total": len(phases)}


def _copy_rank(groups: Sequence[Any]) -> np.ndarray:
    """Per position: how many earlier positions share its duplicate group (0 for a cell's first image); a missing
    group id counts as a group of its own."""
    codes, _ = pd.factorize(pd.Series(list(groups)))
    missing = codes < 0
    codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.sum())
    return pd.Series(codes).groupby(codes).cumcount().to_numpy()


def _shrunk(heatmaps: np.ndarray, side: int) -> np.ndarray:
    """Heatmaps resized (area average) to at most side×side, as float16: small enough to keep per run."""
    if heatmaps.shape[1] <= side:
        return heatmaps.astype(np.float16)
    return np.stack([cv2.resize(h, (side, side), interpolation=cv2.INTER_AREA) for h in heatmaps]).astype(np.float16)
