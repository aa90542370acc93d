"""tf.data input pipeline: split rows → decoded, resized uint8 images (cached once) → shuffle → batch →
augment (training only) → the architecture's preprocess_input (always last) → prefetch.

What is cached is uint8 S×S×3, a quarter of float32: the whole set is never held as float32 in memory.
With a study cache (cache.StudyCache: the data check's one decode of every file, uint8 on disk), images are
read from its memory-mapped rows and resized to S; files it lacks are added to it first. By default the
pipeline uses the study cache in the folder of the split file (OUTPUT/.image_cache) when there is one.
Decoding: TensorFlow's decoders where they give the same pixels as Pillow (checked per file from its
header); everything else (TIFF, WebP, CMYK or EXIF-rotated JPEG, 16-bit or transparent PNG, palette BMP)
goes through images.read_rgb, so the pipeline sees what check-data, predict and Grad-CAM see.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from bloodcell_lib.cache import CACHE_FOLDER, StudyCache
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ConfigError, DatasetError, ImageDecodeError
from bloodcell_lib.images import MAX_PIXELS, read_rgb
from bloodcell_lib.split import load_split

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

# How each file is decoded (an int per file, so one switch_case inside the graph decides).
ROUTE_JPEG, ROUTE_TF, ROUTE_PILLOW = 0, 1, 2
# Pillow modes whose TensorFlow decoding matched Pillow's pixel for pixel (TF 2.21; RGB JPEG/PNG and the
# Pillow-only cases are re-checked in tests/test_pipeline.py). JPEG: decode_jpeg needs INTEGER_ACCURATE (Pillow's
# IDCT); the default fast IDCT differs by up to 4 levels. CMYK JPEG goes to Pillow: TensorFlow decodes one
# without the Adobe marker as black. Palette BMPs come out with wrong colours from TensorFlow.
_TF_MODES = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L", "P", "1"), "GIF": ("P", "L"), "BMP": ("RGB", "L")}
_EXIF_ORIENTATION = 0x0112

# A shuffle buffer after a memory cache shares the cached tensors; after a file cache (or none) it holds
# its own copies, so it is capped at this many bytes of uint8 images.
_SHUFFLE_BUFFER_BYTES = 1 << 30
# Bump when the decoded pixels change, so stale file caches are not reused.
_CACHE_VERSION = "1"

# image_cache's default: the study cache beside the split file, when the study made one.
AUTO = "auto"
# Cached images read and resized per call (one numpy_function and one resize per this many images).
_GATHER = 32

# Training augmentation strength by default (RunConfig's augment_brightness and augment_contrast): brightness shift
# (fraction of 255) and contrast factor range.
BRIGHTNESS_DELTA = RunConfig.augment_brightness
CONTRAST_RANGE = (1.0 - RunConfig.augment_contrast, 1.0 + RunConfig.augment_contrast)


def make_dataset(
    split: pd.DataFrame | str | Path,
    subset: str,
    image_size: int,
    preprocess: Callable[[Any], Any] | None,
    batch_size: int = 32,
    augment: bool | None = None,
    shuffle: bool | None = None,
    cache: str | Path | None = "memory",
    seed: int = 0,
    brightness: float = BRIGHTNESS_DELTA,
    contrast_range: tuple[float, float] = CONTRAST_RANGE,
    data_root: str | Path | None = None,
    image_cache: StudyCache | str | None = AUTO,
) -> tf.data.Dataset:
    """Return a tf.data.Dataset of (float32 [B,S,S,3] after `preprocess`, int32 [B] CLASSES indices).

    augment/shuffle None → on for "train" only. cache: what holds the resized uint8 images after epoch 1:
    "memory", "none", or a folder for tf.data's file cache (one file set per subset, size and file list).
    image_cache: where the images come from: a StudyCache, "auto" (the one beside the split file, if any), or
    None (decode the files). With shuffle off, batches follow the split's row order for the subset.
    preprocess gets float32 RGB in [0, 255] and is applied last. brightness, contrast_range: the augmentation's
    strength (augment_params).
    """
    rows, root = _subset_rows(split, subset, data_root)
    size = _check_size(image_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    shuffle = subset == "train" if shuffle is None else bool(shuffle)
    augment = subset == "train" if augment is None else bool(augment)
    labels = rows["label"].map(CLASSES.index).to_numpy(dtype=np.int32)
    study_cache = _study_cache(image_cache, rows, size)
    if study_cache is not None:
        files = [(f, ROUTE_PILLOW) for f in _existing_files(rows, root)]
        ds = cached_dataset(study_cache, [f for f, _ in files], labels, size)
    else:
        files = _resolve_files(rows, root)
        ds = decoded_dataset(files, labels, size)
    source = f"study cache {study_cache.side}px" if study_cache is not None else "files"
    cache_kind, ds = _cache(ds, cache, subset, size, files, labels, source)
    if shuffle:
        ds = ds.shuffle(_shuffle_buffer(len(files), size, cache_kind), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    finish = _finish_fn(preprocess, augment, batch_size)
    if augment:
        # One fresh random stream per epoch, reproducible from `seed`.
        noise = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, noise).map(
            lambda batch, r: (finish(batch[0], augment_params(tf.shape(batch[0])[0],
                                                              tf.stack([tf.constant(seed, tf.int64), r]),
                                                              brightness, contrast_range)), batch[1]),
            num_parallel_calls=AUTOTUNE, deterministic=True,
        )
    else:
        ds = ds.map(lambda images, labels: (finish(images, None), labels),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)


def load_images(
    split: pd.DataFrame | str | Path,
    subset: str,
    image_size: int,
    data_root: str | Path | None = None,
    limit: int | None = None,
    image_cache: StudyCache | str | None = AUTO,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (uint8 N×S×S×3, int labels, relative paths) of a subset in split order, decoded like make_dataset.

    limit: at most this many images, taken round-robin over the classes (in split order) so each class shows.
    image_cache: as for make_dataset.
    """
    rows, root = _subset_rows(split, subset, data_root)
    size = _check_size(image_size)
    if limit is not None:
        rows = rows.iloc[_round_robin(rows["label"].to_numpy(), max(0, int(limit)))]
    labels = rows["label"].map(CLASSES.index).to_numpy(dtype=np.int64)
    paths = rows["path"].astype(str).tolist()
    if rows.empty:
        return np.zeros((0, size, size, 3), np.uint8), labels, paths
    study_cache = _study_cache(image_cache, rows, size)
    if study_cache is not None:
        ds = cached_dataset(study_cache, _existing_files(rows, root), labels.astype(np.int32), size).batch(64)
    else:
        ds = decoded_dataset(_resolve_files(rows, root), labels.astype(np.int32), size).batch(64)
    images = np.concatenate([x.numpy() for x, _ in ds], axis=0)
    return images, labels, paths


