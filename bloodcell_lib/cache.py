"""The study's image cache: every image decoded once per study, at reduced scale, kept as uint8 on disk.

The data check decodes each file once (a JPEG at the smallest DCT scale still ≥ the side the study needs) and
stores, per SHA-256 of the file's bytes, the image resized to side×side uint8, its full-resolution size and its
duplicate fingerprint; beside it, the same picture at every smaller input size the study's networks take
(study_sizes: 224 and 299 next to 300 for "native"). Every model's pipeline, the evaluation and Grad-CAM then
copy rows of memory-mapped arrays at their own input size, or resize the side×side row when that size is not
stored (the same fit_square as the fill: the same bytes either way); a later check reads the fingerprints
instead of decoding. A file whose bytes change gets a new key, so only changed files are decoded again.

Layout: OUTPUT/.image_cache/<side>px/index.json ({sha: [shard, row, height, width]}) and per shard
`<shard>.npy` (N×side×side×3 uint8, memory-mapped), `<shard>.<size>px.npy` per smaller stored size and
`<shard>.prints.npz` (the fingerprints). Shards are written whole and atomically, then the index; a run killed
mid-fill loses at most its unwritten shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import cv2
import numpy as np

from bloodcell_lib import dedupe, images
from bloodcell_lib.atomic import atomic_path, write_json
from bloodcell_lib.registry import ARCHITECTURES

# The cache's folder inside a study's output folder.
CACHE_FOLDER = ".image_cache"
# Entries written per shard: 512 × (300² + 299² + 224²) × 3 bytes = 353 MB held in memory before it goes to disk.
SHARD_ROWS = 512
# The duplicate fingerprint wants twice its working side (dataset.py reads at the same scale).
FINGERPRINT_MIN_SIDE = 2 * dedupe.WORK_SIDE
# Decoding threads: Pillow and OpenCV release the GIL, so two keep both cores of a small machine busy.
WORKERS = 2
_VERSION = 1

logger = logging.getLogger(__name__)


def study_sizes(image_size: int | str | None = "native") -> tuple[int, ...]:
    """The input sides the registry's networks take under one image-size setting, smallest first.

    "native" → each network's native size (224, 299, 300); a number → it, raised to each network's minimum.
    """
    specs = ARCHITECTURES.values()
    if image_size is None or image_size == "native":
        return tuple(sorted({s.native_size for s in specs}))
    return tuple(sorted({max(int(image_size), s.min_size) for s in specs}))


def study_side(image_size: int | str | None = "native") -> int:
    """The largest input side any registry network takes under one image-size setting: the side to cache at."""
    return max(study_sizes(image_size))


def fit_square(rgb: np.ndarray, side: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resize an RGB uint8 image to side×side (area averaging when shrinking, bilinear when enlarging).

    out: a C-contiguous side×side×3 uint8 array to write into (e.g. a row of a batch), returned.
    """
    if rgb.shape[0] == side and rgb.shape[1] == side:
        if out is None:
            return np.ascontiguousarray(rgb)
        out[...] = rgb
        return out
    shrink = rgb.shape[0] >= side and rgb.shape[1] >= side
    return cv2.resize(np.ascontiguousarray(rgb), (side, side), dst=out,
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class Entry(NamedTuple):
    """One file as the cache stores it: its picture at every stored side, full-resolution size and fingerprint."""

    pictures: dict[int, np.ndarray]
    size: tuple[int, int]
    fingerprint: dedupe.CellPrint


class StudyCache:
    """uint8 images of one study at one side, keyed by the SHA-256 of each file's bytes (see the module docstring)."""

    def __init__(self, folder: str | Path, side: int, sizes: Sequence[int] = ()):
        """sizes: smaller sides to store beside `side` for the entries this instance adds (reading finds whatever
        sizes a shard holds)."""
        self.root = Path(folder).expanduser()
        self.side = int(side)
        self.sizes = tuple(sorted({int(s) for s in sizes if 0 < int(s) < self.side}))
        self.folder = self.root / f"{self.side}px"
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, int, int, int]] = self._read_index()
        self._maps: dict[tuple[str, int], np.ndarray | None] = {}
        self._prints: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def in_output(cls, output_dir: str | Path, image_size: int | str | None = "native") -> StudyCache:
        """The cache of a study's output folder, at the side its image-size setting needs (study_side), storing
        every network's input size of that setting (study_sizes)."""
        return cls(Path(output_dir) / CACHE_FOLDER, study_side(image_size), study_sizes(image_size))

    @classmethod
    def find(cls, root: str | Path, min_side: int) -> StudyCache | None:
        """The existing cache under root (a CACHE_FOLDER) with the smallest side ≥ min_side, or None."""
        sides = []
        with contextlib.suppress(OSError):
            for sub in Path(root).iterdir():
                if sub.name.endswith("px") and sub.name[:-2].isdigit() and (sub / "index.json").is_file():
                    sides.append(int(sub.name[:-2]))
        fitting = sorted(s for s in sides if s >= min_side)
        return cls(root, fitting[0]) if fitting else None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sha: str) -> bool:
        return sha in self._entries

    # --- reading -------------------------------------------------------------------------------------

    def images(self, shas: Sequence[str], side: int | None = None) -> np.ndarray:
        """Return the cached images of these keys in order as N×S×S×3 uint8, S = side (≤ the cache's) or the
        cache's own; KeyError for a missing key. A size the shard stores is copied, any other resized from the
        side×side row by fit_square (which is how the fill made the stored ones: the same bytes either way)."""
        side = self.side if side is None else int(side)
        out = np.empty((len(shas), side, side, 3), np.uint8)
        for i, sha in enumerate(shas):
            shard, row, _, _ = self._entries[sha]
            stored = self._shard(shard, side)
            if stored is not None:
                out[i] = stored[row]
            else:
                fit_square(self._shard(shard, self.side)[row], side, out=out[i])
        return out

    def lookup(self, sha: str) -> tuple[tuple[int, int], dedupe.CellPrint] | None:
        """Return ((height, width) at full resolution, fingerprint) of a cached file, or None."""
        entry = self._entries.get(sha)
        if entry is None:
            return None
        shard, row, height, width = entry
        polar, profile = self._shard_prints(shard)
        return (height, width), dedupe.CellPrint(polar[row], profile[row])

    # --- filling -------------------------------------------------------------------------------------

    def ensure(self, files: Sequence[str | Path]) -> list[str]:
        """Return the files' keys (SHA-256 of their bytes), first decoding (at reduced scale) and adding every
        file the cache lacks. A file that cannot be read raises ImageDecodeError, as the pipeline would.

        Each file is read once (hashed and, when new, decoded from the same bytes) on WORKERS threads; a content
        is decoded once however many files hold it, and entries are added in file order, so the cache's
        contents do not depend on the threads.
        """
        known = set(self._entries)  # contents cached before this fill
        claimed: set[str] = set()

        def read(file: Path) -> tuple[str, Entry | None]:
            data = file.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            with self._lock:  # the first thread to meet a new content decodes it, whichever file it read
                new = sha not in known and sha not in claimed
                claimed.add(sha)
            return sha, (self.entry(*self.decode(file, data)) if new else None)

        shas: list[str] = []
        added = 0
        seen: set[str] = set()
        first_seen: deque[str] = deque()  # new contents in the order of the first file holding each
        ready: dict[str, Entry] = {}  # decoded entries not yet added (decoded by a later file's thread)
        with ThreadPoolExecutor(max_workers=WORKERS) as pool, self.filling() as filler:
            for sha, entry in pool.map(read, [Path(f) for f in files]):
                if sha not in known and sha not in seen:
                    first_seen.append(sha)
                seen.add(sha)
                shas.append(sha)
                if entry is not None:
                    ready[sha] = entry
                # Added in the order of the files, not of the threads: the cache does not depend on scheduling.
                while first_seen and first_seen[0] in ready:
                    head = first_seen.popleft()
                    filler.put(head, ready.pop(head))
                    added += 1
        if added:
            logger.info("Added %d images to the study cache %s.", added, self.folder)
        return shas

    def decode(self, file: str | Path, data: bytes | None = None
               ) -> tuple[np.ndarray, tuple[int, int], dedupe.CellPrint]:
        """Decode one file once for the cache: (RGB at reduced scale, full (height, width), its fingerprint).

        data: the file's bytes when they have been read already (then the file is not read again).
        """
        rgb, size = images.read_rgb_sized(file, min_side=max(self.side, FINGERPRINT_MIN_SIDE), data=data)
        return rgb, size, dedupe.cell_print(rgb)

    def entry(self, rgb: np.ndarray, size: tuple[int, int], fingerprint: dedupe.CellPrint) -> Entry:
        """Return what the cache stores of one decoded file: rgb (any size) fitted to the side, then to each
        smaller stored size from that picture (as images() would resize it)."""
        picture = fit_square(rgb, self.side)
        return Entry({self.side: picture, **{s: fit_square(picture, s) for s in self.sizes}}, size, fingerprint)

    @contextlib.contextmanager
    def filling(self) -> Iterator[_Filler]:
        """Yield a thread-safe adder of entries; shards are written every SHARD_ROWS entries and on exit."""
        filler = _Filler(self)
        try:
            yield filler
        finally:
            filler.flush()

    # --- internals -----------------------------------------------------------------------------------

    def _write_shard(self, shas: list[str], entries: list[Entry]) -> None:
        name = f"shard-{secrets.token_hex(6)}"
        # The smaller sizes first: a shard is only read once its main array and prints exist.
        for side in (*self.sizes, self.side):
            with atomic_path(self._shard_path(name, side)) as tmp:
                np.save(tmp, np.stack([e.pictures[side] for e in entries]))
        with atomic_path(self.folder / f"{name}.prints.npz") as tmp:
            np.savez(tmp, polar=np.stack([e.fingerprint.polar for e in entries]),
                     profile=np.stack([e.fingerprint.profile for e in entries]))
        with self._lock:
            # Another process may have added entries since we read the index: keep theirs too.
            self._entries = {**self._read_index(), **self._entries}
            self._entries.update({sha: (name, row, int(e.size[0]), int(e.size[1])) for row, (sha, e) in
                                  enumerate(zip(shas, entries))})
            write_json(self.folder / "index.json", {"version": _VERSION, "side": self.side,
                                                   "entries": {k: list(v) for k, v in self._entries.items()}})

    def _read_index(self) -> dict[str, tuple[str, int, int, int]]:
        try:
            data = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _VERSION or data.get("side") != self.side:
            return {}
        entries = data.get("entries") or {}
        present = {s for s in {v[0] for v in entries.values()} if (self.folder / f"{s}.npy").is_file()
                   and (self.folder / f"{s}.prints.npz").is_file()}
        return {sha: (v[0], int(v[1]), int(v[2]), int(v[3])) for sha, v in entries.items() if v[0] in present}

    def _shard_path(self, name: str, side: int) -> Path:
        return self.folder / (f"{name}.npy" if side == self.side else f"{name}.{side}px.npy")

    def _shard(self, name: str, side: int) -> np.ndarray | None:
        """The shard's memory-mapped N×side×side×3 array, or None when it does not store that side."""
        key = (name, side)
        if key not in self._maps:
            path = self._shard_path(name, side)
            self._maps[key] = np.load(path, mmap_mode="r") if side == self.side or path.is_file() else None
        return self._maps[key]

    def _shard_prints(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._prints:
            with np.load(self.folder / f"{name}.prints.npz") as data:
                self._prints[name] = (data["polar"], data["profile"])
        return self._prints[name]


class _Filler:
    """Collects decoded entries (from several threads) and writes them to the cache in shards."""

    def __init__(self, cache: StudyCache):
        self.cache = cache
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Entry]] = []
        self._seen: set[str] = set()

    def lookup(self, sha: str) -> tuple[tuple[int, int], dedupe.CellPrint] | None:
        return self.cache.lookup(sha)

    def add(self, sha: str, rgb: np.ndarray, size: tuple[int, int], fingerprint: dedupe.CellPrint) -> None:
        """Add one decoded file (rgb at any size: resized here to the cache's sides)."""
        if sha in self.cache:
            return
        self.put(sha, self.cache.entry(rgb, size, fingerprint))

    def put(self, sha: str, entry: Entry) -> None:
        """Add one entry made by StudyCache.entry."""
        with self._lock:
            if sha in self._seen or sha in self.cache:  # exact copies share one entry
                return
            self._seen.add(sha)
            self._pending.append((sha, entry))
            full = len(self._pending) >= SHARD_ROWS
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self.cache._write_shard([sha for sha, _ in batch], [entry for _, entry in batch])
