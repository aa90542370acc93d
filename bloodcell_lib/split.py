"""Leakage-safe train/val/test split: stratified by class, every duplicate group kept on one side.

Design rule: copies of one cell (exact or near duplicates found by check-data, plus any groups given in a
metadata CSV such as patient or slide) never sit on both sides of the split. `split_by="image"` breaks
that rule on purpose; it exists only to measure how much the leak inflates scores.

Two more kinds of split follow the same rule: fold k of a grouped, stratified K-fold cross-validation (test = the
cells of fold k, validation carved from the other folds; `folds`, `fold` of make_split), and a learning-curve split
(subsample_training: the study's split with only a stratified share of its training cells kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bloodcell_lib.atomic import write_json, write_text
from bloodcell_lib.classes import CLASSES, canonical_class
from bloodcell_lib.config import RunConfig
from bloodcell_lib.dataset import (SKIPPED_KINDS, DatasetReport, check_dataset, dataset_files, find_data_root,
                                   leakage_audit)
from bloodcell_lib.dedupe import sha256_file
from bloodcell_lib.errors import BloodcellError, ConfigError, ImageDecodeError, ProvenanceError, SplitError
from bloodcell_lib.images import read_rgb

# The file name of a study's split inside its output folder; every model there is trained on it.
SPLIT_FILE = "split.csv"

logger = logging.getLogger(__name__)

SUBSETS: tuple[str, ...] = ("train", "val", "test")
SPLIT_COLUMNS: tuple[str, ...] = ("path", "label", "group", "subset")
SPLIT_BY = ("group", "image")
# One group per class for each of train, val and test is the least a split can hold.
MIN_GROUPS_PER_CLASS = 3
# A class's share of a subset may differ from its share of the whole set by this much (0.05 = 5 points).
SHARE_TOLERANCE = 0.05

_REMAKE = "re-make it with `python -m bloodcell_lib split`"

IMAGE_SPLIT_WARNING = (
    "WARNING: split_by='image' makes every image its own group, so copies of one cell land in different "
    "subsets. Scores on this split are inflated by that leakage; use it only to measure the leakage "
    "against a group split, never to report a model's accuracy."
)


def make_split(
    data: Any,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 42,
    split_by: str = "group",
    metadata: str | Path | pd.DataFrame | None = None,
    progress: bool = True,
    folds: int | None = None,
    fold: int | None = None,
) -> pd.DataFrame:
    """Return one row per image (path, label, group, subset) with attrs data_root, seed, val, test, split_by
    (and folds, fold).

    data: a dataset folder (checked with check_dataset), a DatasetReport, or a DataFrame with columns
    path, label, group and attrs["data_root"]. metadata: optional CSV (or DataFrame) with columns
    file, group whose groups are merged with the duplicate groups (two images sharing either stay together).
    folds, fold: fold `fold` (1-based) of a stratified group K-fold made with `seed` — its cells are the test
    subset (`test` is then unused), validation is carved from the other folds' cells. The K splits of one seed have
    disjoint test subsets that together cover every image (assign_folds).
    """
    _check_parameters(val, test if folds is None else 0.5, split_by)
    if (folds is None) != (fold is None) or (folds is not None and not (folds >= 2 and 1 <= fold <= folds)):
        raise SplitError(f"Cross-validation needs folds ≥ 2 and 1 ≤ fold ≤ folds, got fold={fold}, folds={folds}.")
    frame, root, report = _input_frame(data, progress)
    if metadata is not None:
        frame["group"] = merge_metadata_groups(frame, metadata)
    # The unit that is assigned to a subset: a whole group, or (leakage measurement only) a single image.
    units = frame["path"] if split_by == "image" else frame["group"]
    _require_enough_groups(frame["label"], units, split_by, minimum=MIN_GROUPS_PER_CLASS if folds is None
                           else max(MIN_GROUPS_PER_CLASS, folds + 1))
    y = frame["label"].map(CLASSES.index).to_numpy()
    if folds is None:
        subset = _assign_subsets(y, pd.factorize(units)[0], val, test, seed)
    else:
        subset = _fold_subsets(y, pd.factorize(units)[0], folds, fold, val, seed)
    out = pd.DataFrame({"path": frame["path"], "label": frame["label"], "group": frame["group"], "subset": subset})
    out = out.sort_values("path", kind="stable").reset_index(drop=True)
    out.attrs.update(
        data_root=str(root), seed=int(seed), val=float(val), test=float(test) if folds is None else None,
        split_by=split_by, metadata=None if metadata is None or isinstance(metadata, pd.DataFrame) else str(metadata),
        folds=folds, fold=fold,
    )
    if report is not None:
        out.attrs["leakage_audit"] = leakage_audit(report, out)
    if split_by == "image":
        logger.warning(IMAGE_SPLIT_WARNING)
    return out


def save_split(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the split CSV and its sidecar JSON (data root, seed, fractions, counts) atomically."""
    path = Path(path).expanduser()
    _validate(df, str(path))
    root = df.attrs.get("data_root")
    if root and path.resolve().is_relative_to(Path(root).expanduser().resolve()):
        raise SplitError(
            f"Refusing to write the split to {path}: it is inside the dataset folder {root}, which we never "
            "modify (check-data would report the file as stray). Choose a path outside it."
        )
    text = df[list(SPLIT_COLUMNS)].to_csv(index=False, lineterminator="\n")
    write_text(path, text)
    counts = pd.crosstab(df["subset"], df["label"])
    sidecar = {
        "data_root": str(Path(root).expanduser().resolve()) if root else None,
        "seed": df.attrs.get("seed"),
        "val": df.attrs.get("val"),
        "test": df.attrs.get("test"),
        "split_by": df.attrs.get("split_by", "group"),
        "metadata": df.attrs.get("metadata"),
        "folds": df.attrs.get("folds"),
        "fold": df.attrs.get("fold"),
        "train_fraction": df.attrs.get("train_fraction"),
        "parent_split_sha256": df.attrs.get("parent_split_sha256"),
        # A learning-curve split leaves these training images of the folder out on purpose (dataset_changes).
        "left_out_n": df.attrs.get("left_out_n"),
        "left_out_sha256": df.attrs.get("left_out_sha256"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_images": int(len(df)),
        "csv_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "counts": {
            s: {c: int(counts.at[s, c]) if s in counts.index and c in counts.columns else 0 for c in CLASSES}
            for s in SUBSETS
        },
        **_dataset_record(df),
        "leakage_audit": df.attrs.get("leakage_audit"),
    }
    write_json(sidecar_path(path), sidecar)
    df.attrs["split_path"] = str(path)
    return path