def augment_image(image: np.ndarray, seed: tuple[int, int] = (0, 0), brightness: float = BRIGHTNESS_DELTA,
                  contrast_range: tuple[float, float] = CONTRAST_RANGE) -> np.ndarray:
    """Return one uint8 image through the training augmentation (for showing it; training skips the rounding)."""
    out = augment_batch(tf.convert_to_tensor(np.asarray(image)[None]), tf.constant(seed, tf.int64), brightness,
                        contrast_range)[0]
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, brightness: float = BRIGHTNESS_DELTA,
                  contrast_range: tuple[float, float] = CONTRAST_RANGE) -> tf.Tensor:
    """Randomly rotate by 90° steps and mirror (all 8 orientations), shift brightness and contrast per image.

    Works on a batch of square images (uint8 or float in [0, 255]); returns float32 clipped to [0, 255].
    A cell has no up, down, left or right on a slide, so every orientation is a valid sample.
    """
    return apply_augmentation(images, *augment_params(tf.shape(images)[0], seed, brightness, contrast_range))


def augment_params(n: tf.Tensor, seed: tf.Tensor, brightness: float = BRIGHTNESS_DELTA,
                   contrast_range: tuple[float, float] = CONTRAST_RANGE
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Draw (quarter turns, mirror, brightness delta, contrast factor) for n images from a stateless seed.

    brightness: the largest shift, a fraction of 255; contrast_range: (lowest, highest) contrast factor.

    Drawn outside XLA on purpose: XLA's stateless generators give other numbers for the same seed.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
    turns = tf.random.stateless_uniform([n], seeds[0], 0, 4, dtype=tf.int32)
    mirror = tf.random.stateless_uniform([n], seeds[1]) < 0.5
    delta = tf.random.stateless_uniform([n, 1, 1, 1], seeds[2], -brightness, brightness) * 255.0
    factor = tf.random.stateless_uniform([n, 1, 1, 1], seeds[3], *contrast_range)
    return turns, mirror, delta, factor


def apply_augmentation(images: tf.Tensor, turns: tf.Tensor, mirror: tf.Tensor, delta: tf.Tensor,
                       factor: tf.Tensor) -> tf.Tensor:
    """Apply drawn augmentation parameters to a batch; returns float32 clipped to [0, 255]."""

    def orient(args: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tf.Tensor:
        image, k, flip = args
        image = tf.image.rot90(image, k)
        return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)

    # Per image (map_fn) on the batch's own dtype: several times faster than batch-wide tf.where selects.
    x = tf.map_fn(orient, (images, turns, mirror), fn_output_signature=images.dtype)
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    # Contrast about each channel's mean (like tf.image.adjust_contrast), then brightness, then clip.
    return tf.clip_by_value(x * factor + (mean * (1.0 - factor) + delta), 0.0, 255.0)


def decoded_dataset(files: Sequence[tuple[str, int]], labels: np.ndarray, image_size: int) -> tf.data.Dataset:
    """Return a dataset of (uint8 [S,S,3], int32 label) in the order of `files` ((path, route) pairs)."""
    paths = tf.constant([f for f, _ in files], tf.string)
    routes = tf.constant([r for _, r in files], tf.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, routes, tf.constant(labels, tf.int32)))
    return ds.map(
        lambda path, route, label: (decode_and_resize(path, route, image_size), label),
        num_parallel_calls=AUTOTUNE, deterministic=True,
    )


