"""Checking a dataset folder before anything trains on it: where the classes are, what is unreadable,
what is a copy of what. The check only reads; it never writes into the dataset folder."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from bloodcell_lib import dedupe, images
from bloodcell_lib.atomic import write_json
from bloodcell_lib.classes import CLASSES, canonical_class
from bloodcell_lib.errors import DatasetError, ImageDecodeError, ImageTooLargeError, MissingClassError

# How far below the folder the user names we look for the class folders: the Kaggle zip unpacks to
# DIR/Blood Cell Images/dataset/<class>, two levels down.
SEARCH_DEPTH = 2

# Pillow decodes with the GIL released, so two threads keep both cores of a small machine busy.
WORKERS = 2

# Scans shorter than this finish before a progress bar would be worth reading.
PROGRESS_MIN_FILES = 100

# Files that are skipped (not in the records) for each of these kinds; the others are notes.
SKIPPED_KINDS = ("corrupt", "empty", "not_image", "too_large")

# How many paths per problem kind summary() prints before "... and N more".
_SUMMARY_PATHS = 10


@dataclass
class ImageRecord:
    """One readable image: where it is, its class, its bytes' hash, its size, its original mode, its group."""

    path: str  # posix, relative to the data root
    label: str
    sha256: str
    width: int
    height: int
    mode: str  # Pillow mode before conversion to RGB
    group: str = ""  # duplicate-group id such as "g00042"; every image has one


@dataclass
class Problem:
    """Something in the folder the user should know about, with the file or folder it concerns."""

    path: str  # posix, relative to the data root
    kind: str  # corrupt, empty, not_image, too_large, hidden, stray_folder, stray_file, label_conflict, converted, merged_folders
    message: str