def load_split(path: str | Path, data_root: str | Path | None = None) -> pd.DataFrame:
    """Read a split CSV, check it, and set attrs (data_root from the argument or the sidecar, split_path, ...)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SplitError(f"No split file at {path}; make one with "
                         f"`python -m bloodcell_lib split DATA_DIR --out {path}`.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path} is not a readable split CSV ({exc}); {_REMAKE}.") from exc
    _validate(df, str(path))
    sidecar = _read_sidecar(path)
    if sidecar.get("csv_sha256") and sidecar["csv_sha256"] != split_sha256(path):
        logger.warning("%s was changed after %s was written; the sidecar's seed and counts may not describe it.",
                       path, sidecar_path(path))
    root = data_root if data_root is not None else sidecar.get("data_root")
    if root is None:
        raise SplitError(
            f"{path} has no sidecar {sidecar_path(path).name} recording the dataset folder, so its relative paths "
            "cannot be resolved; pass --data-dir (data_root=...) with the folder the split was made from."
        )
    root = Path(root).expanduser().resolve()
    if data_root is not None:
        root = _locate_root(root, df["path"].iloc[0])
    if not root.is_dir():
        origin = "given" if data_root is not None else f"recorded in {sidecar_path(path).name}"
        raise SplitError(
            f"The dataset folder {root} ({origin}) for split {path} does not exist (split made on another machine?); "
            "pass --data-dir (data_root=...) with the folder that holds the class folders."
        )
    split_by = sidecar.get("split_by") or ("image" if _shared_groups(df) else "group")
    if split_by == "group" and _shared_groups(df):
        raise SplitError(f"{path} is a group split but {_leak_message(df)}; it leaks. {_REMAKE.capitalize()}.")
    df.attrs.update(
        data_root=str(root), split_path=str(path), split_by=split_by, seed=sidecar.get("seed"),
        val=sidecar.get("val"), test=sidecar.get("test"), metadata=sidecar.get("metadata"),
        leakage_audit=sidecar.get("leakage_audit"), folds=sidecar.get("folds"), fold=sidecar.get("fold"),
        train_fraction=sidecar.get("train_fraction"), parent_split_sha256=sidecar.get("parent_split_sha256"),
        left_out_n=sidecar.get("left_out_n"), left_out_sha256=sidecar.get("left_out_sha256"),
    )
    return df


def resolve_split(cfg: RunConfig, verbose: int = 1,
                  report: DatasetReport | None = None) -> tuple[pd.DataFrame, Path]:
    """Return (split, path): the given split, the output folder's split for this dataset, or a new one saved there.

    The study's rule: every model in an output folder trains on its one split. A split there made with other
    settings is refused (SplitError), never silently overwritten; a dataset that changed since is refused
    (ProvenanceError). The returned split's attrs["dataset_sha256"] is the fingerprint of its images as checked.
    A cross-validation run (cfg.folds) gets fold cfg.fold of the seed's folds in its own folder; a learning-curve
    point (cfg.curve_point or train_fraction < 1) the study's split (made in cfg.study_path when missing) with a
    share of its training cells (subsample_training), saved in its own folder.
    report: a DatasetReport of cfg.data_dir already made (saves a second scan of the folder).
    """
    if cfg.split_path:
        path = Path(cfg.split_path)
        split = load_split(path, data_root=cfg.data_dir)
        # A split of another dataset, or of this one before it changed, would train on the wrong images.
        check_split_matches_dataset(split)
        return split, path
    if not cfg.data_dir:
        raise ConfigError("Training needs a dataset: give data_dir (--data-dir) or a split file (--split).")
    if cfg.curve_point or cfg.train_fraction != 1.0:
        return _curve_split(cfg, verbose, report)
    path = cfg.output_path / SPLIT_FILE
    root = find_data_root(cfg.data_dir).resolve()
    same = {"data_root": str(root), "seed": cfg.seed, "val": cfg.val_fraction,
            "test": cfg.test_fraction if cfg.folds is None else None, "split_by": cfg.split_by, "folds": cfg.folds,
            "fold": cfg.fold}
    if path.exists():
        split = load_split(path)
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
    split = make_split(report if report is not None else cfg.data_dir, val=cfg.val_fraction, test=cfg.test_fraction,
                       seed=cfg.seed, split_by=cfg.split_by, progress=bool(verbose), folds=cfg.folds, fold=cfg.fold)
    save_split(split, path)
    if verbose:
        print(f"Split written to {path}" + (f" (fold {cfg.fold} of {cfg.folds}, seed {cfg.seed})" if cfg.folds else ""))
    split = load_split(path)
    split.attrs["dataset_sha256"] = dataset_fingerprint(split)
    return split, path


def subsample_training(split: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The split with only a share of its training cells: per class, round(fraction × its training groups) whole
    duplicate groups (at least one) drawn with `seed`; val and test rows unchanged. attrs["train_fraction"] records
    the fraction. The draws are nested: a larger fraction keeps every group a smaller one kept."""
    if not 0.0 < fraction <= 1.0:
        raise SplitError(f"train_fraction is a share of the training cells in (0, 1], got {fraction}.")
    train = split[split["subset"] == "train"]
    rng = np.random.default_rng(seed)
    kept: set[str] = set()
    for label in sorted(train["label"].unique()):
        groups = np.array(sorted(train.loc[train["label"] == label, "group"].unique()))
        order = rng.permutation(len(groups))  # one order per class, so the kept groups nest across fractions
        kept.update(groups[order[:max(1, int(round(fraction * len(groups))))]])
    out = split[(split["subset"] != "train") | split["group"].isin(kept)].reset_index(drop=True)
    out.attrs.update({k: v for k, v in split.attrs.items() if k not in ("split_path",)})
    out.attrs["train_fraction"] = float(fraction)
    return out