def cached_dataset(cache: StudyCache, files: Sequence[str], labels: np.ndarray, image_size: int) -> tf.data.Dataset:
    """Return a dataset of (uint8 [S,S,3], int32 label) read from a study cache, in the order of `files`.

    Files the cache lacks are decoded into it first (at reduced scale); after that no file is decoded.
    """
    shas = cache.ensure(files)

    def gather(index: np.ndarray) -> np.ndarray:
        # A copy of stored rows when the cache holds this size (a study cache holds every network's); otherwise
        # OpenCV's area resize (cache.fit_square, as the fill used), not resize_uint8: 2× faster on 300 → 224 and
        # without the GIL.
        return cache.images([shas[i] for i in index], side=image_size)

    def load(index: tf.Tensor) -> tf.Tensor:
        images = tf.numpy_function(gather, [index], tf.uint8, stateful=False)
        return tf.ensure_shape(images, [None, image_size, image_size, 3])

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(files), dtype=np.int64), tf.constant(labels, tf.int32)))
    return ds.batch(_GATHER).map(lambda index, label: (load(index), label), num_parallel_calls=AUTOTUNE,
                                 deterministic=True).unbatch()


def decode_and_resize(path: tf.Tensor, route: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode one file to RGB and resize it to S×S with resize_uint8 (predict uses the same)."""

    def tf_jpeg() -> tf.Tensor:
        return tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE")

    def tf_other() -> tf.Tensor:
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)

    def pillow() -> tf.Tensor:
        return tf.numpy_function(_read_rgb_bytes, [path], tf.uint8, stateful=False)

    image = tf.switch_case(route, [tf_jpeg, tf_other, pillow])
    return resize_uint8(tf.ensure_shape(image, [None, None, 3]), image_size)


def resize_uint8(image: tf.Tensor | np.ndarray, image_size: int) -> tf.Tensor:
    """Resize an RGB image to S×S (bilinear, antialiased) and round back to uint8: the one resize we use."""
    resized = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def decode_route(path: str | Path) -> int:
    """Return ROUTE_JPEG, ROUTE_TF or ROUTE_PILLOW for a file, from its header (no pixels decoded)."""
    try:
        with Image.open(path) as img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
            transparent = "transparency" in img.info
            # Only read EXIF already in the header: for PNG, getexif() without it would decode the image.
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in img.info else 1
    except Exception:  # noqa: BLE001 - read_rgb turns any failure into a clear ImageDecodeError
        read_rgb(path)
        return ROUTE_PILLOW
    if width * height > MAX_PIXELS or transparent or orientation not in (0, 1) or mode not in _TF_MODES.get(fmt, ()):
        return ROUTE_PILLOW
    return ROUTE_JPEG if fmt == "JPEG" else ROUTE_TF


# ---------------------------------------------------------------------------------------------------------
# Internals


def _read_rgb_bytes(path: bytes) -> np.ndarray:
    return np.ascontiguousarray(read_rgb(path.decode("utf-8")), dtype=np.uint8)


def _subset_rows(split: pd.DataFrame | str | Path, subset: str,
                 data_root: str | Path | None) -> tuple[pd.DataFrame, Path]:
    """Return the split's rows of one subset (in split order) and the data root they are relative to."""
    if not isinstance(split, pd.DataFrame):
        split = load_split(split, data_root=data_root)
    if subset not in ("train", "val", "test"):
        raise ConfigError(f"subset must be 'train', 'val' or 'test', got {subset!r}.")
    missing = {"path", "label", "subset"} - set(split.columns)
    if missing:
        raise DatasetError(f"The split lacks column(s) {', '.join(sorted(missing))}; load it with split.load_split.")
    root = data_root if data_root is not None else split.attrs.get("data_root")
    if not root:
        raise DatasetError("The split does not say which folder its paths are relative to (no attrs['data_root']); "
                           "pass data_root= (--data-dir) with the dataset folder.")
    rows = split[split["subset"] == subset]
    if rows.empty:
        sizes = split["subset"].value_counts().to_dict()
        raise DatasetError(f"The split's {subset!r} subset is empty (subset sizes: {sizes}); re-make the split "
                           "with `python -m bloodcell_lib split` on a larger dataset or with other fractions.")
    bad = sorted(set(rows["label"]) - set(CLASSES))
    if bad:
        raise DatasetError(f"The split's {subset!r} subset holds unknown label(s) {bad}; "
                           f"expected {', '.join(CLASSES)}.")
    return rows, Path(root).expanduser()


def _study_cache(image_cache: StudyCache | str | None, rows: pd.DataFrame, size: int) -> StudyCache | None:
    """The study cache to read from: the one given, or ("auto") the one beside the split file or in the study's
    folder two levels up (a cross-validation fold's or learning-curve point's split lives in <study>/cv/<fold>/);
    None when there is none or its side is smaller than the size asked for (then the files are decoded)."""
    if isinstance(image_cache, str) and image_cache == AUTO:
        split_path = rows.attrs.get("split_path")
        if not split_path:
            return None
        folder = Path(split_path).parent
        return next((c for c in (StudyCache.find(f / CACHE_FOLDER, size) for f in (folder, folder.parent.parent))
                     if c is not None), None)
    if image_cache is not None and image_cache.side < size:
        logger.info("The study cache holds %d-px images, fewer than the %d px asked for; decoding the files.",
                    image_cache.side, size)
        return None
    return image_cache


def _existing_files(rows: pd.DataFrame, root: Path) -> list[str]:
    """Return the absolute path of every row; DatasetError naming missing files."""
    full = [root / p for p in rows["path"].astype(str)]
    missing = [str(p) for p, f in zip(rows["path"], full) if not f.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(
            f"{len(missing)} of {len(full)} files of the split are missing under {root}: {shown}. "
            "If the dataset moved, pass its folder with --data-dir (data_root=); if files were removed, run "
            "`python -m bloodcell_lib check-data` and re-make the split with `python -m bloodcell_lib split`."
        )
    return [str(f) for f in full]


def _resolve_files(rows: pd.DataFrame, root: Path) -> list[tuple[str, int]]:
    """Return (absolute path, decode route) per row; DatasetError naming missing files."""
    full = _existing_files(rows, root)
    try:
        return [(f, decode_route(f)) for f in full]
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{exc} Run `python -m bloodcell_lib check-data` and re-make the split.") from exc


def _check_size(image_size: Any) -> int:
    try:
        size = int(image_size)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or size != image_size:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size!r} "
                          "(resolve 'native' through the registry first).")
    return size