@dataclass
class DatasetReport:
    """What check_dataset found; summary() for people, to_dict()/save_json() for files, to_frame() for code."""

    requested: Path
    root: Path
    records: list[ImageRecord]
    counts: dict[str, int]
    problems: list[Problem]
    ignored: list[str]
    size_stats: dict[str, Any]
    groups_per_class: dict[str, int]
    exact_duplicates: int  # files whose bytes equal an earlier file's
    near_duplicate_groups: int  # groups holding at least two different files
    class_folders: dict[str, list[str]] = field(default_factory=dict)
    min_score: float = dedupe.MIN_SCORE
    seconds: float = 0.0
    # Verified candidate pairs {"a", "b", "score", "accepted"}: every accepted pair and the rejected ones
    # scoring ≥ dedupe.REPORT_FLOOR, for the diagnostics (score distribution, pairs at the boundary).
    pairs: list[dict[str, Any]] = field(default_factory=list)
    # One fingerprint per record, kept in memory for the leakage audit after the split; never saved.
    prints: list[dedupe.CellPrint] = field(default_factory=list, repr=False)

    def problems_by_kind(self) -> dict[str, list[Problem]]:
        """Return the problems grouped by kind, in order of first occurrence."""
        grouped: dict[str, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            grouped[problem.kind].append(problem)
        return dict(grouped)

    def summary(self) -> str:
        """Return a readable multi-line account of the check."""
        lines = [f"Dataset root: {self.root}"]
        if self.root != self.requested:
            lines.append(f"  (found below the folder given, {self.requested})")
        for label, folders in self.class_folders.items():
            if folders != [label]:
                lines.append(f"  {label} read from: {', '.join(folders)}")
        total = sum(self.counts.values())
        lines.append(f"{total} readable images in {len(self.counts)} classes ({self.seconds:.1f} s):")
        width = max(len(c) for c in self.counts)
        for label, n in self.counts.items():
            lines.append(f"  {label:<{width}}  {n:>6} images  {self.groups_per_class.get(label, 0):>6} groups")
        if self.size_stats:
            w, h = self.size_stats["width"], self.size_stats["height"]
            lines.append(
                f"Image size: width {w['min']}-{w['max']} (median {w['median']:g}), "
                f"height {h['min']}-{h['max']} (median {h['median']:g}); "
                f"{len(self.size_stats['sizes'])} distinct sizes, most common "
                + ", ".join(f"{s} ×{n}" for s, n in list(self.size_stats["sizes"].items())[:3])
            )
        n_groups = len({r.group for r in self.records})
        lines.append(
            f"Duplicates: {self.exact_duplicates} exact copies (same bytes); {self.near_duplicate_groups} groups "
            f"of near-duplicates (the same cell turned, flipped, zoomed, re-lit or defocused; verified log-polar "
            f"correlation ≥ {self.min_score}); {n_groups} groups in all — the split keeps each group on one side."
        )
        sizes = self.group_sizes()
        if sizes:
            lines.append("Group sizes: " + ", ".join(f"{n} images ×{k}" for n, k in sizes.items()))
        by_kind = self.problems_by_kind()
        if not by_kind:
            lines.append("Problems: none.")
        for kind, problems in by_kind.items():
            effect = "skipped" if kind in SKIPPED_KINDS else "ignored" if kind in IGNORED_KINDS else "kept"
            lines.append(f"{kind} ({len(problems)}, {effect}):")
            for problem in problems[:_SUMMARY_PATHS]:
                lines.append(f"  {problem.path}: {problem.message}")
            if len(problems) > _SUMMARY_PATHS:
                lines.append(f"  ... and {len(problems) - _SUMMARY_PATHS} more (see the JSON report)")
        return "\n".join(lines)

    def group_sizes(self) -> dict[int, int]:
        """Return {group size: number of groups of that size}, smallest size first."""
        members = Counter(r.group for r in self.records)
        return dict(sorted(Counter(members.values()).items()))

    def boundary_pairs(self, n: int = 6) -> list[dict[str, Any]]:
        """Return the n verified pairs closest to the decision threshold (accepted and rejected alike)."""
        return sorted(self.pairs, key=lambda p: abs(p["score"] - self.min_score))[:n]

    def to_dict(self) -> dict[str, Any]:
        """Return the whole report as JSON-ready data (without the in-memory fingerprints)."""
        data = asdict(replace(self, prints=[]))
        del data["prints"]
        data["requested"] = str(self.requested)
        data["root"] = str(self.root)
        return data

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically); refuse a path inside the dataset root."""
        target = Path(path).expanduser().resolve()
        if target.is_relative_to(self.root.resolve()):
            raise DatasetError(
                f"Refusing to write the report to {target}: it is inside the dataset folder {self.root}, "
                "which the check never modifies. Choose a path outside it."
            )
        return write_json(target, self.to_dict())

    def to_frame(self) -> pd.DataFrame:
        """Return one row per readable image: path, label, group, sha256, width, height (attrs: data_root)."""
        columns = ["path", "label", "group", "sha256", "width", "height"]
        frame = pd.DataFrame([{c: getattr(r, c) for c in columns} for r in self.records], columns=columns)
        frame.attrs["data_root"] = str(self.root)
        return frame


# Entries beside the class folders that the check names and leaves alone: not a problem of the data.
IGNORED_KINDS = ("hidden", "stray_folder", "stray_file")


def find_data_root(path: str | Path) -> Path:
    """Return the folder holding the class folders: `path` itself or a folder up to two levels below it."""
    requested = Path(path).expanduser()
    if not requested.is_dir():
        what = "is a file, not a folder" if requested.exists() else "does not exist"
        raise DatasetError(f"Dataset folder {requested} {what}; give the folder that holds the class folders.")
    best: list[tuple[int, int, Path]] = []  # (-classes found, depth, folder)
    for depth, folder in _folders_below(requested, SEARCH_DEPTH):
        found = {canonical_class(d.name) for d in _subfolders(folder)} - {None}
        if found:
            best.append((-len(found), depth, folder))
    if not best:
        raise DatasetError(
            f"No class folders found in {requested} or up to {SEARCH_DEPTH} levels below it. Looked for folders "
            f"named like {', '.join(CLASSES)} (case-insensitive; plurals and the Kaggle prefixes "
            "BA/ERB/MO/MYO/NGS also count). Point at the folder that holds them."
        )
    best.sort(key=lambda t: (t[0], t[1], str(t[2])))
    top = [b for b in best if b[:2] == best[0][:2]]
    if len(top) > 1:
        listing = "; ".join(str(t[2]) for t in top)
        raise DatasetError(
            f"Several folders below {requested} hold class folders equally well ({listing}); "
            "point at the one you mean."
        )
    return top[0][2]


def check_dataset(path: str | Path, progress: bool = True, cache: Any = None) -> DatasetReport:
    """Read every image under the dataset folder once and report counts, problems, sizes and duplicate groups.

    cache: a cache.StudyCache the same pass fills (each image decoded once per study, at the cache's side); files
    already in it are hashed, not decoded.
    """
    started = time.perf_counter()
    requested = Path(path).expanduser()
    root = find_data_root(requested)
    problems: list[Problem] = []
    ignored: list[str] = []
    class_dirs = _class_folders(root, problems, ignored)
    # A missing folder is known before reading 15,000 images: say so at once.
    _require_all_classes({c: int(c in class_dirs) for c in CLASSES}, class_dirs, root, problems)
    files: list[tuple[str, Path]] = []
    for label, folders in class_dirs.items():
        for folder in folders:
            files.extend((label, f) for f in _files_below(folder, root, problems))
    files.sort(key=lambda t: (CLASSES.index(t[0]), _rel(t[1], root)))

    with cache.filling() if cache is not None else contextlib.nullcontext() as filler:
        scanned = _scan(files, progress, filler)
    records: list[ImageRecord] = []
    prints: list[dedupe.CellPrint] = []
    for (label, file), (result, error) in zip(files, scanned):
        rel = _rel(file, root)
        if error is not None:
            problems.append(Problem(rel, error[0], error[1]))
            continue
        sha, mode, height, width, fingerprint = result
        records.append(ImageRecord(rel, label, sha, width, height, mode))
        prints.append(fingerprint)
        if mode != "RGB":
            problems.append(Problem(rel, "converted", f"stored as Pillow mode {mode}; read as RGB"))

    counts = {c: 0 for c in CLASSES}
    counts.update(Counter(r.label for r in records))
    _require_all_classes(counts, class_dirs, root, problems)

    scored = dedupe.near_duplicate_pairs(prints)
    group_index = dedupe.group_copies([r.sha256 for r in records], prints, scored)
    digits = max(5, len(str(int(group_index.max()))))
    for record, g in zip(records, group_index):
        record.group = f"g{int(g):0{digits}d}"
    problems.extend(_label_conflicts(records))
    problems.extend(_oversized_groups(records, group_index))

    members = Counter(r.group for r in records)
    distinct = defaultdict(set)
    for r in records:
        distinct[r.group].add(r.sha256)
    return DatasetReport(
        requested=requested,
        root=root,
        records=records,
        counts=counts,
        problems=problems,
        ignored=ignored,
        size_stats=_size_stats(records),
        groups_per_class={c: len({r.group for r in records if r.label == c}) for c in CLASSES},
        exact_duplicates=len(records) - len({r.sha256 for r in records}),
        near_duplicate_groups=sum(1 for g, n in members.items() if n > 1 and len(distinct[g]) > 1),
        class_folders={c: [_rel(f, root) for f in class_dirs[c]] for c in CLASSES if c in class_dirs},
        min_score=scored.min_score,
        seconds=time.perf_counter() - started,
        pairs=_reported_pairs(records, scored),
        prints=prints,
    )


def leakage_audit(report: DatasetReport, split: Any) -> dict[str, Any]:
    """Match every test image of a split against its training images with the duplicate verifier.

    Returns {"n_test", "test_images_with_match_in_train", "min_score", "examples": [{test, train, score}]}.
    A copy the grouping missed shows up here; on a group split the count should be 0.
    """
    index = {r.path: i for i, r in enumerate(report.records)}
    test = [p for p in split.loc[split["subset"] == "test", "path"] if p in index]
    train = [p for p in split.loc[split["subset"] == "train", "path"] if p in index]
    best, score = dedupe.best_matches([report.prints[index[p]] for p in test],
                                      [report.prints[index[p]] for p in train])
    matched = np.flatnonzero(score >= report.min_score)
    matched = matched[np.argsort(-score[matched])]
    return {
        "n_test": len(test),
        "test_images_with_match_in_train": int(len(matched)),
        "min_score": float(report.min_score),
        "examples": [{"test": test[i], "train": train[best[i]], "score": round(float(score[i]), 4)}
                     for i in matched[:_SUMMARY_PATHS]],
    }


def dataset_files(root: str | Path) -> set[str]:
    """Return every file check_dataset reads under a data root (class folders, hidden files skipped), relative posix."""
    root = Path(root)
    notes: list[Problem] = []
    folders = _class_folders(root, notes, [])
    return {_rel(f, root) for group in folders.values() for folder in group for f in _files_below(folder, root, notes)}


def _folders_below(folder: Path, depth: int):
    """Yield (depth, folder) for folder and its non-hidden subfolders down to `depth` levels, breadth first."""
    level = [folder]
    for d in range(depth + 1):
        yield from ((d, f) for f in level)
        level = [s for f in level for s in _subfolders(f)]


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not images.is_hidden(p))
    except OSError:
        return []


def _class_folders(root: Path, problems: list[Problem], ignored: list[str]) -> dict[str, list[Path]]:
    """Return class → folders in root, noting hidden entries, stray folders and stray files."""
    found: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(root.iterdir()):
        rel = _rel(entry, root)
        if images.is_hidden(entry):
            problems.append(Problem(rel, "hidden", "hidden or system entry; ignored"))
            continue
        label = canonical_class(entry.name) if entry.is_dir() else None
        if label:
            found[label].append(entry)
        elif entry.is_dir():
            ignored.append(rel)
            problems.append(Problem(rel, "stray_folder", "folder name is not one of the classes; ignored"))
        else:
            ignored.append(rel)
            problems.append(Problem(rel, "stray_file", "file beside the class folders; ignored"))
    for label, folders in found.items():
        if len(folders) > 1:
            names = ", ".join(f.name for f in folders)
            problems.append(Problem(
                _rel(folders[0], root), "merged_folders",
                f"folders {names} all mean {label}; their images are counted together",
            ))
    return {c: found[c] for c in CLASSES if c in found}


def _files_below(folder: Path, root: Path, problems: list[Problem]) -> list[Path]:
    """Return every non-hidden file under a class folder (subfolders included), noting hidden ones."""
    files: list[Path] = []
    for current, dirs, names in os.walk(folder):
        here = Path(current)
        for d in list(dirs):
            if images.is_hidden(Path(d)):
                dirs.remove(d)
                problems.append(Problem(_rel(here / d, root), "hidden", "hidden or system folder; ignored"))
        dirs.sort()
        for name in sorted(names):
            file = here / name
            if images.is_hidden(file):
                problems.append(Problem(_rel(file, root), "hidden", "hidden or system file; ignored"))
            else:
                files.append(file)
    return files


def _scan(files: list[tuple[str, Path]], progress: bool, filler: Any = None) -> list[tuple[Any, Any]]:
    """Read every file once (in WORKERS threads), in order; each item is (result, None) or (None, (kind, message))."""
    bar = tqdm(
        total=len(files), desc="Checking images", unit="img", file=sys.stderr,
        disable=not progress or len(files) <= PROGRESS_MIN_FILES,
    )
    out = []
    with ThreadPoolExecutor(max_workers=WORKERS) as pool, bar:
        for item in pool.map(lambda t: _read_one(t[1], filler), files):
            out.append(item)
            bar.update(1)
    return out


def _read_one(file: Path, filler: Any = None) -> tuple[Any, Any]:
    """Return ((sha256, mode, height, width, cell print), None) or (None, (kind, message)) for one file.

    filler: a StudyCache's filler: a file it holds is not decoded; one it lacks is added to it.
    """
    try:
        data = file.read_bytes()
    except OSError as exc:
        return None, ("corrupt", f"cannot be read ({exc.strerror or exc})")
    if not data:
        return None, ("empty", "the file is empty (0 bytes); delete or replace it")
    sha = hashlib.sha256(data).hexdigest()
    cached = filler.lookup(sha) if filler is not None else None
    if cached is not None:
        return (sha, _original_mode(data), *cached[0], cached[1]), None
    try:
        # The fingerprint needs WORK_SIDE px; twice that keeps the resize an average of several pixels.
        # With a cache, at its side when that is larger: the one decode serves both.
        side = max(2 * dedupe.WORK_SIDE, filler.cache.side if filler is not None else 0)
        rgb, size = images.read_rgb_sized(file, min_side=side)
    except ImageTooLargeError as exc:
        return None, ("too_large", _strip_path(str(exc), file))
    except ImageDecodeError as exc:
        kind = "not_image" if isinstance(exc.__cause__, UnidentifiedImageError) else "corrupt"
        return None, (kind, _strip_path(str(exc), file))
    except Exception as exc:  # noqa: BLE001 — one odd file must not stop a 15,000-file scan
        return None, ("corrupt", f"unexpected error while decoding ({type(exc).__name__}: {exc})")
    fingerprint = dedupe.cell_print(rgb)
    if filler is not None:
        filler.add(sha, rgb, size, fingerprint)
    return (sha, _original_mode(data), *size, fingerprint), None


def _original_mode(data: bytes) -> str:
    """Return the Pillow mode the file is stored in (header only; read_rgb has already vetted the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.mode
    except Exception:  # noqa: BLE001 — the mode is informative only
        return "unknown"


def _strip_path(message: str, file: Path) -> str:
    """Drop the leading absolute path from an images.py message; the report already names the file."""
    prefix = f"{file}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _require_all_classes(
    counts: dict[str, int], class_dirs: dict[str, list[Path]], root: Path, problems: list[Problem]
) -> None:
    """Raise MissingClassError naming each class that has no folder or no readable image."""
    missing = []
    for label, n in counts.items():
        if n:
            continue
        if label not in class_dirs:
            missing.append(f"no folder for class '{label}' in {root}")
        else:
            folders = ", ".join(str(f) for f in class_dirs[label])
            skipped = [p for p in problems if p.path.startswith(tuple(_rel(f, root) + "/" for f in class_dirs[label]))
                       and p.kind in SKIPPED_KINDS]
            missing.append(f"class '{label}' folder {folders} holds no readable image"
                           + (f" ({len(skipped)} unreadable files)" if skipped else " (it is empty)"))
    if missing:
        raise MissingClassError(
            "; ".join(missing) + f". Every one of {', '.join(CLASSES)} needs at least one readable image: "
            "add the missing folder (or fix its files) or point at the right dataset folder."
        )


def _oversized_groups(records: list[ImageRecord], group_index: np.ndarray) -> list[Problem]:
    """Return one large_group problem per group far larger than the rest: perhaps distinct cells chained."""
    problems = []
    for g, size in dedupe.oversized_groups(group_index):
        members = [r for r, k in zip(records, group_index) if k == g]
        problems.append(Problem(
            members[0].path, "large_group",
            f"group {members[0].group} holds {size} images ({', '.join(m.path for m in members[:4])}, ...); "
            "look at a few: if they are not copies of one cell, report it (the split keeps them together)",
        ))
    return problems


def _reported_pairs(records: list[ImageRecord], scored: dedupe.PairScores) -> list[dict[str, Any]]:
    """Return the accepted pairs and the rejected ones near the threshold as small dicts for the report."""
    keep = np.flatnonzero(scored.scores >= min(dedupe.REPORT_FLOOR, scored.min_score))
    return [{"a": records[scored.pairs[k, 0]].path, "b": records[scored.pairs[k, 1]].path,
             "score": round(float(scored.scores[k]), 4), "accepted": bool(scored.scores[k] >= scored.min_score)}
            for k in keep]


def _label_conflicts(records: list[ImageRecord]) -> list[Problem]:
    """Return one label_conflict problem per duplicate group whose images carry different classes."""
    by_group: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_group[r.group].append(r)
    conflicts = []
    for group, members in by_group.items():
        labels = sorted({m.label for m in members}, key=CLASSES.index)
        if len(labels) > 1:
            listing = ", ".join(f"{m.path} ({m.label})" for m in members[:6])
            more = f" and {len(members) - 6} more" if len(members) > 6 else ""
            conflicts.append(Problem(
                members[0].path, "label_conflict",
                f"group {group} holds copies of one image under {len(labels)} classes "
                f"({', '.join(labels)}): {listing}{more}; at most one label can be right",
            ))
    return conflicts


def _size_stats(records: list[ImageRecord]) -> dict[str, Any]:
    """Return min/median/max of width and height and the count of each distinct WxH size (commonest first)."""
    if not records:
        return {}
    widths = np.array([r.width for r in records])
    heights = np.array([r.height for r in records])
    sizes = Counter(f"{r.width}x{r.height}" for r in records)

    def stats(v: np.ndarray) -> dict[str, float]:
        return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}

    return {"width": stats(widths), "height": stats(heights), "sizes": dict(sizes.most_common())}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