def _curve_split(cfg: RunConfig, verbose: int, report: DatasetReport | None) -> tuple[pd.DataFrame, Path]:
    """resolve_split for a learning-curve point: the study's split with cfg.train_fraction of its training cells."""
    study = cfg.replace(output_dir=str(cfg.study_path), study_dir=None, train_fraction=1.0, curve_point=False)
    parent, parent_path = resolve_split(study, verbose=verbose, report=report)
    parent_sha = split_sha256(parent_path)
    path = cfg.output_path / SPLIT_FILE
    if path.exists():
        split = load_split(path)
        if split.attrs.get("parent_split_sha256") == parent_sha and split.attrs.get("train_fraction") == \
                cfg.train_fraction:
            return split, path
        raise SplitError(
            f"{path} holds a learning-curve split of another study split or fraction than this run's (fraction "
            f"{cfg.train_fraction} of {parent_path}); choose another --output folder, or move that folder away.")
    split = subsample_training(parent, cfg.train_fraction, cfg.seed)
    split.attrs["parent_split_sha256"] = parent_sha
    left_out = set(parent["path"]) - set(split["path"])
    split.attrs.update(left_out_sha256=paths_sha256(left_out), left_out_n=len(left_out))
    save_split(split, path)
    if verbose:
        n = int((split["subset"] == "train").sum())
        print(f"Learning-curve split written to {path}: {cfg.train_fraction:g} of the study's training cells "
              f"({n} images)")
    split = load_split(path)
    split.attrs["dataset_sha256"] = dataset_fingerprint(split)
    return split, path