def _cache(ds: tf.data.Dataset, cache: str | Path | None, subset: str, size: int,
           files: list[tuple[str, int]], labels: np.ndarray, source: str = "files") -> tuple[str, tf.data.Dataset]:
    """Cache the decoded uint8 stage: in memory, in files under a folder, or not at all."""
    if cache is None or (isinstance(cache, str) and cache.casefold() == "none"):
        return "none", ds
    if isinstance(cache, str) and cache.casefold() == "memory":
        return "memory", ds.cache()
    folder = Path(cache).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    # tf.data silently reuses whatever cache sits at a path, so the name pins down what it holds.
    lines = [_CACHE_VERSION, str(size), source] + [f"{f}\t{y}" for (f, _), y in zip(files, labels)]
    key = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]
    prefix = folder / f"{subset}-{size}px-{key}"
    _remove_stale_lock(prefix)
    return "file", ds.cache(str(prefix))


def _remove_stale_lock(prefix: Path) -> None:
    """Delete what an interrupted cache write left behind (its lockfile makes every later run fail).

    A run killed mid-epoch (Colab disconnect, kernel restart) leaves `<prefix>_0.lockfile`; tf.data then
    refuses the cache until it is deleted. Two processes must therefore not share one cache folder at once.
    """
    if Path(f"{prefix}.index").exists():
        return
    leftovers = [*prefix.parent.glob(f"{prefix.name}_*.lockfile"), *prefix.parent.glob(f"{prefix.name}_*.tempstate*")]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    if leftovers:
        logger.warning("Removed an unfinished tf.data cache at %s (an earlier run stopped mid-epoch).", prefix)


