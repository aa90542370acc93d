"""A test set for near-duplicate detection: copies of cells, among look-alike cells of the same smears.

Whole smears are drawn (red cells dense or sparse, platelets, glass colour, stain hue, uneven light),
each holding several white cells of one class. Every cell is photographed once as an original and
copied up to max_copies − 1 times with transforms drawn from synthetic.COPY_RANGES: half are re-cropped
from the smear (the corners hold real smear), half are augmentations of the original file with a
Keras/Albumentations border fill. The other cells and fields of a smear are the hard negatives: same
class, same stain, another cell. The manifest's cell_id is the truth that pair_precision_recall scores.
The detector is never consulted here: the ranges are the real ones, not ones that suit it.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterator, Sequence

import cv2
import numpy as np
import pandas as pd

from bloodcell_lib.atomic import write_text
from bloodcell_lib.classes import CLASSES, FILE_PREFIXES
from bloodcell_lib.errors import ConfigError, DatasetError
from bloodcell_lib.synthetic import (
    _OD_NUCLEUS, _OD_NUCLEUS_BLUE, _OD_NUCLEUS_RED, _OD_RBC, _blobs, _check_target, _Copy,
    _copy_linear, _draw_copy, _draw_white_cell, _local, _read_manifest, _replace_previous_set, _soft,
)

COPY_MANIFEST_NAME = "copyset_manifest.csv"
COPY_MANIFEST_COLUMNS = (
    "file", "class", "cell_id", "smear_id", "field_id", "copy", "fill",
    "angle", "flip_h", "flip_v", "zoom", "shift_x", "shift_y", "gain", "offset", "blur_sigma", "jpeg_quality",
    "cell_x", "cell_y", "rbc_cover",
)
# How a copy was made: re-cropped from the smear, or the original file augmented with this border fill.
# Originals have fill "original".
FILLS = ("recrop", "nearest", "reflect", "constant")
ORIGINAL_JPEG_QUALITY = (85, 95)  # both ends included

_STAGING = ".copyset_staging"
_IDENTITY = _Copy(angle=0.0, flip_h=False, flip_v=False, zoom=1.0, shift_x=0.0, shift_y=0.0, gain=1.0, offset=0.0,
                  blur_sigma=0.0, jpeg_quality=0)  # an original's transform
_BORDER = {"nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT, "constant": cv2.BORDER_CONSTANT}
_RECROP_P = 0.5
_VIEW_JITTER = 0.05  # of the side: where the white cell sits in an original
# Smears are drawn with a crop at most this many pixels wide and upsampled to `size`; noise, defocus and
# JPEG are applied at full size. 256 px keeps a 1024-px set fast and the cell's texture finer than its blur.
_MAX_WORK_SIDE = 256
# Smear layout, in crop sides. A recrop reaches at most 0.965 of a side from its view centre (half the
# diagonal plus a shift, at the smallest zoom); the pitch keeps the neighbouring white cell out of it, the
# edge keeps the canvas border out of it.
_PITCH = 1.6
_CELL_SPREAD = 0.08  # random offset of a white cell from its place in the grid
_EDGE = 1.15
# Red cells: radius as a fraction of the crop side, and the share of odd shapes.
_RBC_RADIUS = (0.07, 0.11)
_RBC_KINDS = {"normal": 0.82, "elongated": 0.10, "crenated": 0.08}
_DENSE_P = 2 / 3  # the rest of the smears are sparse: smooth fields with few features
_DENSE_COVER = (0.35, 0.8)  # red-cell area / smear area
_SPARSE_COVER = (0.01, 0.12)
_TRIANGULAR_STD = math.sqrt(2 * (256**2 - 1) / 12)  # of the difference of two uniform bytes


def make_copy_set(
    out: str | Path,
    cells_per_class: int = 40,
    size: int = 160,
    max_copies: int = 5,
    seed: int = 0,
    cells_per_smear: int = 4,
) -> Path:
    """Write the near-duplicate test set to `out` in the Kaggle layout and return the path of its manifest.

    Each cell gets 1..max_copies images (original included, the number drawn uniformly) as
    out/<class>/<PREFIX>_<number>.jpg, size×size px; cells_per_smear cells of one class share a smear.
    """
    _check_parameters(cells_per_class, size, max_copies, seed, cells_per_smear)
    out = Path(out)
    _check_target(out, COPY_MANIFEST_NAME, _STAGING, "copy set")
    staging = out / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    for ci, cls in enumerate(CLASSES):
        (staging / cls).mkdir()
        rows += _write_class(staging / cls, ci, cells_per_class, size, max_copies, seed, cells_per_smear)

    frame = pd.DataFrame(rows, columns=list(COPY_MANIFEST_COLUMNS))
    frame["_n"] = frame["file"].str.extract(r"_(\d+)\.jpg$", expand=False).astype(int)
    frame = frame.sort_values(["class", "_n"], kind="stable").drop(columns="_n").round(4)
    _replace_previous_set(out, staging, COPY_MANIFEST_NAME)
    manifest = write_text(out / COPY_MANIFEST_NAME, frame.to_csv(index=False))
    staging.rmdir()
    return manifest


def load_copy_manifest(path: str | Path) -> pd.DataFrame:
    """Read a copy set's manifest (the CSV or the folder holding it) into a DataFrame."""
    frame = _read_manifest(path, COPY_MANIFEST_NAME, COPY_MANIFEST_COLUMNS,
                           ("file", "class", "cell_id", "smear_id", "field_id", "fill"), "copy set",
                           "bloodcell_lib.copyset.make_copy_set")
    return frame.astype({"copy": int, "jpeg_quality": int, "flip_h": bool, "flip_v": bool})