def assign_folds(labels: np.ndarray, units: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (1..folds) of every image: stratified by class, whole groups (units) in one fold."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.zeros(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The least populated class has only N members"
        for k, (_, test_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels, units), 1):
            fold_of[test_idx] = k
    return fold_of


def _fold_subsets(y: np.ndarray, units: np.ndarray, folds: int, fold: int, val: float, seed: int) -> np.ndarray:
    """Test = the images of fold `fold`; val carved (a val share of all images) from the others; the rest train."""
    return _val_and_train_around(y, units, np.flatnonzero(assign_folds(y, units, folds, seed) == fold), val, seed)


def split_sha256(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a split file's bytes (recorded with every result)."""
    return sha256_file(path)


def dataset_fingerprint(split: pd.DataFrame) -> str:
    """Return the SHA-256 of the images a split names, as they are now under its data root.

    It hashes the sorted lines "relative path, size in bytes, SHA-256 of the bytes", so it changes when an
    image is added to or removed from the split or its content changes, and not when the folder is moved or
    its files are touched. Recorded with the split, every trained model and every result.
    """
    return _fingerprint(image_hashes(_data_root(split), split["path"]))


def image_hashes(root: str | Path, paths: Any) -> dict[str, tuple[int, str]]:
    """Return {relative path: (size in bytes, SHA-256)} of image files under root; missing files are an error."""
    root = Path(root)
    table: dict[str, tuple[int, str]] = {}
    missing: list[str] = []
    for rel in sorted(set(map(str, paths))):
        file = root / rel
        try:
            table[rel] = (file.stat().st_size, sha256_file(file))
        except OSError:
            missing.append(rel)
    if missing:
        raise SplitError(
            f"{len(missing)} image(s) named in the split are not in {root} (e.g. {', '.join(missing[:3])}); "
            f"the split belongs to another dataset folder or files were removed. {_REMAKE.capitalize()}."
        )
    return table


@dataclass
class DatasetChanges:
    """How a dataset folder differs from the images a split names (all paths relative to the data root)."""

    root: Path
    added: list[str] = field(default_factory=list)  # readable images in the folder that the split lacks
    missing: list[str] = field(default_factory=list)  # files the split names that the folder lacks
    changed: list[str] = field(default_factory=list)  # content differs from the hash recorded with the split
    content_recorded: bool = False  # splits saved before hashes were recorded cannot tell changed content
    fingerprint: str | None = None  # dataset_fingerprint of the split as it is now (None when files are missing)

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.missing or self.changed)

    def describe(self) -> str:
        """Return counts and a few examples of each difference, e.g. "2 images added (e.g. a, b)"."""
        parts = []
        for paths, what in ((self.added, "in the folder but not in the split (added since?)"),
                            (self.missing, "named in the split but missing from the folder"),
                            (self.changed, "changed content since the split was saved")):
            if paths:
                parts.append(f"{len(paths)} image(s) {what} (e.g. {', '.join(paths[:3])})")
        return "; ".join(parts) if parts else "no difference"