def _shuffle_buffer(n: int, size: int, cache_kind: str) -> int:
    if cache_kind == "memory":
        return n
    return max(1, min(n, _SHUFFLE_BUFFER_BYTES // (size * size * 3)))


def _finish_fn(preprocess: Callable[[Any], Any] | None, augment: bool, batch_size: int):
    """Return (uint8 batch, augmentation parameters or None) -> float32 batch, XLA-compiled when it can be.

    After the cache, all per-batch work is per-pixel arithmetic. TensorFlow runs it op by op, one pass over
    the batch each; XLA fuses it into a few passes, 3-7× faster on 2 CPU cores (BENCHMARKS.md, a).
    Falls back to the plain graph when `preprocess` cannot be compiled (e.g. it calls numpy).

    XLA compiles once per batch shape, about 0.4 s of CPU with augmentation: a short last batch is padded to
    batch_size (and cut back after), so a pipeline compiles once. The padding rows cannot change the others:
    augmentation works per image and every registry preprocess per pixel.
    """

    def finish(images: tf.Tensor, params: tuple | None) -> tf.Tensor:
        x = apply_augmentation(images, *params) if augment else tf.cast(images, tf.float32)
        if preprocess is not None:
            x = tf.cast(preprocess(x), tf.float32)
        return x

    compiled = tf.function(finish, jit_compile=True, autograph=False)
    probe = tf.zeros([1, 8, 8, 3], tf.uint8)
    try:
        # Lowering to HLO finds what XLA refuses without compiling machine code for a shape nobody feeds.
        compiled.experimental_get_compiler_ir(probe, augment_params(1, tf.constant([0, 0], tf.int64)) if augment
                                              else None)(stage="hlo")
    except Exception:  # noqa: BLE001 - whatever XLA refuses, the plain graph runs
        logger.info("preprocess %r cannot be XLA-compiled; the pipeline runs it uncompiled.", preprocess)
        return finish

    def pad(t: tf.Tensor, short: tf.Tensor) -> tf.Tensor:
        return tf.pad(t, [[0, short]] + [[0, 0]] * (t.shape.rank - 1))

    def finish_full_batch(images: tf.Tensor, params: tuple | None) -> tf.Tensor:
        n = tf.shape(images)[0]
        short = tf.maximum(batch_size - n, 0)  # tf.pad passes a full batch through without copying it
        padded = None if params is None else tuple(pad(p, short) for p in params)
        return compiled(pad(images, short), padded)[:n]

    return finish_full_batch


def _round_robin(labels: np.ndarray, limit: int) -> np.ndarray:
    """Return up to `limit` row positions, one class after another in split order, sorted back into split order."""
    queues = [list(np.flatnonzero(labels == c)) for c in CLASSES]
    chosen: list[int] = []
    while len(chosen) < limit and any(queues):
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop(0))
    return np.sort(np.asarray(chosen, dtype=int))