def pair_precision_recall(pred_groups: Sequence[Hashable], true_groups: Sequence[Hashable]) -> dict[str, float | int]:
    """Score a grouping of images against the true copy groups by the pairs of images it puts together.

    Both arguments hold one label per image, in the same order; each distinct label is one group (give an
    image that has no copy a label of its own). Pairs are counted from group sizes in O(N), never an N×N matrix.
    Returns precision (correct / predicted pairs; 1.0 when none is predicted), recall (correct / true
    pairs; 1.0 when there is none), the three pair counts and the size of the largest predicted group.
    """
    pred, true = _codes(pred_groups, "pred_groups"), _codes(true_groups, "true_groups")
    if len(pred) != len(true):
        raise ValueError(f"pair_precision_recall: {len(pred)} predicted labels but {len(true)} true labels.")
    # A correct pair shares both labels: count the images of each (predicted, true) combination.
    joint, _ = pd.factorize(pred * (int(true.max(initial=-1)) + 1) + true)
    pred_sizes = np.bincount(pred)
    predicted, correct, true_pairs = _pairs(pred_sizes), _pairs(np.bincount(joint)), _pairs(np.bincount(true))
    return {
        "precision": correct / predicted if predicted else 1.0,
        "recall": correct / true_pairs if true_pairs else 1.0,
        "true_pairs": true_pairs,
        "predicted_pairs": predicted,
        "correct_pairs": correct,
        "largest_group": int(pred_sizes.max(initial=0)),
    }


# ---------------------------------------------------------------------------------------------------
# Checks and pair counting


def _check_parameters(cells_per_class: int, size: int, max_copies: int, seed: int, cells_per_smear: int) -> None:
    if seed < 0:
        raise ConfigError(f"seed must be 0 or a positive integer, got {seed}.")
    if cells_per_class < 1:
        raise ConfigError(f"cells_per_class must be at least 1, got {cells_per_class}.")
    if size < 32:
        raise ConfigError(f"size must be at least 32 pixels to draw a smear, got {size}.")
    if max_copies < 1:
        raise ConfigError(f"max_copies counts the original too, so it must be at least 1, got {max_copies}.")
    if cells_per_smear < 1:
        raise ConfigError(f"cells_per_smear must be at least 1, got {cells_per_smear}.")


def _codes(labels: Sequence[Hashable], name: str) -> np.ndarray:
    codes, _ = pd.factorize(pd.Series(list(labels), dtype=object))
    if (codes < 0).any():
        raise ValueError(f"pair_precision_recall: {name} holds a missing label; give every image a group.")
    return codes.astype(np.int64)