def dataset_changes(split: pd.DataFrame) -> DatasetChanges:
    """Compare a split with its data root: images added to or missing from the folder, and changed content.

    Content is compared with the hashes save_split recorded in the sidecar (not available for older splits).
    """
    root = _data_root(split)
    named = set(split["path"].astype(str))
    on_disk = dataset_files(root)
    changes = DatasetChanges(root=root, missing=sorted(named - on_disk))
    # Unreadable files are left out of every split (check-data reports them), so they count as nothing new.
    changes.added = [p for p in sorted(on_disk - named) if _readable(root / p)]
    if changes.added and split.attrs.get("left_out_sha256") == paths_sha256(changes.added):
        changes.added = []  # a learning-curve split: exactly the training images it leaves out on purpose
    recorded = _read_sidecar(Path(split.attrs["split_path"])).get("image_sha256") if split.attrs.get(
        "split_path") else None
    changes.content_recorded = isinstance(recorded, dict)
    present = image_hashes(root, sorted(named & on_disk))
    if changes.content_recorded:
        changes.changed = [p for p, (_, sha) in present.items() if recorded.get(p) not in (None, sha)]
    if not changes.missing:
        changes.fingerprint = _fingerprint(present)
    return changes


def paths_sha256(paths: Any) -> str:
    """SHA-256 of a set of relative paths (sorted, one per line)."""
    return hashlib.sha256("\n".join(sorted(map(str, paths))).encode("utf-8")).hexdigest()


def check_split_matches_dataset(split: pd.DataFrame, advice: str | None = None) -> str:
    """Refuse (ProvenanceError) a split whose data root does not hold exactly its images, unchanged.

    Returns the dataset fingerprint and records it in split.attrs["dataset_sha256"]. advice: what the message
    tells the user to do (default: make a split of the folder, or give the folder the split was made from).
    """
    changes = dataset_changes(split)
    if not changes.unchanged:
        where = split.attrs.get("split_path") or "the split"
        advice = advice or (f"Make a split of the folder as it is now with `python -m bloodcell_lib split "
                            f"{shlex.quote(str(changes.root))} --out NEW_SPLIT.csv`, or pass the --data-dir the "
                            "split was made from.")
        raise ProvenanceError(
            f"The dataset folder {changes.root} does not hold the images of {where}: {changes.describe()}. "
            f"Training would silently use another list of images than the folder's. {advice}"
        )
    split.attrs["dataset_sha256"] = changes.fingerprint
    return str(changes.fingerprint)


def split_summary(df: pd.DataFrame) -> str:
    """Return a table of images per subset × class, groups per subset, class-share gaps and any leakage."""
    counts = pd.crosstab(df["label"], df["subset"]).reindex(index=list(CLASSES), columns=list(SUBSETS), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    n = max(len(df), 1)
    share = {s: f"{counts.at['total', s] / n:.1%}" for s in SUBSETS}
    groups = {s: int(df.loc[df["subset"] == s, "group"].nunique()) for s in SUBSETS}
    lines = [
        f"Split of {len(df)} images by {df.attrs.get('split_by', 'group')}"
        + (f", seed {df.attrs['seed']}" if df.attrs.get("seed") is not None else "")
        + (f" (data root: {df.attrs['data_root']})" if df.attrs.get("data_root") else ""),
        counts.to_string(),
        "share of images  " + "  ".join(f"{s} {share[s]}" for s in SUBSETS),
        "groups           " + "  ".join(f"{s} {groups[s]}" for s in SUBSETS),
    ]
    gap = class_share_gap(df)
    lines.append(f"Largest gap between a class's share of a subset and of the whole set: {gap * 100:.1f} points"
                 + (" (more than 5: small set or few groups)" if gap > SHARE_TOLERANCE else " (within 5)."))
    if _shared_groups(df):
        lines.append(f"Leakage: {_leak_message(df)}.")
    else:
        lines.append("Leakage: no group appears in more than one subset.")
    audit = df.attrs.get("leakage_audit")
    if audit:
        lines.append(f"Leakage audit: {audit['test_images_with_match_in_train']} of {audit['n_test']} test images "
                     f"have a verified copy in train (score ≥ {audit['min_score']})"
                     + "".join(f"\n  {e['test']} ~ {e['train']} ({e['score']:.3f})" for e in audit["examples"][:3]))
    if df.attrs.get("split_by") == "image":
        lines.append(IMAGE_SPLIT_WARNING)
    return "\n".join(lines)


def class_share_gap(df: pd.DataFrame) -> float:
    """Return the largest |share of class c in subset s − share of c overall| over classes and subsets."""
    overall = df["label"].value_counts(normalize=True).reindex(list(CLASSES), fill_value=0.0)
    gaps = [0.0]
    for s in SUBSETS:
        part = df.loc[df["subset"] == s, "label"]
        if len(part):
            shares = part.value_counts(normalize=True).reindex(list(CLASSES), fill_value=0.0)
            gaps.append(float((shares - overall).abs().max()))
    return max(gaps)


def sidecar_path(path: str | Path) -> Path:
    """Return the sidecar JSON path of a split CSV: split.csv → split.json."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix.casefold() == ".csv" else path.with_name(path.name + ".json")


def merge_metadata_groups(frame: pd.DataFrame, metadata: str | Path | pd.DataFrame) -> pd.Series:
    """Return the duplicate groups merged with metadata groups (union: sharing either joins two images).

    Metadata rows name a file by its path relative to the data root or by its bare file name (when unique).
    Each merged group is named after the smallest duplicate-group id it contains.
    """
    meta = _read_metadata(metadata)
    paths = frame["path"].tolist()
    dup_groups = frame["group"].astype(str).tolist()
    by_path = {p: i for i, p in enumerate(paths)}
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        by_name[PurePosixPath(p).name].append(i)

    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(node: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    unmatched: list[str] = []
    for file, group in zip(meta["file"], meta["group"]):
        file, group = str(file).strip().replace("\\", "/"), str(group).strip()
        if not file or not group:
            continue
        if file in by_path:
            hits = [by_path[file]]
        else:
            hits = by_name.get(PurePosixPath(file).name, [])
            if len(hits) > 1:
                raise SplitError(
                    f"Metadata file name {file!r} matches {len(hits)} images "
                    f"({', '.join(paths[i] for i in hits[:3])}); "
                    "write its path relative to the dataset folder instead."
                )
        if not hits:
            unmatched.append(file)
        for i in hits:
            a, b = find(("dup", dup_groups[i])), find(("meta", group))
            if a != b:
                parent[a] = b
    if len(unmatched) == len(meta):
        raise SplitError(
            f"None of the {len(meta)} files named in the metadata matches an image of the dataset "
            f"(e.g. {unmatched[0]!r}); give paths relative to the dataset folder or bare file names."
        )
    if unmatched:
        logger.warning("%d metadata rows name no image of the dataset and were ignored (e.g. %s).",
                       len(unmatched), ", ".join(unmatched[:3]))
    name: dict[tuple[str, str], str] = {}
    for g in sorted(set(dup_groups)):
        name.setdefault(find(("dup", g)), g)
    return pd.Series([name[find(("dup", g))] for g in dup_groups], index=frame.index, name="group")


# ---------------------------------------------------------------------------------------------------------
# Internals


def _check_parameters(val: float, test: float, split_by: str) -> None:
    if split_by not in SPLIT_BY:
        raise SplitError(f"split_by must be 'group' or 'image', got {split_by!r}.")
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise SplitError(f"val and test must be fractions above 0 that leave room for training; "
                         f"got val={val}, test={test}.")


def _input_frame(data: Any, progress: bool) -> tuple[pd.DataFrame, Path, DatasetReport | None]:
    """Return (path, label, group frame, absolute data root, the check's report or None) from a folder,
    a DatasetReport or a DataFrame."""
    report = None
    if isinstance(data, pd.DataFrame):
        frame, root = data, data.attrs.get("data_root")
        if not root:
            raise SplitError("The DataFrame given to make_split has no attrs['data_root']; set it to the dataset "
                             "folder its paths are relative to.")
    else:
        if isinstance(data, (str, Path)):
            data = check_dataset(data, progress=progress)
        if not isinstance(data, DatasetReport):
            raise SplitError("make_split needs a dataset folder, a DatasetReport or a DataFrame, "
                             f"got {type(data).__name__}.")
        frame, root, report = data.to_frame(), data.root, data
        skipped = [p for p in data.problems if p.kind in SKIPPED_KINDS]
        if skipped:
            logger.warning("%d unreadable files are left out of the split (see check-data).", len(skipped))
    missing = {"path", "label", "group"} - set(frame.columns)
    if missing:
        raise SplitError(f"The data given to make_split lacks column(s) {', '.join(sorted(missing))}.")
    if frame.empty:
        raise SplitError(f"No images to split in {root}.")
    frame = frame[["path", "label", "group"]].astype(str).reset_index(drop=True)
    labels = frame["label"].map(lambda s: canonical_class(s) or s)
    bad = sorted(set(labels) - set(CLASSES))
    if bad:
        raise SplitError(f"Unknown class label(s) {', '.join(map(repr, bad))}; expected one of {', '.join(CLASSES)}.")
    frame["label"] = labels
    return frame, Path(root).expanduser().resolve(), report


def _read_metadata(metadata: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(metadata, pd.DataFrame):
        meta, where = metadata, "the metadata DataFrame"
    else:
        where = str(metadata)
        try:
            meta = pd.read_csv(metadata, dtype=str, keep_default_na=False)
        except FileNotFoundError as exc:
            raise SplitError(f"Metadata file {metadata} does not exist.") from exc
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise SplitError(f"Metadata file {metadata} is not a readable CSV ({exc}).") from exc
    missing = {"file", "group"} - set(meta.columns)
    if missing or meta.empty:
        raise SplitError(f"{where} needs columns 'file' and 'group' and at least one row "
                         f"(columns found: {', '.join(map(str, meta.columns)) or 'none'}).")
    return meta.fillna("")


def _require_enough_groups(labels: pd.Series, units: pd.Series, split_by: str,
                           minimum: int = MIN_GROUPS_PER_CLASS) -> None:
    per_class = pd.DataFrame({"label": labels, "unit": units}).groupby("label")["unit"].nunique()
    few = per_class[per_class < minimum]
    if len(few):
        unit = "images" if split_by == "image" else "duplicate groups"
        detail = ", ".join(f"{c}: {n}" for c, n in few.items())
        raise SplitError(
            f"Too few {unit} to split: every class needs at least {minimum} (one each for train, val and test"
            f"{', and one per fold' if minimum > MIN_GROUPS_PER_CLASS else ''}), but {detail}. Add images of those "
            "classes; copies of one cell count once."
        )


def _assign_subsets(y: np.ndarray, units: np.ndarray, val: float, test: float, seed: int) -> np.ndarray:
    """Carve test from everything, then val from the rest; both with StratifiedGroupKFold folds."""
    test_idx = _carve_fold(y, units, np.arange(len(y)), test, seed, "test", groups_left=2)
    return _val_and_train_around(y, units, test_idx, val, seed)


def _val_and_train_around(y: np.ndarray, units: np.ndarray, test_idx: np.ndarray, val: float, seed: int) -> np.ndarray:
    """The subset of every image given the test images: val carved (a val share of all images) from the rest with
    StratifiedGroupKFold folds, the rest train."""
    rest = np.setdiff1d(np.arange(len(y)), test_idx)
    val_of_rest = min(val / (1.0 - len(test_idx) / len(y)), 0.5)
    val_idx = _carve_fold(y, units, rest, val_of_rest, seed, "val", groups_left=1)
    subset = np.full(len(y), "train", dtype=object)
    subset[test_idx] = "test"
    subset[val_idx] = "val"
    return subset


def _carve_fold(y: np.ndarray, units: np.ndarray, idx: np.ndarray, fraction: float, seed: int, name: str,
                groups_left: int) -> np.ndarray:
    """Return the indices (within idx) of the fold that best matches the class shares and the fraction.

    A fold qualifies when it holds every class and leaves at least `groups_left` groups of every class
    behind. With few groups, fewer folds (so larger ones) are tried until one qualifies.
    """
    y_sub, g_sub = y[idx], units[idx]
    classes = np.unique(y_sub)
    overall = np.bincount(y_sub, minlength=len(CLASSES)) / len(y_sub)
    n_units = len(np.unique(g_sub))
    first = max(2, int(round(1.0 / fraction)))
    for n_splits in range(min(first, n_units), 1, -1):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        best, best_score = None, np.inf
        with warnings.catch_warnings():
            # "The least populated class has only N members": the qualifying test below handles that case.
            warnings.simplefilter("ignore", UserWarning)
            try:
                folds = [fold for _, fold in splitter.split(np.zeros(len(y_sub)), y_sub, g_sub)]
            except ValueError:  # "n_splits=20 cannot be greater than the number of members in each class"
                continue  # a small set and a small fraction: fewer, larger folds are tried next
        for fold in folds:
            left = np.setdiff1d(np.arange(len(y_sub)), fold)
            if not _holds_every_class(y_sub[fold], g_sub[fold], classes, 1) or not _holds_every_class(
                    y_sub[left], g_sub[left], classes, groups_left):
                continue
            shares = np.bincount(y_sub[fold], minlength=len(CLASSES)) / len(fold)
            score = np.abs(shares - overall).max() + abs(len(fold) / len(y_sub) - fraction)
            if score < best_score:
                best, best_score = fold, score
        if best is not None:
            return idx[best]
    raise SplitError(
        f"Cannot carve a {name} subset that holds every class and leaves enough groups of each class for the "
        f"other subsets ({n_units} groups in {len(y_sub)} images). Add images, or lower val/test."
    )


def _holds_every_class(y: np.ndarray, groups: np.ndarray, classes: np.ndarray, min_groups: int) -> bool:
    for c in classes:
        if len(np.unique(groups[y == c])) < min_groups:
            return False
    return True


def _validate(df: pd.DataFrame, where: str) -> None:
    missing = set(SPLIT_COLUMNS) - set(df.columns)
    if missing:
        raise SplitError(f"{where}: missing column(s) {', '.join(sorted(missing))}; a split has columns "
                         f"{', '.join(SPLIT_COLUMNS)}. Re-make it with `python -m bloodcell_lib split`.")
    if df.empty:
        raise SplitError(f"{where}: the split holds no rows. Re-make it with `python -m bloodcell_lib split`.")
    checks = [
        ("label", ~df["label"].isin(CLASSES), f"is not one of {', '.join(CLASSES)}"),
        ("subset", ~df["subset"].isin(SUBSETS), "is not one of train, val, test"),
        ("path", df["path"].astype(str).str.strip() == "", "is empty"),
        ("path", df["path"].astype(str).map(_unsafe_path), "is not a path inside the dataset folder"),
        ("path", df["path"].duplicated(), "appears more than once"),
    ]
    for column, bad, what in checks:
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise SplitError(f"{where}: {column} {df[column].iloc[row]!r} (row {row + 1}) {what}; "
                             f"{int(bad.sum())} row(s) affected. {_REMAKE.capitalize()}.")


def _unsafe_path(p: str) -> bool:
    pure = PurePosixPath(p)
    return pure.is_absolute() or ".." in pure.parts or (len(p) > 1 and p[1] == ":")


def _shared_groups(df: pd.DataFrame) -> list[str]:
    per_group = df.groupby("group")["subset"].nunique()
    return sorted(per_group[per_group > 1].index)


def _leak_message(df: pd.DataFrame) -> str:
    shared = _shared_groups(df)
    train_groups = set(df.loc[df["subset"] == "train", "group"])
    held_out = df[df["subset"] != "train"]
    n_copies = int(held_out["group"].isin(train_groups).sum())
    return (f"{len(shared)} groups appear in more than one subset (e.g. {', '.join(shared[:3])}); "
            f"{n_copies} of {len(held_out)} val/test images have a copy in train")


def _locate_root(root: Path, sample: str) -> Path:
    """Return the folder under `root` that holds the split's files (a Kaggle zip nests them a level or two down)."""
    if (root / sample).exists() or not root.is_dir():
        return root
    try:
        found = find_data_root(root).resolve()
    except BloodcellError:
        return root
    return found if (found / sample).exists() else root


def _data_root(split: pd.DataFrame) -> Path:
    root = split.attrs.get("data_root")
    if not root:
        raise SplitError("The split has no attrs['data_root'] saying where its images are; load it with "
                         "load_split or set data_root.")
    return Path(root).expanduser()


def _fingerprint(table: dict[str, tuple[int, str]]) -> str:
    lines = "".join(f"{path}\t{size}\t{sha}\n" for path, (size, sha) in sorted(table.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _dataset_record(df: pd.DataFrame) -> dict[str, Any]:
    """The sidecar's record of the split's images: their fingerprint and each file's SHA-256 (for diffs later)."""
    root = df.attrs.get("data_root")
    try:
        table = image_hashes(_data_root(df), df["path"]) if root else None
    except SplitError as exc:
        logger.warning("The split's images are not recorded, so later changes to them cannot be detected: %s", exc)
        table = None
    if table is None:
        return {"dataset_sha256": None, "image_sha256": None}
    return {"dataset_sha256": _fingerprint(table), "image_sha256": {p: sha for p, (_, sha) in table.items()}}


def _readable(file: Path) -> bool:
    try:
        read_rgb(file)
    except ImageDecodeError:
        return False
    return True


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SplitError(f"{side} (the split's sidecar) is not readable JSON ({exc}); "
                         "delete it and pass --data-dir.") from exc
    return data if isinstance(data, dict) else {}