def _pairs(group_sizes: np.ndarray) -> int:
    sizes = np.asarray(group_sizes, dtype=np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


# ---------------------------------------------------------------------------------------------------
# One class: its smears, their cells, each cell's images


def _write_class(folder: Path, ci: int, cells_per_class: int, size: int, max_copies: int, seed: int,
                 cells_per_smear: int) -> list[dict[str, Any]]:
    """Draw the class's smears, write every image of every cell into `folder` and return their manifest rows."""
    cls = CLASSES[ci]
    counts = np.random.default_rng([seed, 1, ci]).integers(1, max_copies + 1, cells_per_class)
    # A seeded permutation of file numbers hides which files are copies of one cell.
    numbers = iter(np.random.default_rng([seed, 2, ci]).permutation(int(counts.sum())) + 1)
    work = min(size, _MAX_WORK_SIDE)
    rows: list[dict[str, Any]] = []
    for s, first in enumerate(range(0, cells_per_class, cells_per_smear)):
        n_cells = min(cells_per_smear, cells_per_class - first)
        smear = _draw_smear(cls, n_cells, work, np.random.default_rng([seed, 3, ci, s]))
        smear_id = f"{cls}-s{s:03d}"
        for k, cell in enumerate(smear.cells):
            images = _photograph(smear, cell, int(counts[first + k]), size, np.random.default_rng([seed, 4, ci, s, k]))
            for data, params in images:
                name = f"{FILE_PREFIXES[cls]}_{next(numbers)}.jpg"
                (folder / name).write_bytes(data)
                rows.append({"file": f"{cls}/{name}", "class": cls, "cell_id": f"{smear_id}-c{k}",
                             "smear_id": smear_id, "field_id": f"{smear_id}-f{k}",
                             "rbc_cover": smear.stain.rbc_cover, **params})
    return rows


# ---------------------------------------------------------------------------------------------------
# Smears: stain, red cells, platelets, white cells, light


@dataclass(frozen=True)
class _Stain:
    glass: np.ndarray  # RGB of empty glass under the lamp
    nucleus_od: np.ndarray
    azure: float  # strength of the blue/purple stain
    rbc_od: np.ndarray  # eosin pink, its hue and strength varying per smear
    rbc_cover: float  # red-cell area wanted, as a share of the smear
    rbc_overlap: float  # red cells may come this close: centre distance / sum of radii
    platelets: float  # per crop area
    blur: float  # focus, pixels at 128 px
    noise: float  # sensor noise, grey levels at the output size


@dataclass(frozen=True)
class _Smear:
    canvas: np.ndarray  # float32 RGB light, 0-255, noise-free
    work: int  # pixels per crop side on the canvas
    cells: list[tuple[float, float]]  # white-cell centres (x, y), canvas pixels
    stain: _Stain


def _draw_stain(rng: np.random.Generator) -> _Stain:
    light = rng.uniform(200, 248)
    tone = rng.uniform(-1, 1)  # warm (+) or cool (−) lamp
    glass = np.clip(light + tone * np.array([6.0, 0.0, -8.0]) + rng.normal(0, 4, 3), 150, 252).astype(np.float32)
    hue = rng.uniform(-1, 1)  # bluer (−) or redder (+) chromatin
    toward = _OD_NUCLEUS_RED if hue > 0 else _OD_NUCLEUS_BLUE
    nucleus = (_OD_NUCLEUS + abs(hue) * (toward - _OD_NUCLEUS)).astype(np.float32)
    eosin = rng.uniform(0.6, 1.4) * np.clip(1 + rng.normal(0, 0.1, 3), 0.7, 1.3)  # from orange to magenta pink
    cover = rng.uniform(*_DENSE_COVER) if rng.random() < _DENSE_P else rng.uniform(*_SPARSE_COVER)
    return _Stain(
        glass=glass, nucleus_od=nucleus, azure=float(rng.uniform(0.8, 1.2)),
        rbc_od=(_OD_RBC * eosin).astype(np.float32), rbc_cover=float(cover),
        rbc_overlap=float(rng.uniform(0.7, 0.95)), platelets=float(rng.uniform(0, 1.5)),
        blur=float(rng.uniform(0.3, 0.9)), noise=float(rng.uniform(1.0, 4.0)),
    )


def _draw_smear(cls: str, n_cells: int, work: int, rng: np.random.Generator) -> _Smear:
    """Draw a smear holding n_cells white cells of `cls` on a grid, `work` pixels per crop side."""
    stain = _draw_stain(rng)
    cols = math.ceil(math.sqrt(n_cells))
    rows = math.ceil(n_cells / cols)
    shape = (math.ceil((2 * _EDGE + (rows - 1) * _PITCH) * work), math.ceil((2 * _EDGE + (cols - 1) * _PITCH) * work))
    places = [(_EDGE + (k % cols) * _PITCH, _EDGE + (k // cols) * _PITCH) for k in range(n_cells)]
    whites = [_draw_white_cell(cls, rng, shape, (x * work, y * work), _CELL_SPREAD, work, stain.nucleus_od, stain.azure)
              for x, y in places]
    ellipses = np.array([ellipse for *_, ellipse in whites])  # cx, cy, rx, ry, angle
    centres, radii = ellipses[:, :2], np.sqrt(ellipses[:, 2] * ellipses[:, 3])
    edge = max(0.8, 1.3 * work / 128)  # anti-aliasing width, as synthetic.py draws

    rbc, real_cover = _red_cells(rng, shape, work, stain, centres, radii, edge)
    od = rbc[..., None] * stain.rbc_od + _platelets(rng, shape, work, stain)[..., None] * (0.7 * stain.nucleus_od)
    for window, cell, white, _ in whites:
        od[window] *= (1 - 0.85 * cell)[..., None]  # the white cell lies on top of the red cells
        od[window] += white
    canvas = stain.glass * _lamp(rng, shape, work)[..., None] * np.exp(-od)
    canvas = cv2.GaussianBlur(canvas.astype(np.float32), (0, 0), stain.blur * work / 128)
    stain = dataclasses.replace(stain, rbc_cover=real_cover)
    return _Smear(canvas=canvas, work=work, cells=[(float(x), float(y)) for x, y in centres], stain=stain)


def _red_cells(rng: np.random.Generator, shape: tuple[int, int], work: int, stain: _Stain, centres: np.ndarray,
               radii: np.ndarray, edge: float) -> tuple[np.ndarray, float]:
    """Return the H×W amount of red-cell stain and the share of the smear the red cells cover.

    Discs with central pallor, some elongated, some crenated, thrown at random; a disc that would come
    closer to another than stain.rbc_overlap × their radii, or be centred on a white cell, is thrown again.
    """
    h, w = shape
    low, high = (f * work for f in _RBC_RADIUS)
    mean_area = math.pi * (low * low + low * high + high * high) / 3
    wanted = int(stain.rbc_cover * h * w / mean_area)
    placed_xy = np.zeros((0, 2))
    placed_r = np.zeros(0)
    for _ in range(3 * wanted):  # random sequential adsorption: dense smears jam before `wanted`
        if len(placed_r) >= wanted:
            break
        xy, r = rng.uniform(0, 1, 2) * (w, h), rng.uniform(low, high)
        if (np.hypot(*(centres - xy).T) < 0.6 * radii).any():
            continue
        if (np.hypot(*(placed_xy - xy).T) < stain.rbc_overlap * (placed_r + r)).any():
            continue
        placed_xy, placed_r = np.vstack([placed_xy, xy]), np.append(placed_r, r)

    density = np.zeros(shape, np.float32)
    kinds = rng.choice(list(_RBC_KINDS), size=len(placed_r), p=list(_RBC_KINDS.values()))
    for (x, y), r, kind in zip(placed_xy, placed_r, kinds):
        _stamp_red_cell(density, rng, float(x), float(y), float(r), str(kind), edge)
    return density, float(math.pi * (placed_r**2).sum() / (h * w))


def _stamp_red_cell(density: np.ndarray, rng: np.random.Generator, x: float, y: float, r: float, kind: str,
                    edge: float) -> None:
    """Add one red cell to `density` in place, working on its bounding box only."""
    aspect = {"normal": (0.85, 1.0), "elongated": (0.5, 0.75), "crenated": (0.9, 1.0)}[kind]
    pallor = {"normal": (0.35, 0.7), "elongated": (0.2, 0.5), "crenated": (0.0, 0.3)}[kind]
    spikes, amount = (int(rng.integers(10, 17)), rng.uniform(0.05, 0.09)) if kind == "crenated" else (0, 0.0)
    a = rng.uniform(*aspect)
    rx, ry = r / math.sqrt(a), r * math.sqrt(a)
    reach = rx * (1 + amount) + edge + 2
    x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, density.shape[1])
    y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, density.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    lx, ly = _local(xx, yy, x, y, rng.uniform(0, 180))
    rho = np.hypot(lx / rx, ly / ry)
    if spikes:  # echinocyte: a ring of short, even projections
        rho = rho / (1 + amount * np.cos(spikes * np.arctan2(ly / ry, lx / rx) + rng.uniform(0, 2 * math.pi)))
    disc = _soft((1 - rho) * r, edge)
    profile = 1 - rng.uniform(*pallor) * np.clip(1 - (rho / 0.62) ** 2, 0, 1) + 0.18 * np.exp(-((1 - rho) / 0.12) ** 2)
    density[y0:y1, x0:x1] += disc * profile * np.float32(rng.uniform(0.8, 1.2))


def _platelets(rng: np.random.Generator, shape: tuple[int, int], work: int, stain: _Stain) -> np.ndarray:
    """Return the H×W amount of platelet stain: a few small clusters of purple granules."""
    amount = np.zeros(shape, np.float32)
    for _ in range(int(rng.poisson(stain.platelets * shape[0] * shape[1] / work**2))):
        r = rng.uniform(0.012, 0.022) * work
        half = int(math.ceil(2 * r)) + 2
        x, y = (int(v) for v in rng.uniform(0, 1, 2) * (shape[1], shape[0]))
        x0, y0 = max(x - half, 0), max(y - half, 0)
        box = amount[y0:y + half, x0:x + half]
        spot = max(0.5, 0.4 * r)
        granules = _blobs(rng, box.shape, (x - x0, y - y0), int(rng.integers(5, 12)), r, spot)
        box += granules * np.float32(rng.uniform(0.5, 0.9))
    return amount


def _lamp(rng: np.random.Generator, shape: tuple[int, int], work: int) -> np.ndarray:
    """Return H×W relative illumination: a tilt, a vignette around a random point and a faint mottle."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / np.float32(work)  # crop sides
    cx, cy = rng.uniform(0, w / work), rng.uniform(0, h / work)
    tilt = rng.normal(0, 0.015, 2).astype(np.float32)
    vignette = np.float32(rng.uniform(0.0, 0.08) / ((h * h + w * w) / work**2 / 4))
    coarse = rng.standard_normal((math.ceil(3 * h / work) + 2, math.ceil(3 * w / work) + 2)).astype(np.float32)
    mottle = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * np.float32(rng.uniform(0.004, 0.02))
    return 1 + tilt[0] * (xx - cx) + tilt[1] * (yy - cy) - vignette * ((xx - cx) ** 2 + (yy - cy) ** 2) + mottle


# ---------------------------------------------------------------------------------------------------
# Photographs of one cell: the original, then its copies


def _photograph(smear: _Smear, cell: tuple[float, float], n_images: int, size: int,
                rng: np.random.Generator) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Yield (JPEG bytes, manifest fields) for the original of a cell and its n_images − 1 copies."""
    scale = size / smear.work
    jitter = rng.uniform(-_VIEW_JITTER, _VIEW_JITTER, 2) * smear.work
    # Snap the view to the canvas grid, so an original at scale 1 is an exact crop, not an interpolation.
    view = np.rint(np.asarray(cell) - jitter - (size - 1) / 2 / scale) + (size - 1) / 2 / scale
    low, high = ORIGINAL_JPEG_QUALITY
    original = dataclasses.replace(_IDENTITY, jpeg_quality=int(rng.integers(low, high + 1)))
    to_original = _affine(scale * np.eye(2), view, size, original)
    data = _encode(_recrop(smear, to_original, size, original, rng), original.jpeg_quality)
    yield data, _fields(0, "original", original, to_original, cell)

    first = _decode(data)
    centre = np.full(2, (size - 1) / 2)
    for index in range(1, n_images):
        copy = _draw_copy(rng)
        fill = FILLS[0] if rng.random() < _RECROP_P else str(rng.choice(FILLS[1:]))
        to_copy = _affine(scale * _copy_linear(copy), view, size, copy)  # smear to copy, either way
        if fill == "recrop":  # the same field photographed again, turned, zoomed and shifted
            image = _recrop(smear, to_copy, size, copy, rng)
        else:  # the original file augmented as Keras or Albumentations do
            image = _augment_file(first, _affine(_copy_linear(copy), centre, size, copy), copy, fill)
        yield _encode(image, copy.jpeg_quality), _fields(index, fill, copy, to_copy, cell)


def _affine(linear: np.ndarray, source_centre: np.ndarray, size: int, copy: _Copy) -> np.ndarray:
    """2×3 map from source to output pixels: source_centre lands at the image centre plus the copy's shift."""
    target = (size - 1) / 2 + np.array([copy.shift_x, copy.shift_y]) * size
    return np.hstack([linear, (target - linear @ np.asarray(source_centre))[:, None]])


def _recrop(smear: _Smear, matrix: np.ndarray, size: int, copy: _Copy, rng: np.random.Generator) -> np.ndarray:
    """Photograph the smear through `matrix`: defocus, fresh sensor noise, exposure; return uint8 RGB."""
    image = cv2.warpAffine(smear.canvas, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    image = _defocus(image, copy.blur_sigma)
    noise = _sensor_noise(rng, size, smear.stain.noise)
    # saturate_cast rounds and clips to 0-255 in the same pass, as an 8-bit pipeline would.
    return cv2.addWeighted(image, copy.gain, noise, copy.gain, copy.offset, dtype=cv2.CV_8U)


def _augment_file(rgb: np.ndarray, matrix: np.ndarray, copy: _Copy, fill: str) -> np.ndarray:
    """Turn, flip, zoom and shift a decoded image with a border fill, then defocus and re-light it."""
    size = rgb.shape[0]
    image = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=_BORDER[fill], borderValue=0)
    image = _defocus(image, copy.blur_sigma)
    return cv2.addWeighted(image, copy.gain, image, 0.0, copy.offset, dtype=cv2.CV_8U)


def _defocus(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma) if sigma > 0.05 else image


def _sensor_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Return size×size×3 float32 noise of about `sigma` grey levels: per-pixel brightness, coarser colour.

    A demosaicked sensor's colour noise spans two pixels; triangular draws from random bytes stand in
    for Gaussian ones at a third of the cost, and the eye cannot tell them apart.
    """
    half = (size + 1) // 2
    brightness = _triangular(rng, (size, size))
    colour = cv2.resize(_triangular(rng, (half, half, 3)), (size, size), interpolation=cv2.INTER_LINEAR)
    return brightness[..., None] * np.float32(0.8 * sigma) + colour * np.float32(0.7 * sigma)


def _triangular(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    pairs = np.frombuffer(rng.bytes(2 * n), np.uint8).reshape(2, *shape)
    return (pairs[0].astype(np.float32) - pairs[1]) / np.float32(_TRIANGULAR_STD)


def _fields(index: int, fill: str, copy: _Copy, matrix: np.ndarray, cell: tuple[float, float]) -> dict[str, Any]:
    """Manifest fields of one image: its transform and where the white cell's centre lies in it."""
    x, y = matrix @ np.array([cell[0], cell[1], 1.0])
    return {"copy": index, "fill": fill, **dataclasses.asdict(copy), "cell_x": float(x), "cell_y": float(y)}


def _encode(rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DatasetError("OpenCV could not encode a copy-set image as JPEG.")
    return data.tobytes()


def _decode(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
